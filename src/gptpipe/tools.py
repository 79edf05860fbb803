"""Tools a recipe names (``tools: [module:function, path/to/file.py:function]``) and running the model's calls.

Each tool is a typed Python function with a Google-style docstring: transformers builds its JSON schema from
them (``get_json_schema``, what ``apply_chat_template(tools=...)`` shows the model), so a tool without either
is refused when the recipe is loaded, naming it. A call the model makes never stops a run: an unknown tool,
arguments that do not fit the schema, a tool that raises or one that runs past ``timeout`` seconds each come
back as an error text, the tool's result the model reads next (as TRL's tool-calling GRPO does), and are
counted in ``ToolBox.stats``.
"""

from __future__ import annotations

import functools
import json
import signal
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers.utils import DocstringParsingException, TypeHintParsingException, get_json_schema

from gptpipe.errors import UserError
from gptpipe.plugins import import_callable

JSON_TYPES = {
    "integer": (int,),
    "number": (int, float),
    "string": (str,),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


@dataclass(frozen=True)
class Tool:
    name: str
    function: Callable
    schema: dict  # {"type": "function", "function": {name, description, parameters}}


def load_tools(specs: list[str], where: str = "tools") -> list[Tool]:
    """Each spec imported and given its schema; refused (UserError naming it) without type hints or docstring."""
    tools = []
    for i, spec in enumerate(specs):
        fn = import_callable(spec, f"{where}.{i}")
        try:
            schema = get_json_schema(fn)
        except (DocstringParsingException, TypeHintParsingException) as e:
            raise UserError(
                f"{where}.{i}: tool {spec!r} cannot be shown to the model: {e} (a tool needs type hints on every "
                "argument and a docstring with an Args: section; transformers builds its schema from them)"
            ) from None
        tools.append(Tool(schema["function"]["name"], fn, schema))
    names = [t.name for t in tools]
    if len(set(names)) < len(names):
        raise UserError(
            f"{where}: two tools share a name ({', '.join(names)}); the model calls tools by name"
        )
    return tools


class ToolCallError(RuntimeError):
    """A call that failed (unknown tool, bad arguments, a raising or hung tool): its text is the model's to read."""


@dataclass
class ToolBox:
    """The recipe's tools, run as the model calls them; ``stats`` counts calls and each kind of failure."""

    tools: list[Tool]
    timeout: float = 5.0
    stats: Counter = field(default_factory=Counter)

    @property
    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools]

    def run(self, name: str, arguments) -> tuple[str, str | None]:
        """(the text the model reads as the tool's result, the failure kind or None)."""
        self.stats["calls"] += 1
        by_name = {t.name: t for t in self.tools}
        if name not in by_name:
            return self._failed(
                "unknown_tool", f"Error: unknown tool {name!r}; the tools are {', '.join(by_name) or 'none'}"
            )
        tool = by_name[name]
        problem = argument_problem(tool.schema, arguments)
        if problem:
            return self._failed("bad_arguments", f"Error: {name}: {problem}")
        try:
            result = _with_timeout(lambda: tool.function(**arguments), self.timeout)
        except TimeoutError:
            return self._failed("timeout", f"Error: {name} did not finish in {self.timeout:g} s")
        except Exception as e:  # the tool's own failure is the model's to read, not the run's to crash on
            return self._failed("raised", f"Error: {name} raised {type(e).__name__}: {e}")
        self.stats["ok"] += 1
        return (result if isinstance(result, str) else json.dumps(result)), None

    def as_functions(self) -> list:
        """Each tool as a plain function with its name, hints and docstring (the same schema), for trainers that
        call tools themselves (TRL's GRPO ``tools=``): run through ``run``, so the timeout and the counts hold;
        a failed call raises ``ToolCallError`` with the text the model reads (TRL shows it to the model)."""

        def calling(tool: Tool):
            @functools.wraps(tool.function)
            def call(**arguments):
                result, kind = self.run(tool.name, arguments)
                if kind:
                    raise ToolCallError(result)
                return result

            return call

        return [calling(t) for t in self.tools]

    def _failed(self, kind: str, text: str) -> tuple[str, str]:
        self.stats[kind] += 1
        return text, kind


def argument_problem(schema: dict, arguments) -> str | None:
    """What is wrong with a call's arguments against the tool's JSON schema (required, unknown, JSON type)."""
    if not isinstance(arguments, dict):
        return f"arguments must be an object, got {arguments!r:.60}"
    parameters = schema["function"].get("parameters", {})
    properties = parameters.get("properties", {})
    missing = [p for p in parameters.get("required", []) if p not in arguments]
    if missing:
        return f"missing argument {missing[0]!r}"
    unknown = [a for a in arguments if a not in properties]
    if unknown:
        return f"unknown argument {unknown[0]!r}; expected {', '.join(properties)}"
    for name, value in arguments.items():
        kinds = properties[name].get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds] if kinds else []
        python = tuple(t for k in kinds for t in JSON_TYPES.get(k, (object,)))
        wrong_bool = isinstance(value, bool) and bool not in python
        if python and (not isinstance(value, python) or wrong_bool):
            return f"argument {name!r} must be {' or '.join(kinds)}, got {value!r:.40}"
    return None


def _with_timeout(fn: Callable, seconds: float):
    """``fn()``, cut off after ``seconds``: by SIGALRM in the main thread (the tool is interrupted), else in a
    daemon thread left behind (Python cannot stop a thread; the run goes on without its result)."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def expire(signum, frame):
            raise TimeoutError

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except Exception as e:  # noqa: BLE001 - handed back to the caller below
            box["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError
    if "error" in box:
        raise box["error"]
    return box["result"]

"""Dataset formats users bring, converted to one conversational form: ``messages`` (+ optional ``tools``).

``format:`` on a source picks the converter; ``columns:`` renames the source's columns to the field
names below first. Every conversation is checked: known roles, string contents, at least one
assistant turn, ending on an assistant turn. A bad row stops the run with its file, row and field.

| format | fields (after ``columns:``) |
| --- | --- |
| ``messages`` | ``messages``: list of {role, content}; roles system, user, assistant, tool; assistant ``tool_calls``; optional ``tools`` |
| ``alpaca`` | ``instruction``, ``input``, ``output``; optional ``system`` and ``history`` ([[user, assistant], ...]) |
| ``sharegpt`` | ``conversations``: list of {from, value}; from human, gpt, system, function_call (a JSON call), observation; optional ``system``, ``tools`` |
| ``prompt_completion`` | ``prompt`` and ``completion``, each a string or a list of messages |
| ``text`` | ``text``: plain documents (language modeling; no roles) |

Tool calls take the shape transformers and TRL use: an assistant message's ``tool_calls`` is a list of
{type: function, function: {name, arguments}} (a flat {name, arguments} is accepted; arguments an object,
or a JSON string of one), its content may be empty; each call's result is a ``tool`` message after it.
``tools`` (JSON schemas) is kept as a JSON string, which TRL's SFTTrainer reads. sharegpt's
``function_call`` turns (LLaMA-Factory's and glaive's function-calling sets) hold the call as JSON, one
call or a list, and ``observation`` turns the results.
"""

from __future__ import annotations

import json
import random

from datasets import Dataset, Features, Value

from gptpipe.errors import UserError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
}
FIELDS = {
    "messages": ["messages"],
    "alpaca": ["instruction", "output"],
    "sharegpt": ["conversations"],
    "prompt_completion": ["prompt", "completion"],
    "text": ["text"],
}
CONVERSATIONAL = ("messages", "alpaca", "sharegpt", "prompt_completion")
# One schema for every converted source, so sources of different formats concatenate into one mixture.
# A call's arguments differ in shape from tool to tool: kept as a JSON string (the OpenAI shape; the templates
# write it as it is), which every datasets operation handles (datasets' Json() feature broke packing).
TOOL_CALL = {"type": Value("string"), "function": {"name": Value("string"), "arguments": Value("string")}}
CHAT_FEATURES = Features(
    {
        "messages": [{"role": Value("string"), "content": Value("string"), "tool_calls": [TOOL_CALL]}],
        "tools": Value("string"),
    }
)


class RowError(ValueError):
    """A problem in one row: ``field`` names where it is."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(field, f"expected a string, got {type(value).__name__} ({value!r:.60})")
    return value


def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowError(field, f"expected a list of {{role, content}} messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            raise RowError(f"{field}.{i}", f"expected a {{role, content}} message, got {m!r:.80}")
        if m["role"] not in ROLES:
            raise RowError(
                f"{field}.{i}.role", f"unknown role {m['role']!r}; expected one of {', '.join(ROLES)}"
            )
        calls = (
            _tool_calls(m.get("tool_calls"), f"{field}.{i}.tool_calls") if m["role"] == "assistant" else None
        )
        content = m.get("content")
        content = "" if content is None and calls else _content(content, f"{field}.{i}.content")
        out.append({"role": m["role"], "content": content} | ({"tool_calls": calls} if calls else {}))
    return out


def _tool_calls(value, field: str) -> list[dict] | None:
    """An assistant message's calls as [{type: function, function: {name, arguments: {...}}}]."""
    if value in (None, []):
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(
            field, f"expected a list of {{type, function: {{name, arguments}}}} calls, got {value!r:.80}"
        )
    calls = []
    for j, call in enumerate(value):
        f = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise RowError(
                f"{field}.{j}",
                f"expected {{name, arguments}} (optionally under 'function'), got {call!r:.80}",
            )
        arguments = f.get("arguments", f.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise RowError(
                    f"{field}.{j}.function.arguments", f"not valid JSON ({e}): {arguments!r:.80}"
                ) from None
        if not isinstance(arguments, dict):
            raise RowError(
                f"{field}.{j}.function.arguments", f"expected an object of arguments, got {arguments!r:.80}"
            )
        calls.append(
            {"type": "function", "function": {"name": f["name"], "arguments": json.dumps(arguments)}}
        )
    return calls


def _content(value, field: str) -> str:
    """A message's content: a string, or a list of parts (the OpenAI / HF multimodal chat shape,
    ``[{"type": "text", "text": ...}]``) whose text parts are joined with newlines."""
    if not isinstance(value, list):
        return _text(value, field)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise RowError(
                f"{field}.{j}",
                f"a {kind or type(part).__name__!s} part; gptpipe trains text models and reads text parts "
                "({type: text, text: ...}) only: drop the part or put what it shows into text",
            )
        texts.append(_text(part.get("text"), f"{field}.{j}.text"))
    return "\n".join(texts)


def _tools(row: dict) -> str | None:
    tools = row.get("tools")
    if tools in (None, "", []):
        return None
    return tools if isinstance(tools, str) else json.dumps(tools)


def from_messages(row: dict) -> dict:
    return {"messages": _messages(row["messages"], "messages"), "tools": _tools(row)}


def from_alpaca(row: dict) -> dict:
    messages = []
    if row.get("system"):
        messages.append(_message("system", _text(row["system"], "system")))
    for i, turn in enumerate(row.get("history") or []):
        if not isinstance(turn, list) or len(turn) != 2:
            raise RowError(f"history.{i}", f"expected a [user, assistant] pair, got {turn!r:.80}")
        messages.append(_message("user", _text(turn[0], f"history.{i}.0")))
        messages.append(_message("assistant", _text(turn[1], f"history.{i}.1")))
    instruction = _text(row["instruction"], "instruction")
    extra = row.get("input")
    user = f"{instruction}\n{_text(extra, 'input')}" if extra else instruction
    messages.append(_message("user", user))
    messages.append(_message("assistant", _text(row["output"], "output")))
    return {"messages": messages, "tools": None}


def _message(role: str, content: str, tool_calls: list[dict] | None = None) -> dict:
    return {"role": role, "content": content} | ({"tool_calls": tool_calls} if tool_calls else {})


def sharegpt_messages(row: dict) -> list[dict]:
    """``system`` (optional) and ``conversations`` of {from, value} as messages."""
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowError(
            "conversations", f"expected a list of {{from, value}} turns, got {type(turns).__name__}"
        )
    messages = []
    if row.get("system"):
        messages.append(_message("system", _text(row["system"], "system")))
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise RowError(
                f"conversations.{i}.from",
                f"unknown speaker {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}",
            )
        value = _text(turn.get("value"), f"conversations.{i}.value")
        if speaker == "function_call":
            try:
                call = json.loads(value)
            except json.JSONDecodeError as e:
                raise RowError(
                    f"conversations.{i}.value", f"a function_call turn holds a JSON call ({e}): {value!r:.80}"
                ) from None
            messages.append(_message("assistant", "", _tool_calls(call, f"conversations.{i}.value")))
        else:
            messages.append(_message(SHAREGPT_ROLES[speaker], value))
    return messages


def from_sharegpt(row: dict) -> dict:
    return {"messages": sharegpt_messages(row), "tools": _tools(row)}


def from_prompt_completion(row: dict) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    prompt = (
        _messages(prompt, "prompt")
        if isinstance(prompt, list)
        else [_message("user", _text(prompt, "prompt"))]
    )
    if isinstance(completion, list):
        completion = _messages(completion, "completion")
    else:
        completion = [_message("assistant", _text(completion, "completion"))]
    return {"messages": prompt + completion, "tools": _tools(row)}


CONVERTERS = {
    "messages": from_messages,
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "prompt_completion": from_prompt_completion,
}


def check_conversation(messages: list[dict]) -> None:
    """A trainable conversation: not empty, system only first, ends on an assistant turn."""
    if not messages:
        raise RowError("messages", "the conversation is empty")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise RowError(f"messages.{i}.role", "a system message may only come first")
        before = messages[i - 1] if i else None
        if m["role"] == "tool" and not (before and (before.get("tool_calls") or before["role"] == "tool")):
            raise RowError(
                f"messages.{i}.role", "a tool message (a call's result) must follow the assistant's tool call"
            )
    if messages[-1]["role"] != "assistant":
        raise RowError(
            f"messages.{len(messages) - 1}.role",
            f"the conversation ends on a {messages[-1]['role']} turn; it must end with the assistant's reply",
        )


def convert(ds: Dataset, fmt: str, where: str, num_proc: int | None = None) -> Dataset:
    """Convert a loaded source to ``messages`` + ``tools`` (or keep ``text``), checking every row."""
    if fmt not in FIELDS:
        raise UserError(f"{where}: unknown format {fmt!r}; choose one of {', '.join(FIELDS)}")
    missing = [f for f in FIELDS[fmt] if f not in ds.column_names]
    if missing:
        raise UserError(
            f"{where}: format {fmt} needs field {missing[0]!r}, but the columns are {ds.column_names}; "
            f"map yours with `columns: {{{missing[0]}: <your column>}}` or pick another format"
        )
    if fmt == "text":
        return ds.select_columns(["text"])
    converter = CONVERTERS[fmt]

    def apply(row: dict, index: int) -> dict:
        try:
            out = converter(row)
            check_conversation(out["messages"])
            out["messages"] = [
                {"tool_calls": None, **m} for m in out["messages"]
            ]  # one schema: CHAT_FEATURES
        except RowError as e:
            raise UserError(f"{where}: row {index}: {e}") from None
        return out

    return ds.map(
        apply,
        with_indices=True,
        remove_columns=ds.column_names,
        features=CHAT_FEATURES,
        num_proc=num_proc,
        desc=f"converting {where} ({fmt})",
    )


def show_tools(ds: Dataset, tools: str, share: float, seed: int) -> Dataset:
    """``share`` of the conversations without tools of their own (a seeded choice) get ``tools`` (the JSON
    schemas, as the ``tools`` column holds them) and keep their replies: trained on them, a model that learns
    calls elsewhere still answers a question that needs no tool without calling one."""
    bare = [i for i, t in enumerate(ds["tools"]) if t is None]
    chosen = set(random.Random(seed).sample(bare, round(share * len(bare))))
    return ds.map(
        lambda row, i: {"tools": tools if i in chosen else row["tools"]},
        with_indices=True,
        features=CHAT_FEATURES,
        desc=f"showing the tools on {len(chosen)} conversations",
    )


def split_last_turn(row: dict) -> dict:
    """messages -> prompt (all but the final assistant turn) and completion (that turn), for completion-only loss."""
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

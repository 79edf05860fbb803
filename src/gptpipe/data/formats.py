"""Dataset formats users bring, converted to one conversational form: ``messages`` (+ optional ``tools``).

``format:`` on a source picks the converter; ``columns:`` renames the source's columns to the field
names below first. Every conversation is checked: known roles, string contents, at least one
assistant turn, ending on an assistant turn. A bad row stops the run with its file, row and field.

| format | fields (after ``columns:``) |
| --- | --- |
| ``messages`` | ``messages``: list of {role, content}; roles system, user, assistant, tool; optional ``tools`` |
| ``alpaca`` | ``instruction``, ``input``, ``output``; optional ``system`` and ``history`` ([[user, assistant], ...]) |
| ``sharegpt`` | ``conversations``: list of {from, value}; from human, gpt, system, function_call, observation; optional ``system``, ``tools`` |
| ``prompt_completion`` | ``prompt`` and ``completion``, each a string or a list of messages |
| ``text`` | ``text``: plain documents (language modeling; no roles) |
"""

from __future__ import annotations

import json

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
CHAT_FEATURES = Features(
    {"messages": [{"role": Value("string"), "content": Value("string")}], "tools": Value("string")}
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
        out.append({"role": m["role"], "content": _content(m.get("content"), f"{field}.{i}.content")})
    return out


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
        messages.append({"role": "system", "content": _text(row["system"], "system")})
    for i, turn in enumerate(row.get("history") or []):
        if not isinstance(turn, list) or len(turn) != 2:
            raise RowError(f"history.{i}", f"expected a [user, assistant] pair, got {turn!r:.80}")
        messages.append({"role": "user", "content": _text(turn[0], f"history.{i}.0")})
        messages.append({"role": "assistant", "content": _text(turn[1], f"history.{i}.1")})
    instruction = _text(row["instruction"], "instruction")
    extra = row.get("input")
    user = f"{instruction}\n{_text(extra, 'input')}" if extra else instruction
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": _text(row["output"], "output")})
    return {"messages": messages, "tools": None}


def sharegpt_messages(row: dict) -> list[dict]:
    """``system`` (optional) and ``conversations`` of {from, value} as messages."""
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise RowError(
            "conversations", f"expected a list of {{from, value}} turns, got {type(turns).__name__}"
        )
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": _text(row["system"], "system")})
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise RowError(
                f"conversations.{i}.from",
                f"unknown speaker {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}",
            )
        messages.append(
            {"role": SHAREGPT_ROLES[speaker], "content": _text(turn.get("value"), f"conversations.{i}.value")}
        )
    return messages


def from_sharegpt(row: dict) -> dict:
    return {"messages": sharegpt_messages(row), "tools": _tools(row)}


def from_prompt_completion(row: dict) -> dict:
    prompt, completion = row["prompt"], row["completion"]
    prompt = (
        _messages(prompt, "prompt")
        if isinstance(prompt, list)
        else [{"role": "user", "content": _text(prompt, "prompt")}]
    )
    if isinstance(completion, list):
        completion = _messages(completion, "completion")
    else:
        completion = [{"role": "assistant", "content": _text(completion, "completion")}]
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


def split_last_turn(row: dict) -> dict:
    """messages -> prompt (all but the final assistant turn) and completion (that turn), for completion-only loss."""
    return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

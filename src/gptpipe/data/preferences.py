"""Comparison data for reward models, converted to pairs of whole conversations.

Every format becomes rows of ``chosen`` and ``rejected`` (each a full conversation: the prompt's
messages plus one assistant reply) and ``margin`` (how much better chosen is; 0 unless given):

| format | fields (after ``columns:``) |
| --- | --- |
| ``preference`` | ``prompt``, ``chosen``, ``rejected`` — strings or message lists; without ``prompt``, chosen and rejected are whole conversations (implicit prompt) |
| ``sharegpt_preference`` | ``conversations`` ([{from, value}]), ``chosen`` and ``rejected`` ({from, value}); optional ``system`` |
| ``ranked`` | ``prompt`` and ``responses`` ranked best to worst, expanded to all k(k-1)/2 pairs; optional ``scores`` (one per response, ties allowed: tied responses are not paired) |

Any format takes an optional ``margin`` column. Bad rows (identical chosen and rejected, a missing
reply, an empty prompt) stop the run with file, row and field, or with ``invalid_pairs: drop`` are
dropped and counted.

KTO reads unpaired rows (``convert_unpaired``): format ``unpaired`` (``prompt``, ``completion``, ``label``: true
for a desirable reply), or any format above, each pair split into its chosen reply (desirable) and its rejected
one (undesirable) with TRL's ``unpair_preference_dataset``.
"""

from __future__ import annotations

from itertools import combinations

from datasets import Dataset, Features, Value
from trl.data_utils import extract_prompt, unpair_preference_dataset

from gptpipe.data.formats import SHAREGPT_ROLES, RowError, _messages, _text, sharegpt_messages
from gptpipe.errors import UserError

FIELDS = {
    "preference": ["chosen", "rejected"],
    "sharegpt_preference": ["conversations", "chosen", "rejected"],
    "ranked": ["prompt", "responses"],
}
_MESSAGES = [{"role": Value("string"), "content": Value("string")}]
PAIR_FEATURES = Features(
    {"chosen": _MESSAGES, "rejected": _MESSAGES, "margin": Value("float32"), "problem": Value("string")}
)


def _prompt(value, field: str = "prompt") -> list[dict]:
    if isinstance(value, list):
        messages = _messages(value, field)
    else:
        messages = [{"role": "user", "content": _text(value, field)}]
    if not messages or not any(m["content"].strip() for m in messages):
        raise RowError(field, "the prompt is empty")
    return messages


def _reply(value, field: str) -> list[dict]:
    if value is None or value == "" or value == []:
        raise RowError(field, "is missing or empty; every comparison needs a chosen and a rejected reply")
    if isinstance(value, list):
        return _messages(value, field)
    return [{"role": "assistant", "content": _text(value, field)}]


def from_preference(row: dict) -> list[tuple[list, list]]:
    if row.get("prompt") is not None:
        prompt = _prompt(row["prompt"])
        pair = []
        for side in ("chosen", "rejected"):
            reply = _reply(row[side], side)
            # Some sets (UltraFeedback) repeat the prompt inside chosen/rejected: do not add it twice.
            pair.append(reply if reply[: len(prompt)] == prompt else prompt + reply)
        return [tuple(pair)]
    chosen, rejected = _reply(row["chosen"], "chosen"), _reply(row["rejected"], "rejected")
    if len(chosen) < 2:
        raise RowError(
            "chosen",
            "without a prompt column, chosen and rejected must be whole conversations (message lists)",
        )
    return [(chosen, rejected)]


def from_sharegpt_preference(row: dict) -> list[tuple[list, list]]:
    prompt = sharegpt_messages(row)
    if not any(m["role"] != "system" for m in prompt):
        raise RowError("conversations", "the prompt is empty")
    pair = []
    for field in ("chosen", "rejected"):
        value = row[field]
        if not isinstance(value, dict) or not value.get("value"):
            raise RowError(field, "is missing or empty; expected {from, value}")
        pair.append(
            prompt
            + [
                {
                    "role": SHAREGPT_ROLES.get(value.get("from"), "assistant"),
                    "content": _text(value["value"], f"{field}.value"),
                }
            ]
        )
    return [tuple(pair)]


def from_ranked(row: dict) -> list[tuple[list, list]]:
    """Every (better, worse) pair of the ranking; with ``scores`` (one per response, best first, ties allowed),
    only the pairs whose scores differ."""
    prompt = _prompt(row["prompt"])
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise RowError("responses", "expected at least two responses, ranked best to worst")
    replies = [_reply(r, f"responses.{i}") for i, r in enumerate(responses)]
    scores = row.get("scores")
    if scores is None:
        return [(prompt + replies[i], prompt + replies[j]) for i, j in combinations(range(len(replies)), 2)]
    if not isinstance(scores, list) or len(scores) != len(replies):
        raise RowError("scores", f"expected one score per response ({len(replies)}), got {scores!r}")
    if any(scores[i + 1] > scores[i] for i in range(len(scores) - 1)):
        raise RowError("scores", f"expected responses best first (scores not increasing), got {scores}")
    return [
        (prompt + replies[i], prompt + replies[j])
        for i, j in combinations(range(len(replies)), 2)
        if scores[i] > scores[j]
    ]


CONVERTERS = {
    "preference": from_preference,
    "sharegpt_preference": from_sharegpt_preference,
    "ranked": from_ranked,
}


def guess_format(columns: list[str]) -> str:
    if "responses" in columns:
        return "ranked"
    if "conversations" in columns:
        return "sharegpt_preference"
    return "preference"


def convert_pairs(
    ds: Dataset, fmt: str | None, where: str, invalid: str = "error", num_proc: int | None = None
) -> Dataset:
    """Rows of any preference format -> ``chosen``/``rejected`` conversations and ``margin``."""
    fmt = fmt or guess_format(ds.column_names)
    if fmt not in FIELDS:
        raise UserError(f"{where}: unknown preference format {fmt!r}; choose one of {', '.join(FIELDS)}")
    missing = [f for f in FIELDS[fmt] if f not in ds.column_names]
    if missing:
        raise UserError(
            f"{where}: format {fmt} needs field {missing[0]!r}, but the columns are {ds.column_names}; "
            f"map yours with `columns: {{{missing[0]}: <your column>}}` or pick another format"
        )
    if invalid not in ("error", "drop"):
        raise UserError(f"invalid_pairs: expected error or drop, got {invalid!r}")
    convert = CONVERTERS[fmt]

    def apply(batch: dict, indices: list[int]) -> dict:
        out = {"chosen": [], "rejected": [], "margin": [], "problem": []}
        for j, index in enumerate(indices):
            row = {k: v[j] for k, v in batch.items()}
            try:
                pairs = convert(row)
                margin = float(row["margin"]) if row.get("margin") is not None else 0.0
                for chosen, rejected in pairs:
                    if chosen == rejected:
                        raise RowError(
                            "chosen", "is identical to rejected; a comparison needs two different replies"
                        )
            except (RowError, TypeError, ValueError) as e:
                problem = f"row {index}: {e}"
                if invalid == "error":
                    raise UserError(
                        f"{where}: {problem} (or set invalid_pairs: drop to skip such rows)"
                    ) from None
                pairs, margin = [([], [])], 0.0
            else:
                problem = ""
            for chosen, rejected in pairs:
                out["chosen"].append(chosen)
                out["rejected"].append(rejected)
                out["margin"].append(margin)
                out["problem"].append(problem)
        return out

    pairs = ds.map(
        apply,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=PAIR_FEATURES,
        num_proc=num_proc,
        desc=f"converting {where} ({fmt})",
    )
    problems = [p for p in pairs["problem"] if p]
    if problems:
        print(f"warning: {where}: dropped {len(problems)} invalid rows of {len(ds)}; first: {problems[0]}")
        pairs = pairs.filter(lambda p: not p, input_columns="problem")
    return pairs.remove_columns("problem")


def tokenize_pairs(
    ds: Dataset, tokenizer, max_length: int | None, truncation_side: str = "left", num_proc: int | None = None
) -> Dataset:
    """Render both conversations with the chat template and tokenize; cut sequences over ``max_length``.

    ``truncation_side: left`` drops the start of a long conversation and keeps the replies being judged.
    """
    if truncation_side not in ("left", "right"):
        raise UserError(f"truncation_side: expected left or right, got {truncation_side!r}")

    def cut(ids: list[int]) -> list[int]:
        if max_length is None or len(ids) <= max_length:
            return ids
        return ids[-max_length:] if truncation_side == "left" else ids[:max_length]

    def encode(row: dict) -> dict:
        out = {}
        for side in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(row[side], tokenize=True, return_dict=True)["input_ids"]
            out[f"{side}_ids"] = cut(ids)
            out[f"{side}_truncated"] = len(ids) > len(out[f"{side}_ids"])
        return out

    return ds.map(encode, num_proc=num_proc, desc="tokenizing comparisons")


UNPAIRED_FIELDS = ["prompt", "completion", "label"]


def _split_conversations(ds: Dataset, where: str) -> Dataset:
    """Conversational unpaired rows: ``messages`` -> ``prompt`` (every turn before the last) and ``completion``
    (the last, an assistant turn); a row without a final assistant turn is named by file and row."""
    prompts, completions = [], []
    for index, messages in enumerate(ds["messages"]):
        try:
            turns = _messages(messages, "messages")
            if len(turns) < 2 or turns[-1]["role"] != "assistant":
                last = turns[-1]["role"] if turns else "nothing"
                raise RowError(
                    f"messages.{max(len(turns) - 1, 0)}.role",
                    f"expected the conversation to end with the assistant's reply (the completion judged), "
                    f"after at least one prompt turn; it ends with {last}",
                )
        except RowError as e:
            raise UserError(f"{where}: row {index}: {e}") from None
        prompts.append(turns[:-1])
        completions.append(turns[-1:])
    return ds.remove_columns("messages").add_column("prompt", prompts).add_column("completion", completions)


def convert_unpaired(
    ds: Dataset, fmt: str | None, where: str, invalid: str = "error", num_proc: int | None = None
) -> Dataset:
    """Rows of format ``unpaired``, or of any comparison format -> KTO's conversational rows: ``prompt``
    (messages), ``completion`` (the reply as messages), ``label`` (desirable). Unpaired rows are ``prompt`` +
    ``completion`` + ``label``, or conversational (TRL's and LLaMA-Factory's ``kto_en_demo.json``): ``messages``
    whose last assistant turn is the completion and the turns before it the prompt, with ``label`` or
    ``kto_tag``."""
    columns = ds.column_names
    labeled = "label" in columns or "kto_tag" in columns
    fmt = fmt or ("unpaired" if labeled else guess_format(columns))
    if fmt != "unpaired":
        pairs = convert_pairs(ds, fmt, where, invalid, num_proc).remove_columns("margin")
        return unpair_preference_dataset(pairs.map(extract_prompt, num_proc=num_proc), num_proc=num_proc)
    if "messages" in columns and "prompt" not in columns:
        ds = _split_conversations(ds, where)
    if "kto_tag" in ds.column_names and "label" not in ds.column_names:
        ds = ds.rename_column("kto_tag", "label")
    missing = [f for f in UNPAIRED_FIELDS if f not in ds.column_names]
    if missing:
        raise UserError(
            f"{where}: format unpaired needs field {missing[0]!r}, but the columns are {ds.column_names}; "
            f"map yours with `columns: {{{missing[0]}: <your column>}}` or pick a comparison format"
        )
    rows, dropped = [], []
    for index, row in enumerate(ds):
        try:
            if not isinstance(row["label"], bool):
                raise RowError("label", f"expected true (a desirable reply) or false, got {row['label']!r}")
            rows.append(
                {
                    "prompt": _prompt(row["prompt"]),
                    "completion": _reply(row["completion"], "completion"),
                    "label": row["label"],
                }
            )
        except (RowError, TypeError, ValueError) as e:
            if invalid == "error":
                raise UserError(
                    f"{where}: row {index}: {e} (or set invalid_pairs: drop to skip such rows)"
                ) from None
            dropped.append(f"row {index}: {e}")
    if dropped:
        print(f"warning: {where}: dropped {len(dropped)} invalid rows of {len(ds)}; first: {dropped[0]}")
    if not rows:
        raise UserError(f"{where}: no valid rows left")
    return Dataset.from_list(rows)

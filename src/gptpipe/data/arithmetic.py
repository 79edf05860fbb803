"""The tiny world's calculator part (``tinyworld:tools``): arithmetic a 1.9M model cannot do in its head.

Two- and three-digit additions and multiplications, asked as the tiny world asks its sums ("What is 123 plus
456?", "How much is...", "Work out..."), answered by calling a tool: the user's question, the assistant's call (``add`` or ``multiply``, in
the ``tool_calls`` shape transformers and TRL use), the tool's result, and the answer, which states the result
("It is 579."). ``train`` and ``eval`` use disjoint operand pairs: the held-out questions cannot be
answered from memory, only by calling the tool. ``unseen`` asks ``eval``'s questions in a phrasing no data has
("Say what 123 plus 456 is."): whether the tool use carries over to a new way of asking. Each row carries ``tools`` (the JSON schemas, as
``get_json_schema`` builds them from ``add`` and ``multiply`` below: ``tools: [gptpipe.data.arithmetic:add]``
in a recipe runs the same function) and ``answer``.
"""

from __future__ import annotations

import json
import random


def add(a: int, b: int) -> int:
    """Add two whole numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a + b


def multiply(a: int, b: int) -> int:
    """Multiply two whole numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a * b


OPERATIONS = {"add": (add, "plus"), "multiply": (multiply, "times")}
QUESTION = "What is {a} {word} {b}?"  # the held-out questions' phrasing
# Training asks in these in turn: trained on one phrasing, the model called the calculator for it alone and
# answered "Say what 812 plus 677 is." in its head (0.00 of the held-out questions so phrased, seed 42).
TRAIN_QUESTIONS = (QUESTION, "How much is {a} {word} {b}?", "Work out {a} {word} {b}.")
UNSEEN_QUESTION = (
    "Say what {a} {word} {b} is."  # in no data at all, as the tiny world's other ``unseen`` splits
)


def tool_schemas() -> list[dict]:
    # Imported here, not above: transformers' schema builder imports torch, and the tiny world's other parts
    # (read by every stage, the tokenizer's included) need neither.
    from transformers.utils import get_json_schema

    return [get_json_schema(fn) for fn, _ in OPERATIONS.values()]


def conversation(tool: str, a: int, b: int, question: str = QUESTION) -> list[dict]:
    """The question, the call, the tool's result and the answer."""
    fn, word = OPERATIONS[tool]
    value = fn(a, b)
    call = {"type": "function", "function": {"name": tool, "arguments": {"a": a, "b": b}}}
    return [
        {"role": "user", "content": question.format(a=a, word=word, b=b)},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": str(value)},
        # Not the house style "123 plus 456 is 579.": after "123 plus 456 is" the tiny model's pretraining (sums
        # worked out in worksheets) pulls it to compute instead of copying the result, and copying the operands
        # again doubles what it must copy right. Measured (a plain loop, seed 42, the SFT model, lr 2e-3): whole
        # replies right on held-out pairs 0.56 / 0.88 at 400 / 500 steps, against 0.13 / 0.22 in the house style.
        {"role": "assistant", "content": f"It is {value}."},
    ]


# Enough pairs that tool SFT sees each about once: with 2,000 it saw each ten times and could answer them from
# memory. Seed 1, 800 steps of the cosine schedule: held-out tool answers 0.94 -> 1.00, held-out loss
# 0.0033 -> 0.0009 (docs/tools.md). The first 2,000 are those of before: ``max_samples: 2000`` gives them back.
TRAIN_PAIRS = 16000


def rows(seed: int, train: int = TRAIN_PAIRS, heldout: int = 100) -> dict[str, list[dict]]:
    """``train`` (asked in ``TRAIN_QUESTIONS`` in turn) and ``eval`` (``QUESTION``) conversations on disjoint
    (tool, a, b) questions, operands 10-999; ``unseen``, ``eval``'s questions in ``UNSEEN_QUESTION``'s phrasing."""
    rng = random.Random(f"{seed}:tools")
    tools = json.dumps(tool_schemas())
    seen: set[tuple] = set()
    keys: dict[str, list[tuple]] = {}
    for split, count in (("eval", heldout), ("train", train)):
        keys[split] = []
        while len(keys[split]) < count:
            key = (rng.choice(list(OPERATIONS)), rng.randint(10, 999), rng.randint(10, 999))
            if key not in seen:
                seen.add(key)
                keys[split].append(key)
    splits = {
        "eval": [_row(key, tools) for key in keys["eval"]],
        "train": [_row(key, tools, TRAIN_QUESTIONS[i % 3]) for i, key in enumerate(keys["train"])],
        "unseen": [_row(key, tools, UNSEEN_QUESTION) for key in keys["eval"]],
    }
    return splits


def _row(key: tuple, tools: str, question: str = QUESTION) -> dict:
    messages = conversation(*key, question=question)
    return {"messages": messages, "tools": tools, "answer": messages[2]["content"], "kind": key[0]}

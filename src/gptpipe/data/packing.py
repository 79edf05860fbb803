"""Turn documents into fixed-length training blocks (pretraining's data layout)."""

from __future__ import annotations

from itertools import chain

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from gptpipe.errors import UserError


def pack_documents(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    num_proc: int | None = None,
    what: str = "data",
) -> Dataset:
    """Tokenize ``text`` rows, end each document with EOS, concatenate and cut into ``block_size`` blocks.

    Blocks cross document boundaries (as GPT pretraining does); EOS tells the model where one ends.
    The tail shorter than a block is dropped. Both maps are cached by ``datasets``.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos_token; pretraining needs one to delimit documents")

    def tokenize(batch: dict) -> dict:
        ids = tokenizer(batch["text"])["input_ids"]  # adds BOS when the tokenizer does (Llama-style)
        return {"input_ids": [x if x and x[-1] == eos else x + [eos] for x in ids]}

    def group(batch: dict) -> dict:
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block_size * block_size
        blocks = [stream[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}  # the model shifts labels itself

    ds = ds.filter(lambda text: bool(text.strip()), input_columns="text", desc="dropping empty documents")
    tokens = ds.map(
        tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc=f"tokenizing {what}"
    )
    blocks = tokens.map(
        group,
        batched=True,
        batch_size=1000,
        num_proc=num_proc,
        desc=f"packing {what} into {block_size}-token blocks",
    )
    if len(blocks) == 0:
        total = sum(len(x) for x in tokens["input_ids"])
        raise UserError(
            f"{what}: {total} tokens is less than one block of block_size={block_size}; add data or lower block_size"
        )
    return blocks

"""PPO-ptx (InstructGPT, Ouyang et al. 2022, eq. 2): the RL objective plus ``ptx_coef`` times the log-likelihood
of pretraining or SFT data, so that RL on new prompts does not unlearn what the model could do (the alignment
tax). As a loss: ``policy_loss + ptx_coef * ptx_loss``, ``ptx_loss`` the token-mean negative log-likelihood of a
batch of ptx rows, taken in every PPO update beside the PPO minibatch.

TRL's removed PPOTrainer never had this term and no maintained trainer of the HF stack has it, so it lives here
with the rest of gptpipe's PPO. The rows of each update are a pure function of the seed, the iteration, the
update and the process (``ptx_rows``): a resumed run takes the same batches, and processes take different ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from gptpipe.data.chat_templates import split_reply
from gptpipe.ppo.checkpoint import batch_rows

IGNORE = -100  # labels left out of the loss (the prompt of a conversation, padding)


@dataclass
class PTXBatch:
    """Right-padded language-model rows: ``labels`` is IGNORE where no loss is taken."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def select(self, rows: torch.Tensor) -> PTXBatch:
        return PTXBatch(self.input_ids[rows], self.attention_mask[rows], self.labels[rows])

    @property
    def tokens(self) -> torch.Tensor:
        """How many tokens the loss is taken on (next-token targets)."""
        return (self.labels[:, 1:] != IGNORE).sum()


def encode_examples(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row: a conversation (``messages``, its ``tools`` shown when it has them) rendered
    with the chat template, labels on its final assistant turn only (the SFT stage's completion loss); a ``text``
    row with every token labeled and EOS appended (pretraining). Rows are cut at ``max_length`` tokens."""
    examples = []
    for row in rows:
        if row.get("messages"):
            tools = row.get("tools")  # a tool conversation: rendered with its schemas, as SFT renders it
            tools = json.loads(tools) if isinstance(tools, str) else tools
            prompt, reply = split_reply(
                tokenizer, row["messages"], tools
            )  # as the DPO evidence splits a reply off
            ids, labels = prompt + reply, [IGNORE] * len(prompt) + reply
        else:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            labels = list(ids)
        examples.append((ids[:max_length], labels[:max_length]))
    return examples


def collate(examples: list[tuple[list[int], list[int]]], pad_token_id: int) -> PTXBatch:
    width = max(len(ids) for ids, _ in examples)
    batch = PTXBatch(
        torch.full((len(examples), width), pad_token_id, dtype=torch.long),
        torch.zeros((len(examples), width), dtype=torch.long),
        torch.full((len(examples), width), IGNORE, dtype=torch.long),
    )
    for row, (ids, labels) in enumerate(examples):
        batch.input_ids[row, : len(ids)] = torch.tensor(ids)
        batch.attention_mask[row, : len(ids)] = 1
        batch.labels[row, : len(labels)] = torch.tensor(labels)
    return batch


def ptx_rows(n: int, size: int, step: int, updates: int, update: int, rank: int, world: int, seed: int):
    """The ptx rows of update ``update`` (of ``updates``) in iteration ``step`` on process ``rank``: consecutive
    slices of one seeded pass over the data after another (``batch_rows``), so every row is used before any
    repeats; a pure function of its arguments (exact resume)."""
    position = (step * updates + update) * world + rank
    return batch_rows(n, size, position, seed + 7919)  # another permutation than the prompts'


def ptx_loss_sum(model, batch: PTXBatch) -> torch.Tensor:
    """The summed negative log-likelihood of the labeled next tokens (divide by the tokens for the mean)."""
    device = next(model.parameters()).device
    logits = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    ).logits
    targets = batch.labels[:, 1:].to(device)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )

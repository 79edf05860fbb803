"""How likely a causal LM finds whole replies: the preference evidence of the DPO stage (of two replies to the
same prompt, does the model put more probability on the chosen one?).

A reply's log-likelihood is the sum of its tokens' log-probs after the prompt rendered with the chat template
(the assistant's turn opened), up to and including its end-of-turn token: what DPO's loss compares.
"""

from __future__ import annotations

import torch

from gptpipe.data.chat_templates import split_reply
from gptpipe.errors import UserError
from gptpipe.ppo.rollout import Rollout, left_pad, reference_context, response_logprobs
from gptpipe.scoring import rank_agreement


@torch.no_grad()
def reply_logprobs(model, pieces: list[tuple[list[int], list[int]]], pad_token_id: int, batch_size: int = 64):
    """Each (prompt ids, reply ids)'s summed reply log-prob under ``model``."""
    device = next(model.parameters()).device
    sums: list[float] = []
    for i in range(0, len(pieces), batch_size):
        batch = pieces[i : i + batch_size]
        prompt_ids, prompt_mask = left_pad([p for p, _ in batch], pad_token_id)
        width = max(max(len(r) for _, r in batch), 1)  # a reply cut away entirely: one masked token
        replies = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        reply_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, reply) in enumerate(batch):
            replies[row, : len(reply)] = torch.tensor(reply)
            reply_mask[row, : len(reply)] = 1
        rollout = Rollout(
            input_ids=torch.cat([prompt_ids, replies], dim=1).to(device),
            attention_mask=torch.cat([prompt_mask, reply_mask], dim=1).to(device),
            response_mask=reply_mask.to(device),
            ended=torch.ones(len(batch), dtype=torch.bool, device=device),
            prompt_length=prompt_ids.shape[1],
        )
        logprobs, _ = response_logprobs(model, rollout)
        sums += logprobs.sum(dim=1).tolist()
    return sums


def reply_pieces(
    tokenizer, conversations, max_length: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """Each conversation's (prompt ids, last reply ids); with ``max_length``, the two cut to that many tokens
    keeping the start, as TRL's trainers cut them (a reply may be cut away entirely: TRL drops those rows)."""
    pieces = [split_reply(tokenizer, c) for c in conversations]
    if max_length is None:
        return pieces
    return [(p[:max_length], r[: max(max_length - len(p), 0)]) for p, r in pieces]


def implicit_rewards(model, reference, tokenizer, pieces, beta: float) -> tuple[list[float], list[float]]:
    """Each (prompt ids, reply ids): (the reply's log-likelihood under ``model``, DPO's implicit reward
    ``beta * (log model - log reference)``). ``reference=None``: ``model`` with its LoRA adapter disabled."""
    was_training = model.training
    model.eval()
    ours = reply_logprobs(model, pieces, tokenizer.pad_token_id)
    with reference_context(model, reference) as frozen:
        theirs = reply_logprobs(frozen, pieces, tokenizer.pad_token_id)
    model.train(was_training)
    return ours, [beta * (a - b) for a, b in zip(ours, theirs, strict=True)]


def _measurable(kept: list[int], what: str, max_length) -> list[int]:
    if not kept:
        raise UserError(
            f"held-out {what}: every one is longer than max_length ({max_length}) before its reply starts, so "
            "none can be measured (TRL drops such rows from training too); raise max_length"
        )
    return kept


def preference_accuracy(
    model, reference, tokenizer, pairs, beta: float, max_length: int | None = None
) -> dict:
    """Over ``pairs`` (rows of ``chosen`` / ``rejected`` conversations):

    - ``preference_accuracy``, ``preference_margin``: the share where ``model`` finds the chosen reply more
      likely than the rejected one, and the mean log-likelihood margin;
    - ``implicit_reward_accuracy``, ``implicit_reward_margin``: the same by DPO's implicit reward,
      ``beta * (log model - log reference)`` of each reply (ties count half: a model equal to its reference
      scores 0.5, chance).

    ``reference=None``: ``model`` is a LoRA model whose reference is itself with the adapter disabled. A pair
    whose reply ``max_length`` cuts away entirely is left out, as TRL leaves it out of training.
    """
    chosen = reply_pieces(tokenizer, pairs["chosen"], max_length)
    rejected = reply_pieces(tokenizer, pairs["rejected"], max_length)
    kept = [i for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)) if c[1] and r[1]]
    kept = _measurable(kept, "pairs", max_length)
    n = len(kept)
    ours, rewards = implicit_rewards(
        model, reference, tokenizer, [chosen[i] for i in kept] + [rejected[i] for i in kept], beta
    )
    likelihood = [c - r for c, r in zip(ours[:n], ours[n:], strict=True)]
    implicit = [c - r for c, r in zip(rewards[:n], rewards[n:], strict=True)]

    def share(margins: list[float]) -> float:
        return sum((m > 0) + 0.5 * (m == 0) for m in margins) / len(margins)

    return {
        "preference_accuracy": share(likelihood),
        "preference_margin": sum(likelihood) / n,
        "implicit_reward_accuracy": share(implicit),
        "implicit_reward_margin": sum(implicit) / n,
    }


def label_accuracy(model, reference, tokenizer, rows, beta: float, max_length: int | None = None) -> dict:
    """Over unpaired ``rows`` (``prompt``, ``completion`` as messages, ``label``: desirable): how often a desirable
    reply gets a higher implicit reward ``beta * (log model - log reference)`` than an undesirable one, over every
    such pair of replies (ties half: 0.5 for a model equal to its reference; threshold-free, as KTO's own
    reference point moves), and the mean reward of desirable and of undesirable replies."""
    conversations = [p + c for p, c in zip(rows["prompt"], rows["completion"], strict=True)]
    pieces = reply_pieces(tokenizer, conversations, max_length)
    kept = _measurable([i for i, (_, r) in enumerate(pieces) if r], "replies", max_length)
    _, rewards = implicit_rewards(model, reference, tokenizer, [pieces[i] for i in kept], beta)
    labels = [rows["label"][i] for i in kept]
    good = [r for r, label in zip(rewards, labels, strict=True) if label]
    bad = [r for r, label in zip(rewards, labels, strict=True) if not label]
    return {
        "implicit_reward_ranking": rank_agreement(list(zip(rewards, labels, strict=True))),
        "desirable_reward": sum(good) / max(len(good), 1),
        "undesirable_reward": sum(bad) / max(len(bad), 1),
    }

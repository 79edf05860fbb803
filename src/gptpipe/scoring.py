"""Reward-model scores: batched scoring of token sequences, pairwise accuracy, the `score` command."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptpipe.data.preferences import convert_pairs, tokenize_pairs
from gptpipe.errors import UserError
from gptpipe.modeling import load_for_inference


@torch.no_grad()
def score_ids(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 64) -> list[float]:
    """The model's scalar score of each token sequence (right-padded batches; the head reads the last real token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i : i + batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, seq in enumerate(chunk):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scores += logits[:, 0].float().cpu().tolist()
    finally:
        model.train(was_training)
    return scores


def pairwise(model, pairs, pad_token_id: int, batch_size: int = 64) -> dict:
    """Accuracy (chosen scored strictly higher) and mean margin over tokenized pairs."""
    chosen = score_ids(model, pairs["chosen_ids"], pad_token_id, batch_size)
    rejected = score_ids(model, pairs["rejected_ids"], pad_token_id, batch_size)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "mean_reward_chosen": sum(chosen) / len(chosen),
        "mean_reward_rejected": sum(rejected) / len(rejected),
        "pairs": len(margins),
        "scores_chosen_head": chosen[:8],  # kept to check that a reloaded model scores the same
    }


def read_rows(path: str | Path) -> list:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    text = path.read_text()
    try:
        return (
            json.loads(text)
            if path.suffix == ".json"
            else [json.loads(x) for x in text.splitlines() if x.strip()]
        )
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def score_pairs_file(
    model_dir: str | Path, path: str | Path, fmt: str | None = None, max_length: int | None = None
) -> dict:
    """Pairwise accuracy of a reward model on any preference file."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = load_for_inference(model_dir, AutoModelForSequenceClassification)
    pairs = convert_pairs(Dataset.from_list(read_rows(path)), fmt, str(path), invalid="drop")
    pairs = tokenize_pairs(pairs, tokenizer, max_length)
    return pairwise(model, pairs, tokenizer.pad_token_id)


def score_texts_file(model_dir: str | Path, path: str | Path) -> list[dict]:
    """Scores of rows holding ``messages`` (a conversation) or ``text`` (rendered as is)."""
    from transformers import AutoModelForSequenceClassification

    model, tokenizer = load_for_inference(model_dir, AutoModelForSequenceClassification)
    rows = read_rows(path)
    sequences = []
    for i, row in enumerate(rows):
        row = {"text": row} if isinstance(row, str) else row
        if isinstance(row.get("messages"), list):
            sequences.append(
                tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
            )
        elif isinstance(row.get("text"), str):
            sequences.append(tokenizer(row["text"])["input_ids"])
        else:
            raise UserError(f"{path}: row {i}: expected a 'messages' list or a 'text' string")
    scores = score_ids(model, sequences, tokenizer.pad_token_id)
    return [{"row": i, "score": s} for i, s in enumerate(scores)]


def rank_agreement(judged: list[tuple[float, bool]]) -> float | None:
    """Over (score, right) items: how often a right one scores above a wrong one, over every (right, wrong) pair
    (ties count half: the AUC); None unless there are both. The reward model's agreement with the answer check
    (gptpipe.rlhf), KTO's ranking of desirable over undesirable replies (gptpipe.likelihood)."""
    right = [s for s, ok in judged if ok]
    wrong = [s for s, ok in judged if not ok]
    if not right or not wrong:
        return None
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return wins / (len(right) * len(wrong))

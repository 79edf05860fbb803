"""Probe a tiny-world reward model on the held-out RL prompts: for each prompt, does it score the reference reply
("Pezu lives in Cairo.") above a wrong value in the same form, the right value without the subject, another
attribute of the same person, the same attribute of another person, and garbage? Prints the share of prompts
where the reference wins, per kind of reply. A minute on a CPU: the cheap check of a reward-model change before
running PPO (docs/rl.md, issue #31).

    python scripts/reward_probe.py runs/tiny/reward/final [more reward model folders]
"""

from __future__ import annotations

import argparse
import random
from collections import Counter, defaultdict

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from gptpipe.data.tinyworld import generate

GARBAGE = "plus Pean is a nurse."  # what the SFT model says to most prompts of the new phrasing


def others(row: dict, rows: list[dict], values: dict, by_subject: dict, rng: random.Random) -> dict[str, str]:
    """The replies the reference must beat, by kind."""
    reference, value = row["reference"], row["answer"]
    wrong = rng.choice(sorted(values[row["kind"]] - {value}))
    at = reference.rindex(value)  # after "Pezu lives in ", "1 plus 4 is "
    replies = {"wrong value": reference[:at] + wrong + reference[at + len(value) :]}
    if row["kind"] != "sum":
        subject, rest = reference.split(" ", 1)
        replies["no subject"] = rest
        attributes = [r for r in by_subject[subject] if r["kind"] != row["kind"]]
        if attributes:
            replies["other attribute"] = rng.choice(attributes)["reference"]
        people = [r for r in rows if r["kind"] == row["kind"] and r["reference"].split()[0] != subject]
        replies["other person"] = rng.choice(people)["reference"]  # "Mobo lives in Cairo.", asked Pezu's city
    replies["garbage"] = GARBAGE
    return replies


def probe(folder: str, rows: list[dict]) -> dict[str, float]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()

    def score(prompt: list[dict], reply: str) -> float:
        messages = prompt + [{"role": "assistant", "content": reply}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, 0].item()

    values: dict[str, set] = defaultdict(set)
    by_subject: dict[str, list] = defaultdict(list)
    for row in rows:
        values[row["kind"]].add(row["answer"])
        if row["kind"] != "sum":
            by_subject[row["reference"].split()[0]].append(row)
    rng, wins, counts = random.Random(0), Counter(), Counter()
    for row in rows:
        best = score(row["prompt"], row["reference"])
        for kind, reply in others(row, rows, values, by_subject, rng).items():
            counts[kind] += 1
            wins[kind] += best > score(row["prompt"], reply)
    shares = {kind: wins[kind] / counts[kind] for kind in counts}
    shares["all"] = sum(wins.values()) / sum(counts.values())
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="reward model folders (a reward run's final/)")
    parser.add_argument("--split", default="eval", help="the tinyworld:rl_prompts split (default: eval)")
    args = parser.parse_args()
    rows = generate()["rl_prompts"][args.split]
    for folder in args.folders:
        shares = probe(folder, rows)
        print(folder, "  ".join(f"{kind} {share:.2f}" for kind, share in shares.items()))


if __name__ == "__main__":
    main()

"""On-policy comparisons: a model's own samples (``gptpipe generate``) ranked into reward-model data.

InstructGPT's reward data are comparisons among the SFT model's own samples: judging which of a few answers is
better is easier than writing the best one. ``rank_samples`` groups sampled rows by prompt ``id`` and orders
each group by a labeler or by human rankings, writing the ``ranked`` preference format (``prompt``,
``responses`` best to worst, with a scoring labeler their ``scores``) that the reward stage reads and expands
into pairs.

- A labeler is a Python callable named ``module:function`` or ``path/to/file.py:function`` (loaded by
  ``gptpipe.plugins.import_callable``, as reward functions and tools are). It is called once per prompt with that
  prompt's sample rows (``prompt``, ``completion``, ``sample`` and the prompt file's other fields, e.g.
  ``answer``) and returns a score per sample (higher is better) or ``{"ranking": [sample numbers, best first]}``.
- Human rankings: a jsonl file of ``{"id": ..., "ranking": [sample numbers, best first]}``; prompts without a
  row are left out.

Every distinct sample text is kept (InstructGPT compares all K-choose-2 pairs of its K ranked samples); samples
that tie (equal scores) are never compared with each other (``scores`` says which), so every pair the reward
model sees has a real winner: with 32 samples of a prompt, 3 right and 20 distinct wrong ones give 60 pairs,
where one sample per score gave 1. Repeated texts count once. A prompt left with fewer than two scores is
dropped (counted).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from gptpipe.errors import UserError

Labeler = Callable[[list[dict]], list[float] | dict]


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {i + 1}: not valid JSON ({e})") from None
    return rows


def read_rankings(path: str | Path) -> dict:
    """{prompt id: [sample numbers, best first]} from a jsonl file of human rankings."""
    out = {}
    for i, row in enumerate(read_jsonl(path, "rankings")):
        if "id" not in row or not isinstance(row.get("ranking"), list):
            raise UserError(
                f"{path}: row {i}: expected {{'id': ..., 'ranking': [sample numbers, best first]}}"
            )
        out[row["id"]] = row["ranking"]
    return out


def group_by_prompt(samples: list[dict]) -> dict:
    groups: dict = {}
    for i, row in enumerate(samples):
        missing = [k for k in ("id", "prompt", "completion") if k not in row]
        if missing:
            raise UserError(
                f"samples: row {i}: no {missing[0]!r} field (rows as `gptpipe generate` writes them)"
            )
        groups.setdefault(_key(row["id"]), []).append(row)
    return groups


def _key(value):
    return json.dumps(value) if isinstance(value, list | dict) else value


def order_group(
    rows: list[dict], labeler: Labeler | None, ranking: list | None, where: str
) -> tuple[list[dict], list[float] | None]:
    """(the group's distinct samples best first, their scores): with a scoring labeler every distinct text and its
    score (ties kept, to be compared with no one of the same score); with a ranking its samples in order and no
    scores (each better than the next)."""
    if labeler is not None:
        result = labeler(rows)
        if isinstance(result, dict):
            ranking = result.get("ranking")
        else:
            scores = [float(s) for s in result]
            if len(scores) != len(rows):
                raise UserError(f"{where}: the labeler returned {len(scores)} scores for {len(rows)} samples")
            best_first = sorted(range(len(rows)), key=lambda i: -scores[i])  # stable: first sample first
            kept = _distinct_texts([{**rows[i], "score": scores[i]} for i in best_first])
            return kept, [r["score"] for r in kept]
    by_sample = {row.get("sample", i): row for i, row in enumerate(rows)}
    unknown = [s for s in ranking or [] if s not in by_sample]
    if unknown:
        raise UserError(f"{where}: ranking names sample {unknown[0]!r}, which the samples do not have")
    return _distinct_texts([by_sample[s] for s in ranking or []]), None


def _distinct_texts(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        text = row["completion"].strip()
        if text and text not in seen:
            seen.add(text)
            out.append(row)
    return out


def written_replies(
    samples: list[dict], column: str, number: int, others: int = 0, seed: int = 0
) -> list[dict]:
    """Each prompt's written reply (its row's ``column``) as one more sample of that prompt, numbered ``number``
    (a human ranking names it so): a copy of the prompt's first sample with that reply as its completion. With
    ``others``, that many other prompts' written replies too (drawn with ``seed``, numbered ``number + 1`` on):
    fluent answers to another question, which the labeler scores as it scores any sample."""
    firsts = [rows[0] for rows in group_by_prompt(samples).values()]
    for row in firsts:
        reply = row.get(column)
        if not isinstance(reply, str) or not reply.strip():
            raise UserError(
                f"reference_column: prompt {row['id']!r} has no written reply in {column!r} "
                f"(got {reply!r}); every prompt needs one"
            )
    if others >= len(firsts):
        raise UserError(
            f"other_references: {others} other prompts' replies asked for, but there are {len(firsts)} prompts; "
            f"give at most {len(firsts) - 1}"
        )
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(firsts):
        # any prompt but i: sampled from a range (O(others)), not a list of every other prompt
        drawn = [j + (j >= i) for j in rng.sample(range(len(firsts) - 1), others)]
        replies = [row[column]] + [firsts[j][column] for j in drawn]
        out += [{**row, "completion": reply, "sample": number + k} for k, reply in enumerate(replies)]
    return out


def rank_samples(
    samples: list[dict], labeler: Labeler | None = None, rankings: dict | None = None
) -> tuple[list, dict]:
    """``ranked`` rows ({id, prompt, responses}) and counts: prompts, kept, dropped, pairs."""
    if (labeler is None) == (rankings is None):
        raise UserError(
            "rank: give either a labeler (module:function) or a rankings file, not both or neither"
        )
    ranked, stats = [], {"prompts": 0, "kept": 0, "dropped_fewer_than_two": 0, "unranked": 0, "pairs": 0}
    for key, rows in group_by_prompt(samples).items():
        stats["prompts"] += 1
        if rankings is not None and rows[0]["id"] not in rankings:
            stats["unranked"] += 1
            continue
        ordered, scores = order_group(rows, labeler, rankings and rankings[rows[0]["id"]], f"prompt {key}")
        pairs = (
            len(ordered) * (len(ordered) - 1) // 2
            if scores is None
            else sum(a > b for i, a in enumerate(scores) for b in scores[i + 1 :])
        )
        if pairs == 0:
            stats["dropped_fewer_than_two"] += 1
            continue
        stats["kept"] += 1
        stats["pairs"] += pairs
        row = {
            "id": rows[0]["id"],
            "prompt": rows[0]["prompt"],
            "responses": [r["completion"].strip() for r in ordered],
        }
        ranked.append(row if scores is None else {**row, "scores": scores})
    return ranked, stats


def best_samples(
    samples: list[dict], labeler: Labeler | None, rankings: dict | None, min_score: float | None = None
) -> list[dict]:
    """Rejection sampling: each prompt's best sample as an SFT conversation (``{"messages": prompt + reply}``).
    With a labeler that scores, the first sample of the top score, kept when that score is at least
    ``min_score``; with a ranking (the labeler's or people's), its first sample. Prompts whose best reply is
    empty, or that nobody ranked, give none."""
    best = []
    for key, rows in group_by_prompt(samples).items():
        if rankings is not None and rows[0]["id"] not in rankings:
            continue
        top = None
        result = labeler(rows) if labeler is not None else None
        if result is not None and not isinstance(result, dict):
            scores = [float(s) for s in result]
            i = max(range(len(rows)), key=lambda j: scores[j])  # the first of the top score
            top = rows[i] if min_score is None or scores[i] >= min_score else None
        else:
            ordered, _ = order_group(rows, labeler, rankings and rankings[rows[0]["id"]], f"prompt {key}")
            top = ordered[0] if ordered else None
        if top is not None and top["completion"].strip():
            best.append(
                {
                    "messages": [
                        *rows[0]["prompt"],
                        {"role": "assistant", "content": top["completion"].strip()},
                    ]
                }
            )
    return best


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path

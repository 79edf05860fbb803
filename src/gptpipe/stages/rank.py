"""Rank stage: on-policy comparisons for the reward model, from the SFT model's own samples.

    gptpipe train recipes/tiny/rank.yaml
    gptpipe pipeline recipes/tiny/pipeline.yaml   # make demo: sft -> rank -> reward -> rl

For each prompt of ``datasets`` the model samples ``num_samples`` answers (``gptpipe generate``), which a
labeler (``labeler: module:function``) or a file of human rankings (``rankings:``) orders best to worst
(``gptpipe.data.ranking``). ``final/comparisons.jsonl`` holds them in the ``ranked`` format; ``final/samples.jsonl``
every sample. With ``reference_column``, each training prompt's written reply (that column of the prompt
data, a demonstration) is ranked beside its samples as one more candidate: the reward model learns the reply the
policy should write against the ones it does write, also on prompts where no sample is right; with
``other_references: N``, N other prompts' written replies are ranked too (fluent, but answers to another
question: a reply about someone else, which no sample of the SFT model shows the reward model). In a pipeline
the reward stage after this one trains on them. With ``eval_datasets``, held-out
prompts are sampled and ranked the same way into ``final/heldout_comparisons.jsonl``; the pipeline's report card
scores every reward model of its run folder on them (how well each judges the model's own samples).
``final/best.jsonl`` holds each prompt's best sample as an SFT conversation (rejection sampling; with a labeler,
when it scored at least ``min_score``): an SFT stage after this one can train on it next to the demonstrations
(``recipes/tiny/pipeline-rejection.yaml``).

Evidence (``eval.json``): prompts kept and dropped (all samples tied), pairs, the share of samples the labeler
put at the top score, and the mean number of distinct responses per kept prompt.
"""

from __future__ import annotations

from pathlib import Path

from gptpipe.config import RankConfig
from gptpipe.data import ranking
from gptpipe.data.sources import load_train_eval
from gptpipe.errors import UserError
from gptpipe.plugins import import_callable
from gptpipe.replies import generate_file
from gptpipe.rlhf import prompt_rows
from gptpipe.runs import Run


def main(cfg: RankConfig, run: Run) -> dict:
    if not cfg.model.name_or_path:
        raise UserError(
            "model.name_or_path is required: the model whose samples are compared (the sft stage's final/)"
        )
    if (cfg.labeler is None) == (cfg.rankings is None):
        raise UserError("set exactly one of labeler: (module:function) and rankings: (a jsonl file)")
    labeler = import_callable(cfg.labeler, "labeler") if cfg.labeler else None  # fail before sampling
    human = ranking.read_rankings(cfg.rankings) if cfg.rankings else None
    if cfg.other_references < 0 or (cfg.other_references and not cfg.reference_column):
        raise UserError(
            f"other_references: {cfg.other_references}: a count of other prompts' written replies (0 or more), "
            "with reference_column naming the column that holds them"
        )
    prompts, heldout = load_train_eval(cfg, [], seed=cfg.seed, prepare=prompt_rows)
    if cfg.reference_column and cfg.reference_column not in prompts.column_names:
        raise UserError(
            f"reference_column: {cfg.reference_column!r}: the prompts have no such column (they have "
            f"{prompts.column_names}); name the column that holds each prompt's written reply, or leave it out"
        )
    if cfg.max_prompts:
        prompts = prompts.select(range(min(cfg.max_prompts, len(prompts))))
    tmp = run.final_dir()
    samples, ranked, stats = _sample_and_rank(cfg, prompts, tmp, "", labeler, human)
    best = ranking.best_samples(samples, labeler, human, cfg.min_score)  # rejection sampling, for SFT
    ranking.write_jsonl(best, tmp / "best.jsonl")
    if not ranked:
        raise UserError(
            f"no comparisons: all {stats['prompts']} prompts' samples tied or were unranked; sample more "
            "(num_samples), at a higher temperature, or check the labeler"
        )
    heldout_stats = {}
    if heldout is not None:  # the same on held-out prompts: a yardstick of judging the model's own samples
        _, held, heldout_stats = _sample_and_rank(cfg, heldout, tmp, "heldout_", labeler, human)
        if not held:  # a reward stage after this one would find no held-out comparisons to be judged on
            raise UserError(
                f"eval_datasets: no held-out comparisons: all {heldout_stats['prompts']} held-out prompts' samples "
                "tied or were unranked; give more held-out prompts, sample more (num_samples) or at a higher "
                "temperature"
            )
    evidence = {
        **stats,
        "samples": len(samples),
        "best_samples": len(best),
        "responses_per_prompt": sum(len(r["responses"]) for r in ranked) / len(ranked),
        **{f"heldout_{k}": v for k, v in heldout_stats.items() if k in ("prompts", "kept", "pairs")},
        "seconds": run.seconds(),
    }
    if labeler is not None:
        evidence["top_score_share"] = _top_score_share(samples, labeler)
    final = run.publish(tmp, evidence)
    print(
        f"[rank] {stats['kept']} of {stats['prompts']} prompts ranked ({stats['dropped_fewer_than_two']} all tied, "
        f"{stats['unranked']} unranked): {stats['pairs']} pairs -> {final / 'comparisons.jsonl'}"
    )
    return evidence


def _sample_and_rank(cfg: RankConfig, prompts, tmp: Path, prefix: str, labeler, human):
    """Sample ``num_samples`` answers per prompt into ``<prefix>samples.jsonl`` and rank them into
    ``<prefix>comparisons.jsonl``; returns (samples, ranked rows, counts). Held-out prompt ids are "eval-N"."""
    ids = [f"eval-{i}" if prefix else i for i in range(len(prompts))]
    prompt_file = tmp / f"{prefix}prompts.jsonl"
    ranking.write_jsonl([{"id": pid, **row} for pid, row in zip(ids, prompts, strict=True)], prompt_file)
    print(f"[rank] sampling {cfg.num_samples} answers to each of {len(prompts)} {prefix}prompts")
    generate_file(
        cfg.model.name_or_path,
        prompt_file,
        tmp / f"{prefix}samples.jsonl",
        num_samples=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
    )
    samples = ranking.read_jsonl(tmp / f"{prefix}samples.jsonl", "samples")
    candidates = samples
    if cfg.reference_column and not prefix:  # held out: the model's own samples alone, the yardstick
        candidates = samples + ranking.written_replies(
            samples, cfg.reference_column, cfg.num_samples, cfg.other_references, cfg.seed
        )
    ranked, stats = ranking.rank_samples(candidates, labeler, human)
    if ranked:
        ranking.write_jsonl(ranked, tmp / f"{prefix}comparisons.jsonl")
    return samples, ranked, stats


def _top_score_share(samples: list[dict], labeler) -> float:
    """The share of samples that got the best score any sample of the same prompt could get (its group's max
    over all groups' maximum): how often the policy already writes the best answer."""
    groups = ranking.group_by_prompt(samples)
    scores = [float(s) for rows in groups.values() for s in _scores(labeler(rows))]
    best = max(scores)
    return sum(s == best for s in scores) / len(scores)


def _scores(result) -> list:
    return [] if isinstance(result, dict) else list(result)

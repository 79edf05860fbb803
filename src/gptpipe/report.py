"""Reports: every run folder explains itself, and a pipeline gets one report card.

``write_run_report(run_dir)`` reads what every stage already writes (``eval.json``, ``metrics.jsonl``,
``config.yaml``) and adds ``report.md`` and ``plots/*.png``: the evidence table (each ``X_before`` /
``X_after`` pair of eval.json as one row) and a curve for each metric logged over training steps. The
CLI calls it once after any stage finishes, so no stage carries report code.

``report_card(stages)`` is the pipeline's table: one row per stage with the metric that proves the
stage did its job (``HEADLINES``), before and after.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from gptpipe.files import redact
from gptpipe.tool_use import (
    TOOL_KEYS,
)  # with tools: answers with them and without, valid calls, calls per answer
from gptpipe.tracking import read_metrics

# Every stage after SFT: the new skill, what it had to keep, the skill in a phrasing no training data has.
WHOLE_ASSISTANT = ["answer_accuracy", "retained_answer_accuracy", "generalization_answer_accuracy"]
# Per stage, the evidence that proves it did its job (eval.json keys without _before/_after), in order.
HEADLINES = {
    "tokenizer": ["bytes_per_token", "roundtrip_lossless", "vocab_size"],
    "pretrain": ["perplexity", "probe_accuracy"],
    "sft": [
        "answer_accuracy",
        "exact_match",
        "eval_loss",
        *TOOL_KEYS,
        "tools_shown_answer_accuracy",
        "generalization_answer_accuracy",
    ],
    "rank": ["pairs", "kept", "top_score_share"],
    "reward": ["pairwise_accuracy"],
    "rl": ["reward", "kl", *WHOLE_ASSISTANT, "rm_agreement", *TOOL_KEYS],
    "dpo": ["implicit_reward_accuracy", "preference_accuracy", "kl", *WHOLE_ASSISTANT],
    "kto": ["implicit_reward_ranking", "implicit_reward_accuracy", "kl", *WHOLE_ASSISTANT],
    "distill": [*WHOLE_ASSISTANT, "teacher_answer_accuracy", "kl"],
}
# Logged keys that are bookkeeping rather than learning curves.
NOT_PLOTTED = ("step", "epoch", "runtime", "per_second", "model_preparation_time", "num_tokens", "total_flos")


def evidence_rows(evidence: dict) -> list[tuple[str, object, object]]:
    """(metric, before, after): a row per ``X_before``/``X_after`` pair, then one per other scalar (after only)."""
    rows, seen = [], set()
    for key in evidence:
        if key.endswith("_before") and f"{key[:-7]}_after" in evidence:
            name = key[:-7]
            rows.append((name, evidence[key], evidence[f"{name}_after"]))
            seen |= {key, f"{name}_after"}
    for key, value in evidence.items():
        if key not in seen and isinstance(value, (int, float, str, bool)):
            rows.append((key, None, value))
    return rows


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def curves(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Each numeric key logged at two or more steps: its (step, value) points."""
    found: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        for key, value in r.items():
            if any(word in key for word in NOT_PLOTTED) or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value) and "step" in r:
                found.setdefault(key, []).append((r["step"], value))
    return {k: v for k, v in found.items() if len(v) >= 2}


def plot_curves(series: dict[str, list[tuple[float, float]]], folder: Path) -> list[Path]:
    if not series:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, points in series.items():
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = folder / f"{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def plot_reward_vs_accuracy(records: list[dict], folder: Path) -> list[Path]:
    """plots/reward_vs_accuracy.png: the watched evaluations' reward and answer accuracy on one step axis (two
    scales), the reward-hacking alarms marked; nothing without them (``eval_steps``)."""
    watched = [r for r in records if "eval/reward" in r and "eval/answer_accuracy" in r]
    if len(watched) < 2:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in watched]
    fig, reward_axis = plt.subplots(figsize=(6, 3.5))
    reward_axis.plot(steps, [r["eval/reward"] for r in watched], color="tab:blue", marker=".")
    reward_axis.set_xlabel("step")
    reward_axis.set_ylabel("reward (trained on)", color="tab:blue")
    accuracy_axis = reward_axis.twinx()
    accuracy_axis.plot(steps, [r["eval/answer_accuracy"] for r in watched], color="tab:green", marker=".")
    if any("eval/rm_agreement" in r for r in watched):
        agreed = [(r["step"], r["eval/rm_agreement"]) for r in watched if "eval/rm_agreement" in r]
        accuracy_axis.plot(
            *zip(*agreed, strict=True), color="tab:olive", linestyle="--", label="RM agreement"
        )
        accuracy_axis.legend(loc="lower right", fontsize=7)
    accuracy_axis.set_ylabel("answer accuracy (checked)", color="tab:green")
    for r in watched:
        if r.get("reward_hacking"):
            reward_axis.axvline(r["step"], color="tab:red", alpha=0.5)
    reward_axis.set_title("watched prompts: reward vs accuracy (red: reward-hacking alarm)", fontsize=9)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reward_vs_accuracy.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def write_run_report(run_dir: str | Path) -> Path | None:
    """``report.md`` and ``plots/`` for a finished run folder (None when it has no eval.json)."""
    run_dir = Path(run_dir)
    evidence_path = run_dir / "eval.json"
    if not evidence_path.is_file():
        return None
    evidence = json.loads(evidence_path.read_text())
    config = _read_config(run_dir)
    stage = config.get("stage", "?")
    lines = [f"# {stage} run: {run_dir}", "", "## Evidence (eval.json)", "", "| metric | before | after |"]
    lines += ["| --- | --- | --- |"]
    lines += [f"| {name} | {fmt(b)} | {fmt(a)} |" for name, b, a in evidence_rows(evidence)]
    records = read_metrics(run_dir)
    plots = plot_curves(curves(records), run_dir / "plots") + plot_reward_vs_accuracy(
        records, run_dir / "plots"
    )
    if plots:
        lines += ["", "## Training curves (metrics.jsonl)", ""]
        lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    lines += [
        "",
        "The resolved settings are in `config.yaml`; `gptpipe train config.yaml` repeats the run.",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text(redact("\n".join(lines)))
    return path


def headline(stage: str, evidence: dict) -> list[tuple[str, object, object]]:
    """The rows of the report card for one stage: its headline metrics, before and after."""
    rows = {name: (name, b, a) for name, b, a in evidence_rows(evidence)}
    return [rows[k] for k in HEADLINES.get(stage, []) if k in rows]


def benchmark_scores(run_dir: Path) -> dict:
    """The lm-evaluation-harness scores in a run folder (``eval-*.json``, ``gptpipe eval``): {task: {metric:
    value}}, standard errors left out."""
    scores: dict = {}
    for path in sorted(Path(run_dir).glob("eval-*.json")):
        for task, metrics in (json.loads(path.read_text()).get("results") or {}).items():
            kept = {k: v for k, v in metrics.items() if not k.endswith("_stderr") and k != "sample_len"}
            scores.setdefault(task, {}).update(kept)
    return scores


def report_card(stages: list[tuple[str, str, Path]]) -> str:
    """Markdown table for a pipeline: (name, stage kind, run folder) per stage, in order."""
    lines = ["| stage | evidence | before | after | time (s) |", "| --- | --- | --- | --- | --- |"]
    for name, kind, run_dir in stages:
        path = run_dir / "eval.json"
        if not path.is_file():
            lines.append(f"| {name} | not run | | | |")
            continue
        evidence = json.loads(path.read_text())
        seconds = fmt(evidence.get("seconds"))
        rows = headline(kind, evidence) or [("(see eval.json)", None, None)]
        rows += [
            (f"lm-eval {task} {metric}", None, value)
            for task, metrics in benchmark_scores(run_dir).items()
            for metric, value in metrics.items()
        ]
        for i, (metric, before, after) in enumerate(rows):
            lines.append(
                f"| {name if i == 0 else ''} | {metric} | {fmt(before)} | {fmt(after)} | {seconds if i == 0 else ''} |"
            )
    return "\n".join(lines)


# The stages judged as a whole assistant: everything after SFT that changes the policy.
POLICY_STAGES = ("rl", "dpo", "kto", "distill")
TAX_TOLERANCE = 0.03  # retained accuracy may fall this much (about 2 of SFT's 78 held-out questions) and still count as kept


def assistant_verdicts(stages: list[tuple[str, str, Path]]) -> str:
    """One plain line per finished stage after SFT that checked answers: did it make a better assistant as a
    whole (the new skill rose and what it had to keep stayed within ``TAX_TOLERANCE``), and if not, why (from
    its evidence and what its reward was)."""
    lines = []
    for name, kind, run_dir in stages:
        path = run_dir / "eval.json"
        if not path.is_file() or kind not in (*POLICY_STAGES, "sft"):
            continue
        e, config = json.loads(path.read_text()), _read_config(run_dir)
        if kind == "sft":  # an SFT that teaches tool use after SFT: judged as a whole assistant too
            e = _tool_sft_as_assistant(e)
        if "answer_accuracy_after" not in e:
            continue
        lines.append(f"- **{name}**: {_verdict(e, config, kind)}")
    if not lines:
        return ""
    return (
        "Did each stage make a better assistant (new skill up; retained skills within "
        f"{TAX_TOLERANCE}; unseen phrasing shown)?\n\n" + "\n".join(lines)
    )


def _tool_sft_as_assistant(e: dict) -> dict:
    """A tool SFT's evidence in the whole assistant's terms: the new skill is answering with the tools, what it
    had to keep is SFT's answers (``answer_datasets``); {} for an SFT without tool evidence (the first SFT)."""
    if "tool_answer_accuracy_after" not in e or "answer_accuracy_after" not in e:
        return {}
    found = {}
    # what it had to keep, asked as RL asks it (the tools shown) when measured so, else without the tools
    kept = "tools_shown_answer_accuracy" if "tools_shown_answer_accuracy_after" in e else "answer_accuracy"
    for key, as_key in (
        ("tool_answer_accuracy", "answer_accuracy"),
        ("tool_questions", "answer_prompts"),
        (kept, "retained_answer_accuracy"),
        ("generalization_answer_accuracy", "generalization_answer_accuracy"),
    ):
        for when in ("before", "after"):
            if f"{key}_{when}" in e:
                found[f"{as_key}_{when}"] = e[f"{key}_{when}"]
    return found


def _moved(e: dict, key: str, label: str) -> str:
    if f"{key}_before" not in e:
        return ""
    return f"; {label} {fmt(e[f'{key}_before'])} -> {fmt(e[f'{key}_after'])}"


def _verdict(e: dict, config: dict, kind: str = "rl") -> str:
    before, after = e["answer_accuracy_before"], e["answer_accuracy_after"]
    moved = f"new skill {fmt(before)} -> {fmt(after)}"
    moved += _moved(e, "retained_answer_accuracy", "retained")
    moved += _moved(e, "generalization_answer_accuracy", "unseen phrasing")
    tolerance = noise_band(before, after, e.get("answer_prompts_after"))
    kept = "retained_answer_accuracy_before" not in e or (
        e["retained_answer_accuracy_after"] >= e["retained_answer_accuracy_before"] - TAX_TOLERANCE
    )
    if kind not in ("rl", "sft"):
        cure = "train fewer steps or at a lower learning rate"
    elif config.get("ptx_coef"):
        cure = f"raise ptx_coef (now {config['ptx_coef']}) or train fewer steps"
    else:
        cure = "set ptx_coef and ptx_datasets (InstructGPT's ptx term: PPO-ptx in RL)"
    tax = ""
    if not kept:
        drop = e["retained_answer_accuracy_before"] - e["retained_answer_accuracy_after"]
        counted = _questions(drop, e.get("retained_answer_prompts_after"))
        tax = (
            f" It paid an alignment tax: what it had to keep fell {fmt(drop)} ({counted}more than "
            f"{TAX_TOLERANCE}); {cure} (docs/rl.md)."
        )
    if kind != "rl":  # SFT, preference and distillation stages: no reward to explain
        if after - before > tolerance:
            return (f"better assistant ({moved})." if kept else f"gained the new skill ({moved}).") + tax
        return f"no new skill ({moved}{_within(tolerance, e)}).{tax}"
    reward = f"reward {fmt(e.get('reward_before'))} -> {fmt(e.get('reward_after'))}"
    judge = "reward functions" if config.get("reward_funcs") else "the reward model"
    if config.get("reward_funcs") and config.get("reward_model"):
        judge = "the reward model and reward functions"
    if after - before > tolerance:
        lead = "improved, a better assistant" if kept else "improved the new skill"
        return f"{lead} ({moved}): {judge} rewarded the right answers ({reward}).{tax}"
    rose = e.get("reward_after", 0) > e.get("reward_before", 0)
    if after - before < -tolerance and rose:
        return (
            f"did not improve ({moved}) although its reward rose ({reward}): the policy learned what {judge} "
            f"scores highly, which is not the right answer (reward hacking; docs/rl.md).{tax}"
        )
    if after - before < -tolerance:
        return (
            f"did not improve ({moved}) and its reward fell too ({reward}): the update went wrong; lower the "
            f"learning rate.{tax}"
        )
    return f"unchanged ({moved}, {reward}{_within(tolerance, e)}).{tax}"


def noise_band(before: float, after: float, prompts: int | None) -> float:
    """How far an accuracy on ``prompts`` held-out prompts moves by chance: two standard errors of the
    difference of two accuracies near their mean (0.05 for 0.98 -> 0.96 on 100 prompts, 0.16 for 0.18 -> 0.42 on
    65), never under one prompt; 0.01 when the count is not recorded (evidence written before it was)."""
    if not prompts:
        return 0.01
    p = (before + after) / 2
    return max(1 / prompts, 2 * math.sqrt(2 * p * (1 - p) / prompts))


def _questions(drop: float, count: int | None) -> str:
    """How many of the retained questions the tax is ("3 of 78 questions; "), when their count is recorded."""
    return f"{round(drop * count)} of {count} questions; " if count else ""


def _within(tolerance: float, e: dict) -> str:
    prompts = e.get("answer_prompts_after")
    return f"; within {tolerance:.2f}, the noise of {prompts} prompts" if prompts else ""


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

"""Sweeps: a recipe or pipeline run over a grid or random search of dotted keys, ranked by an eval.json metric.

    gptpipe sweep recipes/tiny/sweep.yaml                   # trials one after another; rerun to resume
    gptpipe sweep recipes/tiny/sweep.yaml --emit slurm      # a Slurm array script (one trial per task)
    gptpipe sweep recipes/tiny/sweep.yaml --emit commands   # one `gptpipe train` command per trial

Search is Optuna's (``GridSampler`` for ``grid:``, ``RandomSampler`` when ``random:`` ranges are given) and
its study storage is the record of trials: SQLite in the sweep folder by default, or ``storage:`` a
database URL shared by cluster nodes. Each trial runs in its own folder named from its values, so a
rerun finds its work: finished trials are skipped, a trial cut off mid-run (left "running" in the study)
is asked again with the same values and resumes from its checkpoint. Results: ``results.csv``,
``results.md`` (sorted, best marked) and ``plots/<key>.png`` (the metric against each swept key).
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import shlex
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from gptpipe.errors import Preempted, UserError
from gptpipe.pipeline import load_pipeline, run_pipeline
from gptpipe.recipe import build_dataclass, load_recipe, override_value, read_yaml, validate_recipe
from gptpipe.report import benchmark_scores
from gptpipe.runner import run_stage
from gptpipe.runs import is_finished


@dataclass
class SweepConfig:
    base: str  # a recipe or a pipeline file, relative to the sweep file
    # an eval.json key (pipelines: STAGE.key, e.g. sft.answer_accuracy_after), or lm_eval.<task>.<metric> (eval_tasks)
    metric: str
    output_dir: str
    direction: str = "maximize"  # maximize | minimize
    grid: dict = field(default_factory=dict)  # dotted key -> list of values (every combination)
    random: dict = field(default_factory=dict)  # dotted key -> {low, high, log} range or a list to pick from
    budget: int | None = None  # most trials in all (grid: default every combination)
    overrides: dict = field(default_factory=dict)  # fixed for every trial
    seed: int = 0  # the random search's sampler seed
    storage: str | None = None  # Optuna storage URL; default sqlite:///<output_dir>/study.db


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    try:
        cfg = build_dataclass(SweepConfig, read_yaml(path))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if cfg.direction not in ("maximize", "minimize"):
        raise UserError(f"{path}: direction: expected maximize or minimize, got {cfg.direction!r}")
    if not cfg.grid and not cfg.random:
        raise UserError(
            f"{path}: nothing to sweep; add `grid:` (key: [values]) and/or `random:` (key: {{low, high}})"
        )
    for key, values in cfg.grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid.{key}: expected a non-empty list of values, e.g. [1e-4, 3e-4]")
    if cfg.random and not cfg.budget:
        raise UserError(f"{path}: budget: a random search needs the number of trials, e.g. budget: 8")
    cfg.base = str((path.parent / cfg.base).resolve())
    return cfg


def validate_sweep(path: str | Path) -> str:
    """Check a sweep file and its base with the fixed overrides and each swept key's first value."""
    cfg = load_sweep(path)
    first = {k: v[0] for k, v in cfg.grid.items()}
    first |= {k: (v[0] if isinstance(v, list) else v.get("low")) for k, v in cfg.random.items()}
    assignments = [f"{k}={override_value(v)}" for k, v in {**cfg.overrides, **first}.items()]
    if is_pipeline(cfg.base):
        load_pipeline(cfg.base, assignments, check=True)
    else:
        validate_recipe(cfg.base, assignments)
    return f"sweep of {Path(cfg.base).name}: {budget(cfg)} trials, ranked by {cfg.metric} ({cfg.direction})"


def trial_name(params: dict) -> str:
    """The trial's folder: its values, readable and deterministic (``learning_rate=0.0003,lora.r=8``)."""
    parts = [f"{k}={_short(v)}" for k, v in sorted(params.items())]
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", ",".join(parts))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _sampler(cfg: SweepConfig):
    import optuna

    # A grid is enqueued point by point (``grid_points``), so any sampler serves it; random keys need this one.
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def grid_points(cfg: SweepConfig) -> list[dict]:
    """Every combination of the grid's values, in a fixed order."""
    keys = list(cfg.grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*cfg.grid.values())]


def _suggest(trial, cfg: SweepConfig) -> dict:
    params = {key: trial.suggest_categorical(key, values) for key, values in cfg.grid.items()}
    for key, spec in cfg.random.items():
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, spec)
        elif isinstance(spec, dict) and {"low", "high"} <= spec.keys():
            low, high = spec["low"], spec["high"]
            if isinstance(low, int) and isinstance(high, int) and not spec.get("log"):
                params[key] = trial.suggest_int(key, low, high)
            else:
                params[key] = trial.suggest_float(key, float(low), float(high), log=bool(spec.get("log")))
        else:
            raise UserError(f"random.{key}: expected a list of values or {{low, high, log}}, got {spec!r}")
    return params


def open_study(cfg: SweepConfig, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    storage = cfg.storage or f"sqlite:///{Path(cfg.output_dir).resolve() / 'study.db'}"
    return optuna.create_study(
        study_name=name, storage=storage, load_if_exists=True, direction=cfg.direction, sampler=_sampler(cfg)
    )


def budget(cfg: SweepConfig) -> int:
    if cfg.budget:
        return cfg.budget
    total = 1
    for values in cfg.grid.values():
        total *= len(values)
    return total


def is_pipeline(path: str) -> bool:
    return "stages" in read_yaml(Path(path))


def trial_command(cfg: SweepConfig, params: dict, folder: Path) -> list[str]:
    """The command that runs one trial (what ``--emit`` writes and what the sweep runs in-process)."""
    values = {**cfg.overrides, **params}
    assignments = [f"{k}={override_value(v)}" for k, v in values.items()]
    if is_pipeline(cfg.base):
        return ["gptpipe", "pipeline", cfg.base, *assignments, f"--output-dir={folder}"]
    return ["gptpipe", "train", cfg.base, *assignments, f"output_dir={folder}"]


def _metric_stage(cfg: SweepConfig) -> tuple[str, str]:
    """(the pipeline stage, the key): ``STAGE.key`` for pipelines, ``key`` for a recipe."""
    stage, _, key = cfg.metric.partition(".") if is_pipeline(cfg.base) else ("", "", cfg.metric)
    return stage, key


def read_metric(cfg: SweepConfig, folder: Path) -> float:
    stage, key = _metric_stage(cfg)
    run = folder / stage if stage else folder
    if key.startswith("lm_eval."):  # lm_eval.<task>.<metric>: the run's eval_tasks scores (eval-*.json)
        task, _, metric = key.removeprefix("lm_eval.").rpartition(".")
        scores = benchmark_scores(run)
        if metric not in scores.get(task, {}):
            raise UserError(
                f"metric: {key!r}: no such score in {run}/eval-*.json (eval_tasks); it has {scores}"
            )
        return float(scores[task][metric])
    path = run / "eval.json"
    evidence = json.loads(path.read_text())
    if key not in evidence:
        raise UserError(f"metric: {key!r} is not in {path}; it has {sorted(evidence)}")
    return float(evidence[key])


def run_trial(cfg: SweepConfig, params: dict, folder: Path) -> float:
    """Train one trial in this process (or find it finished) and return its metric."""
    finished = folder / _metric_stage(cfg)[0]
    if not is_finished(finished):
        values = {**cfg.overrides, **params}
        assignments = [f"{k}={override_value(v)}" for k, v in values.items()]
        if is_pipeline(cfg.base):
            run_pipeline(cfg.base, assignments, output_dir=str(folder))
        else:
            run_stage(load_recipe(cfg.base, [*assignments, f"output_dir={folder}"]))
    return read_metric(cfg, folder)


def run_sweep(path: str | Path, emit: str | None = None, max_trials: int | None = None) -> Path:
    """Run (or resume, or emit) the sweep; write its results. Returns the results folder."""
    from optuna.trial import TrialState

    cfg = load_sweep(path)
    out = Path(cfg.output_dir)
    study = open_study(cfg, Path(path).stem)
    if emit:
        return emit_jobs(cfg, study, Path(path), emit)
    # Trials left "running" by a killed process: run them again with the same values (their folder
    # resumes from its checkpoint) and report to the same trial, so the sampler's bookkeeping holds.
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        print(f"[sweep] trial {trial_name(stale.params)} was cut off: running it again (it resumes)")
        _run_and_tell(cfg, study, stale.number, stale.params)
    remaining = budget(cfg) - _completed(study)
    done = {trial_name(t.params) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    todo = [p for p in grid_points(cfg) if trial_name(p) not in done] if not cfg.random else []
    for _ in range(max(0, min(remaining, max_trials or remaining))):  # a failed trial uses its turn
        if not cfg.random:
            if not todo:
                break
            study.enqueue_trial(todo.pop(0))  # the grid's next point: fixed values, no sampling
        trial = study.ask()
        params = _suggest(trial, cfg)
        print(f"[sweep] trial {_completed(study) + 1}/{budget(cfg)}: {trial_name(params)}", flush=True)
        _run_and_tell(cfg, study, trial.number, params)
    write_results(cfg, study, out)
    return out


def _run_and_tell(cfg: SweepConfig, study, number: int, params: dict) -> None:
    """Run one trial and record its metric in the study. A trial that fails (a user error, out of memory, a
    crash in a library) is marked failed and the sweep goes on; one that was preempted or interrupted stops
    the sweep and stays "running", so the next ``gptpipe sweep`` resumes it from its checkpoint."""
    from optuna.trial import TrialState

    folder = Path(cfg.output_dir) / trial_name(params)
    try:
        value = run_trial(cfg, params, folder)
    except (Preempted, KeyboardInterrupt):
        raise
    except Exception as e:  # left "running", a failed trial would be retried first by every rerun, forever
        study.tell(number, state=TrialState.FAIL)
        if not isinstance(e, UserError):
            traceback.print_exc()  # not the user's input: the trace is what a bug report needs
        print(f"[sweep] trial {folder.name} failed: {e if isinstance(e, UserError) else repr(e)}", flush=True)
        return
    study.tell(number, value)
    print(f"[sweep] {folder.name}: {cfg.metric} = {value:.4g}")


def _completed(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def write_results(cfg: SweepConfig, study, out: Path) -> None:
    """results.csv, results.md (sorted, best marked) and a plot of the metric against each swept key."""
    from optuna.trial import TrialState

    keys = [*cfg.grid, *cfg.random]
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        rows.append(
            {"trial": trial_name(t.params), **{k: t.params.get(k) for k in keys}, cfg.metric: t.value}
        )
    unique = {r["trial"]: r for r in rows}  # a trial asked twice (cut off, then resumed) counts once
    rows = sorted(unique.values(), key=lambda r: r[cfg.metric], reverse=cfg.direction == "maximize")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["trial", *keys, cfg.metric])
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Sweep results: {cfg.metric} ({cfg.direction})",
        "",
        f"| | {' | '.join(keys)} | {cfg.metric} | folder |",
    ]
    lines.append("| --- " * (len(keys) + 3) + "|")
    for i, r in enumerate(rows):
        mark = "best" if i == 0 else ""
        values = " | ".join(str(r[k]) for k in keys)
        lines.append(f"| {mark} | {values} | {r[cfg.metric]:.4g} | {r['trial']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, keys, cfg.metric, out / "plots")
    print("\n".join(lines[2:]))
    print(f"[sweep] {len(rows)} trials; results in {out / 'results.md'}")


def _plot(rows: list[dict], keys: list[str], metric: str, folder: Path) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for key in keys:
        xs = [r[key] for r in rows]
        fig, ax = plt.subplots(figsize=(5, 3))
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], [r[metric] for r in rows])
        if numeric and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / f"{key.replace('/', '_')}.png", dpi=80)
        plt.close(fig)


def emit_jobs(cfg: SweepConfig, study, path: Path, emit: str) -> Path:
    """Write the trials as commands for a cluster: ``commands.sh`` (one per line) or a Slurm array script.

    The trials are drawn now from the study (so every node runs different values); after the jobs ran,
    ``gptpipe sweep`` again records their metrics from the trial folders and writes the results.
    """
    if emit not in ("commands", "slurm"):
        raise UserError(f"--emit: expected commands or slurm, got {emit!r}")
    out = Path(cfg.output_dir)
    if not cfg.random:
        points = grid_points(cfg)[: budget(cfg)]
    else:  # drawn now and kept in the study (so a later --emit or collection sees the same trials)
        points = [t.params for t in study.get_trials(deepcopy=False)]
        while len(points) < budget(cfg):
            points.append(_suggest(study.ask(), cfg))
    commands = [trial_command(cfg, params, out / trial_name(params)) for params in points]
    text = "".join(shlex.join(c) + "\n" for c in commands)
    (out / "commands.sh").write_text(text)
    if emit == "commands":
        print(text, end="")
        return out
    script = out / "sweep.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --job-name={path.stem}\n"
        f"#SBATCH --array=0-{len(commands) - 1}\n"
        "#SBATCH --requeue\n"
        f"#SBATCH --output={out.resolve()}/slurm-%A_%a.out\n"
        "# One trial per array task. Each trial writes to its own folder and resumes when requeued.\n"
        f'sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {(out / "commands.sh").resolve()} | bash\n'
    )
    print(
        f"[sweep] {len(commands)} trials: sbatch {script}; then `gptpipe sweep {path}` collects the results"
    )
    return out

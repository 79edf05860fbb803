"""Pipelines: run stage recipes in order, each one reading the previous stage's ``final/``.

    gptpipe pipeline recipes/tiny/pipeline.yaml                      # tokenizer -> pretrain -> sft -> reward -> rl
    gptpipe pipeline recipes/tiny/pipeline.yaml sft.learning_rate=1e-4 --rerun sft

A pipeline file names an ``output_dir`` and its ``stages`` (recipes, relative to the pipeline file, with
optional per-stage ``overrides``). Each stage writes to ``<output_dir>/<name>`` and is wired to the stages
before it: pretraining reads the tokenizer stage's tokenizer, SFT the pretrained model, the reward model
starts from the SFT model, RL from the SFT model with the reward model as judge, distillation's student from
the newest pretrained model (a second pretrain stage after SFT) with the SFT model as teacher. A key set explicitly
(in the stage's ``overrides`` or on the command line) is never rewired.

Iterated on-policy RLHF (InstructGPT, Llama 2): an entry ``{rounds: N, stages: [rank, reward, rl]}`` repeats its
stages N times as ``rank-1, reward-1, rl-1, rank-2, ...``. Round r samples and ranks the current policy (the SFT
model, then round r-1's RL policy), trains a reward model from the SFT model on every round's comparisons so
far (held out: the current policy's samples of the held-out prompts), and continues RL from the current policy
against it.

A stage that finished (``final/`` and ``eval.json``) with the same settings is skipped; an interrupted
one resumes from its newest checkpoint; a finished stage whose settings changed is refused unless
``--rerun NAME``, which reruns it and every stage after it (their inputs change with it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from gptpipe import compare
from gptpipe.compare import MODEL_STAGES, CompareSettings, reward_models_on_own_samples
from gptpipe.config.settings import with_new_defaults
from gptpipe.errors import UserError
from gptpipe.export import export
from gptpipe.recipe import (
    apply_override,
    build_dataclass,
    build_stage_config,
    check_tree,
    config_to_dict,
    override_value,
    read_yaml,
)
from gptpipe.report import assistant_verdicts, report_card
from gptpipe.runner import is_main_process, run_benchmarks, run_stage
from gptpipe.runs import is_finished

# Settings that say how to run, not what to compute: changing them does not make a finished stage stale.
RUN_ONLY_KEYS = {
    "resume",
    "overwrite",
    "disable_tqdm",
    "report_to",
    "logging_steps",
    "dataloader_num_workers",
    "eval_tasks",  # benchmarks run on the finished model (gptpipe.benchmarks), no retraining
    "eval_tasks_num_fewshot",
    "eval_tasks_limit",
}


@dataclass
class PipelineStage:
    recipe: str | None = None  # relative to the pipeline file
    name: str | None = None  # the run folder's name; defaults to the recipe's stage (rl: its algorithm too)
    overrides: dict = field(default_factory=dict)  # dotted keys, as on the command line
    # A reward stage after a rank stage: the rank stage's comparisons replace the recipe's datasets, or are added
    # to them (e.g. the pre-written pairs: a reward model that has judged every fact as well as the policy's samples;
    # with add, a `datasets` in `overrides` is what the comparisons are added to)
    comparisons: Literal["replace", "add"] = "replace"
    rounds: int | None = None  # instead of a recipe: repeat `stages` this many times (iterated RLHF)
    stages: list[dict] = field(default_factory=list)  # the block's stages (each a recipe entry)


def _expand_rounds(path: Path, stages: list[PipelineStage]) -> list[tuple[PipelineStage, int | None]]:
    """(stage, round) per stage to run: a ``rounds`` block becomes its stages once per round."""
    flat = []
    for i, stage in enumerate(stages):
        if stage.rounds is None:
            if not stage.recipe:
                raise UserError(f"{path}: stages.{i}: give a `recipe:` (or `rounds:` with `stages:`)")
            flat.append((stage, None))
            continue
        if stage.rounds < 1 or not stage.stages or stage.recipe:
            raise UserError(
                f"{path}: stages.{i}: a rounds block is `rounds: N` (N >= 1) with `stages:` (recipes to repeat), "
                f"e.g. rounds: 3, stages: [{{recipe: rank.yaml}}, {{recipe: reward.yaml}}, {{recipe: rl.yaml}}]"
            )
        try:
            inner = [build_dataclass(PipelineStage, s) for s in stage.stages]
        except UserError as e:
            raise UserError(f"{path}: stages.{i}.stages: {e}") from None
        if any(s.rounds is not None for s in inner):
            raise UserError(f"{path}: stages.{i}: rounds blocks do not nest")
        flat += [(s, r) for r in range(1, stage.rounds + 1) for s in inner]
    return flat


@dataclass
class ExportSettings:
    """``export:`` after the stages: the last model stage's final/ as a plain folder with a model card."""

    out: str  # the folder to write (relative: to the working folder)
    merge_lora: bool = True
    dtype: Literal["bf16", "fp16", "fp32"] | None = None  # None: as stored
    stage: str | None = None  # which stage's model (default: the last one whose final/ is a model)


@dataclass
class PipelineConfig:
    output_dir: str
    stages: list[PipelineStage] = field(default_factory=list)
    compare: CompareSettings | None = None  # the same prompts to every trained model (gptpipe.compare)
    export: ExportSettings | None = None  # gptpipe.export, once every stage finished


@dataclass
class PlannedStage:
    name: str
    kind: str  # tokenizer | pretrain | sft | reward | rl
    cfg: object
    explicit: set[str]


def load_pipeline(
    path: str | Path, overrides: list[str] = (), check: bool = False, output_dir: str | None = None
) -> tuple[PipelineConfig, list[PlannedStage]]:
    """Read a pipeline file and build every stage's config (wired, with overrides), before running any.
    ``check``: validate as ``gptpipe validate`` does (data files exist; GPU-only flags pass on a CPU)."""
    path = Path(path)
    try:
        pipe = build_dataclass(PipelineConfig, read_yaml(path))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if output_dir:  # a stage's overrides that name the file's folder (a model, ranked samples) follow it
        for stage in pipe.stages:
            stage.overrides = _rebased(stage.overrides, pipe.output_dir, output_dir)
            stage.stages = _rebased(stage.stages, pipe.output_dir, output_dir)  # a rounds block's stages
        pipe.output_dir = output_dir
    if not pipe.stages:
        raise UserError(f"{path}: `stages:` is empty; list the stage recipes to run, e.g. - recipe: sft.yaml")
    per_stage: dict[str, list[str]] = {}
    planned: list[PlannedStage] = []
    trees = []
    for i, (stage, round_) in enumerate(_expand_rounds(path, pipe.stages)):
        recipe = (path.parent / stage.recipe).resolve()
        tree = read_yaml(recipe)
        kind = tree.get("stage")
        algorithm = tree.get("algorithm", "ppo")
        name = stage.name or (kind if kind != "rl" or algorithm == "ppo" else algorithm)
        name = name if round_ is None else f"{name}-{round_}"
        if any(name == p.name for p in planned):
            raise UserError(f"{path}: stage {i}: two stages are named {name!r}; give one a `name:`")
        trees.append((name, kind, recipe, tree, stage, round_))
        planned.append(PlannedStage(name, kind, None, set()))
    names = [p.name for p in planned]
    for assignment in overrides:
        key = assignment.partition("=")[0]
        stage_name, dot, rest = key.partition(".")
        if not dot or stage_name not in names:
            raise UserError(
                f"override {assignment!r}: expected STAGE.key=value with STAGE one of {names} (e.g. sft.max_steps=20)"
            )
        per_stage.setdefault(stage_name, []).append(assignment.partition(".")[2])

    finals: dict[str, Path] = {}
    comparisons: list[Path] = []
    produced: set[str] = set()  # data files that earlier stages write (not checked for existence)
    out = Path(pipe.output_dir)
    for plan, (name, kind, recipe, tree, stage, round_) in zip(planned, trees, strict=True):
        own = dict(stage.overrides)
        # comparisons: add keeps the stage's own datasets (the pipeline entry's, else the recipe's) beside the ranked
        adds = stage.comparisons == "add" and kind == "reward" and bool(comparisons)
        kept = own.pop("datasets", tree.get("datasets", [])) if adds else []
        assignments = [f"{k}={override_value(v)}" for k, v in own.items()] + per_stage.get(name, [])
        explicit = {a.partition("=")[0] for a in assignments}
        wiring = {"output_dir": str(out / name)} | _wiring(kind, finals, comparisons, round_, kept)
        for key, value in wiring.items():
            if key not in explicit:
                apply_override(tree, f"{key}={value}")
        for assignment in assignments:
            apply_override(tree, assignment)
        try:
            plan.cfg = check_tree(tree, produced) if check else build_stage_config(tree)
        except UserError as e:
            raise UserError(f"{recipe} (pipeline stage {name}): {e}") from None
        plan.explicit = explicit
        finals[kind] = out / name / "final"
        if kind == "sft" or (kind == "rl" and round_ is not None):
            finals["policy"] = finals[kind]  # what a later round samples from and continues
        if kind == "rank":
            produced |= {
                str(finals[kind] / "comparisons.jsonl"),
                str(finals[kind] / "heldout_comparisons.jsonl"),
                str(finals[kind] / "best.jsonl"),
            }
            comparisons.append(finals[kind])
    return pipe, planned


def _wiring(
    kind: str, finals: dict[str, Path], ranks: list[Path], round_: int | None, kept: list = ()
) -> dict[str, str]:
    """The keys that connect a stage to the stages before it (``ranks``: the rank stages' finals so far;
    ``kept``: the recipe's own datasets a reward stage trains on beside the on-policy comparisons)."""
    wired: dict[str, str] = {}
    if kind == "pretrain" and "tokenizer" in finals:
        wired["model.tokenizer"] = str(finals["tokenizer"])
    if kind == "rank" and "policy" in finals:
        wired["model.name_or_path"] = str(finals["policy"])
    if kind == "reward" and ranks:  # on-policy comparisons instead of (or beside) the recipe's own data
        used = ranks if round_ is not None else ranks[-1:]  # a round learns from every round's comparisons
        wired["datasets"] = override_value(
            [{"path": str(r / "comparisons.jsonl"), "format": "ranked"} for r in used] + list(kept)
        )
        # held out: the current policy's samples of the held-out prompts, ranked alike (what RL will ask it to judge)
        wired["eval_datasets"] = override_value(
            [{"path": str(ranks[-1] / "heldout_comparisons.jsonl"), "format": "ranked"}]
        )
    if kind in ("sft", "reward", "rl", "dpo", "kto"):
        source = finals.get("sft") if kind != "sft" else None
        source = source or finals.get("pretrain")
        if kind == "rl" and round_ is not None:
            source = finals.get("policy", source)
        if source is not None:
            wired["model.name_or_path"] = str(source)
    if kind == "rl" and "reward" in finals:
        wired["reward_model"] = str(finals["reward"])
    if kind == "distill":  # the student: the newest pretrained model; the teacher: the SFT model
        if "pretrain" in finals:
            wired["model.name_or_path"] = str(finals["pretrain"])
        if "sft" in finals:
            wired["teacher_model_name_or_path"] = str(finals["sft"])
    return wired


def _compare_stages(settings: CompareSettings, planned: list[PlannedStage], out: Path) -> str:
    """Ask every finished model stage the same prompts; the report card's section (see gptpipe.compare)."""
    models = [
        (p.name, p.kind, Path(p.cfg.output_dir) / "final")
        for p in planned
        if p.kind in MODEL_STAGES and is_finished(p.cfg.output_dir)
    ]
    print(f"[pipeline] comparing {', '.join(m[0] for m in models)} on the same prompts", flush=True)
    return compare.write(compare.compare_models(models, settings), out)


def changed_settings(cfg, run_dir: Path) -> list[str]:
    """Keys whose value differs from the finished run's ``config.yaml`` (how-to-run keys ignored). A key the
    saved config lacks, now at its default, at any level, is a setting newer than that run and changes nothing."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return ["config.yaml (missing)"]
    saved = _moved(yaml.safe_load(saved_path.read_text()) or {}, run_dir)
    saved = with_new_defaults(saved, type(cfg))
    current = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    keys = sorted((set(saved) | set(current)) - RUN_ONLY_KEYS)
    return [k for k in keys if saved.get(k) != current.get(k)]


def _moved(saved: dict, run_dir: Path) -> dict:
    """A finished run's settings as if its pipeline folder had always been where ``run_dir`` now is: a copied or
    moved folder (``cp -r runs/tiny runs/try``, then ``--output-dir runs/try``) keeps its finished stages, their
    paths into the old folder (``output_dir``, the previous stages' models) read as paths into the new one."""
    old = saved.get("output_dir")
    if not isinstance(old, str) or Path(old).name != run_dir.name or Path(old).parent == run_dir.parent:
        return saved
    return _rebased(saved, str(Path(old).parent), str(run_dir.parent))


def _rebased(value, old_root: str, new_root: str):
    """``value`` (a setting, list or dict) with every path in ``old_root`` moved to the same place in ``new_root``."""
    old_root, new_root = old_root.rstrip("/"), new_root.rstrip("/")
    if isinstance(value, str) and (value == old_root or value.startswith(old_root + "/")):
        return new_root + value[len(old_root) :]
    if isinstance(value, list):
        return [_rebased(v, old_root, new_root) for v in value]
    if isinstance(value, dict):
        return {k: _rebased(v, old_root, new_root) for k, v in value.items()}
    return value


def run_pipeline(
    path: str | Path, overrides: list[str] = (), rerun: list[str] = (), output_dir: str | None = None
) -> Path:
    """Run (or skip, or resume) every stage in order; write and print the report card. Returns its path."""
    start = time.time()
    pipe, planned = load_pipeline(path, overrides, output_dir=output_dir)
    names = [p.name for p in planned]
    unknown = [r for r in rerun if r not in names]
    if unknown:
        raise UserError(f"--rerun {unknown[0]}: no such stage; the stages are {names}")
    first_rerun = min((names.index(r) for r in rerun), default=len(names))
    # Refuse before running anything: a stale finished stage would feed every later stage.
    for i, plan in enumerate(planned):
        run_dir = Path(plan.cfg.output_dir)
        if i < first_rerun and is_finished(run_dir):
            changed = changed_settings(plan.cfg, run_dir)
            if changed:
                shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
                raise UserError(
                    f"stage {plan.name}: {run_dir} finished with different settings ({shown}). Pass "
                    f"--rerun {plan.name} to train it again (and every stage after it), or restore the settings."
                )
    for i, plan in enumerate(planned):
        run_dir = Path(plan.cfg.output_dir)
        if i >= first_rerun:
            plan.cfg.overwrite = True
        elif is_finished(run_dir):
            print(f"[pipeline] {plan.name}: finished with the same settings: skipped ({run_dir})")
            if is_main_process():
                run_benchmarks(plan.cfg)  # tasks added since it finished
            continue
        print(f"[pipeline] {plan.name}: {'rerun' if i >= first_rerun else 'run'} -> {run_dir}", flush=True)
        run_stage(plan.cfg)

    out = Path(pipe.output_dir)
    stages = [(p.name, p.kind, Path(p.cfg.output_dir)) for p in planned]
    card = report_card(stages)
    text = f"# Pipeline report card: {path}\n\n{card}\n\nEach stage's own report: `<stage>/report.md`.\n"
    verdicts = assistant_verdicts(stages)
    text += f"\n{verdicts}\n" if verdicts else ""
    if is_main_process():
        if pipe.compare is not None:
            text += "\n" + _compare_stages(pipe.compare, planned, out) + "\n"
        heldout = [
            Path(p.cfg.output_dir) / "final/heldout_comparisons.jsonl" for p in planned if p.kind == "rank"
        ]
        if heldout and heldout[0].is_file():
            text += "\n" + reward_models_on_own_samples(out, heldout[0]) + "\n"
        (out / "report.md").write_text(text)
        print(
            f"\n{card}\n\n{verdicts}\n\n[pipeline] report card: {out / 'report.md'} ({time.time() - start:.0f} s)"
        )
        if pipe.export is not None:
            _export(pipe.export, planned)
    return out / "report.md"


def _export(settings: ExportSettings, planned: list[PlannedStage]) -> None:
    names = [p.name for p in planned]
    if settings.stage is not None and settings.stage not in names:
        raise UserError(
            f"export.stage: {settings.stage!r} is not a stage of this pipeline; the stages are {names}"
        )
    models = [p for p in planned if (p.name == settings.stage if settings.stage else p.kind in MODEL_STAGES)]
    if not models:
        raise UserError(f"export: no stage of this pipeline makes a model to export (stages {names})")
    source = Path(models[-1].cfg.output_dir)
    folder = export(source, settings.out, settings.merge_lora, settings.dtype, overwrite=True)
    print(f"[pipeline] exported {source} to {folder}")

"""Benchmarks with lm-evaluation-harness: its own tasks and its Python API (``lm_eval.simple_evaluate``), on any
model folder a stage wrote.

    gptpipe eval runs/tiny/sft/final --tasks tinyworld
    gptpipe eval runs/smollm2-1.7b/sft/final --tasks mmlu,gsm8k --num-fewshot 5 --batch-size 16
    gptpipe eval runs/tiny/pretrain/final --tasks tinyworld --no-chat-template     # base-model style

Tasks are lm-eval's (``mmlu``, ``gsm8k``, ``hellaswag``, ``ifeval``... which read their data from the Hub),
task YAML files or folders of them, and gptpipe's ``tinyworld`` (``gptpipe/benchmark_tasks``: the tiny world's
held-out questions, scored by the stages' own answer check), which runs offline. The model is loaded as the
stages load it (a full model or a LoRA adapter, its generation config) and handed to lm-eval's ``HFLM``;
``chat_template`` renders each request with the model's chat template; by default (None) it does whenever the
tokenizer has one and the folder is not a pretraining run's (every SFT, RL, DPO... folder): an assistant scored
on plain-text requests answers another task (the verifiable PPO model: 0.19 instead of 0.705). ``False`` gives
base-model style requests. Scores go to ``eval-<tasks>.json`` beside the model (in the run folder
for a run's ``final/``), which report cards and model cards read.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path

import yaml

from gptpipe.errors import UserError
from gptpipe.export import model_folder
from gptpipe.files import write_json_atomic
from gptpipe.modeling import load_for_inference

TASKS_DIR = Path(__file__).parent / "benchmark_tasks"  # gptpipe's own tasks (tinyworld)


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError("gptpipe eval needs lm-evaluation-harness: pip install 'gptpipe[eval]'") from None
    return lm_eval


@functools.cache
def _task_manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=defaults)


def task_manager(tasks: list[str]):
    """(lm-eval's TaskManager, the task names): gptpipe's tasks and any YAML file or folder named, plus
    lm-eval's own when a task is none of those (indexing lm-eval's ~15,000 tasks takes seconds)."""
    paths, names = [str(TASKS_DIR)], []
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml") or path.is_dir():
            if not path.exists():
                raise UserError(f"--tasks {task}: no such task file or folder")
            paths.append(str(path.parent if path.is_file() else path))
            names += [_yaml_task(path)] if path.is_file() else _folder_tasks(path)
        else:
            names.append(task)
    local = _task_manager(tuple(paths), False)
    if all(n in local.all_tasks for n in names):
        return local, names
    manager = _task_manager(tuple(paths), True)
    for name in names:
        if name not in manager.all_tasks and not manager.match_tasks([name]):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else " (`lm_eval ls tasks` lists them)"
            raise UserError(f"--tasks {name}: no such lm-evaluation-harness task{hint}")
    return manager, names


def _yaml_task(path: Path) -> str:
    found = yaml.load(path.read_text(), Loader=_Lenient) or {}
    if "task" not in found:
        raise UserError(f"--tasks {path}: the YAML has no `task:` name")
    return str(found["task"])


def _folder_tasks(path: Path) -> list[str]:
    names = [_yaml_task(p) for p in sorted(path.glob("*.yaml"))]
    if not names:
        raise UserError(f"--tasks {path}: no task YAML in the folder")
    return names


class _Lenient(yaml.SafeLoader):
    """Reads task YAMLs for their name: lm-eval's ``!function`` tags are left unresolved."""


_Lenient.add_multi_constructor("!", lambda loader, suffix, node: None)


def results_path(folder: Path, tasks: list[str]) -> Path:
    """``eval-<tasks>.json``: in the run folder for a run's ``final/``, else in the model folder."""
    where = folder.parent if folder.name == "final" and (folder.parent / "config.yaml").is_file() else folder
    stem = "-".join(Path(t).stem if Path(t).suffix else Path(t).name for t in tasks)
    return where / f"eval-{stem}.json"


def evaluate(
    model: str | Path,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    chat_template: bool | None = None,
) -> tuple[dict, Path]:
    """Run lm-eval's ``tasks`` on the model folder; returns ({task: {metric: value}}, the results file)."""
    if not tasks:
        raise UserError("--tasks: name at least one task, e.g. --tasks tinyworld or --tasks mmlu,gsm8k")
    folder, _ = model_folder(model)
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager, names = task_manager(tasks)
    policy, tokenizer = load_for_inference(folder)
    if chat_template is None:
        chat_template = uses_chat_template(folder, tokenizer)
        print(
            "[eval] requests rendered with the model's chat template (--no-chat-template: plain text)"
            if chat_template
            else "[eval] requests as plain text: a base model, or no chat template (--chat-template to force it)"
        )
    lm = HFLM(pretrained=policy, tokenizer=tokenizer, batch_size=batch_size)
    try:
        found = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=limit,
            apply_chat_template=chat_template,
            task_manager=manager,
            log_samples=False,
        )
    except (ConnectionError, OSError) as e:  # a Hub task's data, offline or unreachable
        raise UserError(
            f"--tasks {','.join(names)}: could not read a task's data ({type(e).__name__}: {str(e)[:200]}); "
            "reach the Hub (unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), download it beforehand into the "
            "datasets cache, or use a local task (a task YAML, or tinyworld)"
        ) from None
    scores = {
        task: {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and k not in ("alias", "sample_len")
        }
        for task, metrics in found["results"].items()
    }
    out = results_path(folder, tasks)
    write_json_atomic(
        out,
        {
            "model": str(folder),
            "tasks": names,
            "num_fewshot": num_fewshot,
            "limit": limit,
            "chat_template": chat_template,
            "lm_eval_version": lm_eval.__version__,
            "results": scores,
        },
    )
    print(scores_table(scores))
    return scores, out


def uses_chat_template(folder: Path, tokenizer) -> bool:
    """The default: the tokenizer's chat template when it has one, unless the folder is a pretraining run's
    output (a base model reads plain text, although the tiny tokenizer carries a template from the start)."""
    config = folder.parent / "config.yaml" if folder.name == "final" else None
    if config is not None and config.is_file():
        if (yaml.safe_load(config.read_text()) or {}).get("stage") == "pretrain":
            return False
    return bool(getattr(tokenizer, "chat_template", None))


def scores_table(scores: dict) -> str:
    """A markdown table of ``{task: {metric: value}}`` (each metric beside its ``<metric>_stderr``)."""
    lines = ["| task | metric | value | stderr |", "| --- | --- | --- | --- |"]
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr"):
                stderr = metrics.get(f"{metric}_stderr")
                lines.append(
                    f"| {task} | {metric} | {value:.4f} | {'' if stderr is None else f'{stderr:.4f}'} |"
                )
    return "\n".join(lines)

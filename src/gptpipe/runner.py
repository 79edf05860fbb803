"""Run one stage: the one caller of a stage's ``main`` (``gptpipe train``, pipelines and sweeps all come here).

    cfg = load_recipe("recipes/tiny/sft.yaml", ["max_steps=20"])
    evidence = run_stage(cfg)

Before the stage: its batch settings noted for an out-of-memory message (``gptpipe.faults``), the process
layout set up, checked and written to ``distributed.json`` (``gptpipe.distributed``), tracking
(``gptpipe.tracking``). A stage that trains with a Hugging Face trainer runs on every process. The others
(tokenizer, rank) run on the main process alone, and the rest wait for it, so under a launcher one process
writes their ``final/``. After the stage: the run's ``report.md`` and plots, written by the main process.
"""

from __future__ import annotations

import importlib
import os
import time
import uuid
from pathlib import Path

from accelerate.state import PartialState
from accelerate.utils import broadcast_object_list

from gptpipe.benchmarks import evaluate, results_path
from gptpipe.compare import MODEL_STAGES
from gptpipe.distributed import start_distributed
from gptpipe.errors import UserError
from gptpipe.faults import note_stage
from gptpipe.files import read_json, write_json_atomic
from gptpipe.report import write_run_report
from gptpipe.runs import Run
from gptpipe.tracking import start_tracking

# How often a waiting process looks for the main process's result. A file, not a collective: a tokenizer
# trained on a large corpus can take longer than a process group's timeout (30 minutes by default).
POLL_SECONDS = 1.0


def run_stage(cfg) -> dict:
    """Run the stage ``cfg`` names (``cfg.module``'s ``main``) with everything around it; returns its evidence."""
    if getattr(cfg, "eval_tasks", None) and cfg.stage not in MODEL_STAGES:
        raise UserError(
            f"eval_tasks: the {cfg.stage} stage's final/ is not a causal language model (lm-eval scores those: "
            f"{', '.join(MODEL_STAGES)}); remove eval_tasks from this recipe"
        )
    note_stage(cfg)
    layout = start_distributed(cfg)
    start_tracking(cfg)
    main = importlib.import_module(cfg.module).main
    if layout.get("runs_on") == "main process":
        evidence = _on_main_process(lambda: main(cfg, Run.open(cfg)), cfg)
    else:  # every process trains; the main one prepares the run folder and tells the others where to resume
        share = _from_main_process if layout.get("world_size", 1) > 1 else None
        evidence = main(cfg, Run.open(cfg, is_main_process(), share))
    if is_main_process():
        run_benchmarks(cfg)
        report = write_run_report(cfg.output_dir)
        if report:
            print(f"[{cfg.stage}] report: {report}")
    return evidence


def run_benchmarks(cfg) -> None:
    """The stage's ``eval_tasks`` on its ``final/`` (``gptpipe.benchmarks``), unless scores newer than the
    model's evidence are there."""
    tasks = getattr(cfg, "eval_tasks", None)
    if not tasks:
        return
    final = Path(cfg.output_dir) / "final"
    found, evidence = results_path(final, tasks), Path(cfg.output_dir) / "eval.json"
    if found.is_file() and found.stat().st_mtime_ns >= evidence.stat().st_mtime_ns:
        return
    limit = cfg.eval_tasks_limit
    limit = int(limit) if limit is not None and limit >= 1 else limit
    print(f"[{cfg.stage}] lm-evaluation-harness: {', '.join(tasks)} on {final}", flush=True)
    evaluate(final, tasks, cfg.eval_tasks_num_fewshot, limit, chat_template=cfg.stage != "pretrain")


def is_main_process() -> bool:
    """Process 0 of a launch (every launcher sets ``RANK``), or a process that was not launched."""
    return int(os.environ.get("RANK", "0")) == 0


def _from_main_process(value):
    """The main process's ``value`` on every process (a collective: all must call it)."""
    box = [value]
    broadcast_object_list(box)
    return box[0]


def _on_main_process(main, cfg) -> dict:
    """``main()`` on the main process; the others wait for its result and read the same evidence."""
    state = PartialState()
    token = [uuid.uuid4().hex if state.is_main_process else None]
    broadcast_object_list(token)  # one name for this launch's result file, agreed by every process
    result = Path(cfg.output_dir) / f".main-process-result-{token[0]}.json"
    if state.is_main_process:
        try:
            evidence = main()
        except BaseException as e:
            result.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(result, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            raise
        write_json_atomic(result, {"ok": True})
        state.wait_for_everyone()  # every process has read it
        result.unlink()
        return evidence
    while not result.is_file():
        time.sleep(POLL_SECONDS)
    found = read_json(result)
    if not found["ok"]:
        raise UserError(f"stage {cfg.stage} failed on the main process ({found['error']}); see its messages")
    state.wait_for_everyone()
    return read_json(Path(cfg.output_dir) / "eval.json") or {}

"""Tracking: metrics.jsonl (one JSON object per logging or eval step), wandb/tensorboard through the HF
``report_to`` setting, one wandb run id per run folder (a resumed run continues the same wandb run),
and secrets from the environment kept out of everything a run writes.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from transformers import TrainerCallback

from gptpipe.errors import UserError
from gptpipe.recipe import config_to_dict
from gptpipe.runs import is_finished, last_checkpoint


class MetricsLogger(TrainerCallback):
    """Append every ``Trainer.log`` call to ``<output_dir>/metrics.jsonl``.

    On resume, lines logged after the checkpoint's step (by the interrupted run) are dropped first,
    so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            truncate_metrics(self.output_dir, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            append_metrics(self.output_dir, {"step": state.global_step, "epoch": state.epoch, **logs})


def append_metrics(output_dir: str | Path, record: dict) -> None:
    """One line of ``metrics.jsonl``; an ``eval_loss`` gets its perplexity alongside."""
    if "eval_loss" in record:
        record = {**record, "eval_perplexity": perplexity(record["eval_loss"])}
    with (Path(output_dir) / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(output_dir: str | Path, step: int) -> None:
    """Drop the lines an interrupted run wrote after ``step`` (the checkpoint a resumed run starts from)."""
    path = Path(output_dir) / "metrics.jsonl"
    if path.exists():
        kept = [
            line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
        ]
        path.write_text("".join(line + "\n" for line in kept))


def perplexity(loss: float) -> float:
    # Capped: exp overflows past ~709, and any loss this large means "untrained" anyway.
    return math.exp(min(loss, 50.0))


def eval_loss(trainer) -> float:
    """Held-out loss now: the Trainer's own evaluation at this step when it just ran one, else a new one."""
    step = trainer.state.global_step
    done = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
    return done[-1] if done and step > 0 else trainer.evaluate()["eval_loss"]


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl``, oldest first."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def load_callbacks(specs: list[str]) -> list[TrainerCallback]:
    """Instantiate the recipe's extra callbacks, each named ``module:Class`` (or ``module.Class``)."""
    import importlib

    callbacks = []
    for i, spec in enumerate(specs):
        module_name, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
        if not module_name or not attr:
            raise UserError(f"callbacks.{i}: expected 'module:Class', got {spec!r}")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"callbacks.{i}: cannot import {spec!r}: {e}") from None
        callbacks.append(cls())
    return callbacks


_USER_WANDB_DIR = os.environ.get("WANDB_DIR")
_USER_TENSORBOARD_DIR = os.environ.get("TENSORBOARD_LOGGING_DIR")


def reports_to(cfg, integration: str) -> bool:
    report_to = getattr(cfg, "report_to", None) or []
    return integration in ([report_to] if isinstance(report_to, str) else report_to)


def start_tracking(cfg) -> None:
    """Before a stage runs: TensorBoard events go to ``<output_dir>/tensorboard``; the wandb run gets a
    stable id kept in ``<output_dir>/wandb_run_id``.

    A run that resumes from a checkpoint continues the same wandb run (``WANDB_RESUME=allow``); a fresh
    run gets a new id. Offline mode (``WANDB_MODE=offline``) works the same, with no network. wandb's
    files go into the run folder unless ``WANDB_DIR`` was set by the user.
    """
    if reports_to(cfg, "tensorboard") and _USER_TENSORBOARD_DIR is None:
        # Into the run folder: transformers' callback may open its writer before it picks a folder, and
        # TensorBoard's default is ./runs/<date>_<host> in the current directory.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str((Path(cfg.output_dir) / "tensorboard").resolve())
    if not reports_to(cfg, "wandb"):
        return

    out = Path(cfg.output_dir)
    id_file = out / "wandb_run_id"
    resuming = getattr(cfg, "resume", True) and not is_finished(out) and last_checkpoint(out) is not None
    run_id = id_file.read_text().strip() if resuming and id_file.is_file() else uuid.uuid4().hex[:8]
    if getattr(cfg, "process_index", 0) == 0:
        out.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    os.environ["WANDB_RUN_ID"] = run_id
    os.environ["WANDB_RESUME"] = "allow"
    os.environ.setdefault("WANDB_PROJECT", "gptpipe")
    if _USER_WANDB_DIR is None:
        os.environ["WANDB_DIR"] = str(out.resolve())


class StepLogger:
    """For stages without a HF Trainer (PPO): metrics.jsonl, plus wandb when ``report_to`` asks for it."""

    def __init__(self, cfg, is_main: bool = True):
        self.output_dir = Path(cfg.output_dir)
        self.is_main = is_main
        self.wandb = None
        if is_main and reports_to(cfg, "wandb"):
            import wandb

            self.wandb = wandb.init(name=self.output_dir.name, config=config_to_dict(cfg))

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        append_metrics(self.output_dir, record)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()

"""Callbacks that make a run explain itself: metrics.jsonl (one JSON object per logging or eval step)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

from gptpipe.errors import UserError


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

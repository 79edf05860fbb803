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
        self.path = Path(output_dir) / "metrics.jsonl"

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= state.global_step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        if "eval_loss" in logs:
            record["eval_perplexity"] = perplexity(logs["eval_loss"])
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def perplexity(loss: float) -> float:
    return math.exp(
        min(loss, 50.0)
    )  # cap: exp overflows past ~709, and any value this large means "untrained"


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

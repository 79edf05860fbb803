"""The run folder every stage writes: config.yaml, checkpoint-*/, final/, metrics.jsonl, eval.json.

A run is *finished* when ``final/`` and ``eval.json`` exist; both are written atomically (under a
temporary name, then renamed), so a killed run never looks finished. A finished run is never
overwritten unless the recipe says ``overwrite: true``; an unfinished one resumes from its newest
complete checkpoint unless it says ``resume: false``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from gptpipe.errors import UserError
from gptpipe.files import read_json, write_json_atomic
from gptpipe.recipe import save_config

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Written last, by the main process, after every process has finished writing its part of a checkpoint: a
# checkpoint without it (a kill during saving) is never resumed from, and is removed when the run resumes.
CHECKPOINT_COMPLETE_MARKER = "checkpoint_complete.json"


def is_finished(output_dir: str | Path) -> bool:
    out = Path(output_dir)
    return (out / "final").is_dir() and (out / "eval.json").is_file()


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete ``checkpoint-N`` folder, or None."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = [(step, folder) for step, folder in checkpoints(out) if is_complete(folder)]
    return max(found)[1] if found else None


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` folder, complete or not, oldest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in out.iterdir() if (m := CHECKPOINT_RE.match(c.name)) and c.is_dir()]
    return sorted(found)


def is_complete(folder: Path) -> bool:
    try:
        return "step" in json.loads((Path(folder) / CHECKPOINT_COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False


def mark_complete(folder: Path, step: int, world_size: int) -> None:
    """Call on the main process once every process has written its part (after a barrier)."""
    write_json_atomic(Path(folder) / CHECKPOINT_COMPLETE_MARKER, {"step": step, "world_size": world_size})


def rotate_checkpoints(output_dir: str | Path, keep: int | None, protect: str | Path | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints (and ``protect``, e.g. the best one); call it only once
    the newest is complete, so a kill during saving never leaves fewer than ``keep`` good ones."""
    if not keep:
        return
    complete = [folder for _, folder in checkpoints(output_dir) if is_complete(folder)]
    protected = [f for f in complete if protect is not None and f.resolve() == Path(protect).resolve()]
    complete = [
        f for f in complete if f not in protected
    ] + protected  # kept as if newest (as the Trainer does)
    for folder in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(folder, ignore_errors=True)


def prepare_run_dir(cfg: Any, is_main_process: bool = True) -> Path | None:
    """Make the run folder ready; return the checkpoint to resume from (None: start fresh).

    Refuses to touch a finished run unless ``overwrite`` is set. The checkpoint is the recipe's
    ``resume_from_checkpoint`` when it names one (any run's ``checkpoint-N``), else the newest complete one in
    the run folder unless ``resume: false``. Only the main process deletes or writes (the runner hands its
    answer to the others).
    """
    out = Path(cfg.output_dir)
    overwriting = is_finished(out)
    explicit = getattr(cfg, "resume_from_checkpoint", None)
    if explicit:
        explicit = Path(explicit)
        if not explicit.is_dir():
            raise UserError(
                f"resume_from_checkpoint: {explicit} is not a folder; name a checkpoint-N folder of an earlier "
                "run, or drop the key (an interrupted run resumes from its own newest checkpoint by itself)"
            )
        if overwriting and out.resolve() in explicit.resolve().parents:
            raise UserError(
                f"resume_from_checkpoint: {explicit} is inside {out}, the finished run that overwrite=true "
                "replaces (it would be deleted); copy it elsewhere first"
            )
    if overwriting:
        if not getattr(cfg, "overwrite", False):
            raise UserError(
                f"{out} holds a finished run (final/ and eval.json). Choose another output_dir, "
                "or pass overwrite=true to replace it."
            )
        if is_main_process:
            clear_run_dir(out)
    resume_from = last_checkpoint(out) if getattr(cfg, "resume", True) and not overwriting else None
    if resume_from is not None and is_main_process:  # half-written ones (killed while saving) would confuse
        for _, folder in checkpoints(out):  # rotation and a later resume: gone
            if not is_complete(folder):
                print(f"[{getattr(cfg, 'stage', 'run')}] removing incomplete {folder}")
                shutil.rmtree(folder, ignore_errors=True)
    if resume_from is None and not explicit and is_main_process and out.exists():
        clear_run_dir(out)  # resume=false, or only incomplete leftovers: start over cleanly
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return explicit or resume_from


class Run:
    """One stage's run folder, made ready by the runner and handed to the stage: ``main(cfg, run)``.

    ``resume_from`` is the checkpoint to continue from (None: a fresh start), the same on every process;
    ``say`` prints on the main process only; ``baseline(compute)`` gives the "before" numbers, measured once
    per run (a resumed run reads them back); ``final_dir()`` is where ``final/`` is written before
    ``publish(folder, evidence)`` renames it into place and writes ``eval.json`` (last: its presence means
    the run finished), on the main process.
    """

    def __init__(self, cfg: Any, resume_from: Path | None = None, is_main: bool = True):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.resume_from = resume_from
        self.is_main = is_main
        self.started = time.time()

    @classmethod
    def open(cls, cfg: Any, is_main: bool = True, share=None) -> Run:
        """Prepare the folder on the main process (``prepare_run_dir``); ``share(value)`` hands the main
        process's resume point to the others (a broadcast; None: one process)."""
        resume_from = prepare_run_dir(cfg, is_main) if is_main else None
        if share is not None:
            resume_from = share(resume_from)
        return cls(cfg, resume_from, is_main)

    @property
    def resume_checkpoint(self) -> str | None:
        """For ``Trainer.train(resume_from_checkpoint=...)``."""
        return str(self.resume_from) if self.resume_from else None

    def say(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs)

    def seconds(self) -> float:
        return round(time.time() - self.started, 1)

    def baseline(self, compute) -> dict:
        return measured_once(self.output_dir / "baseline.json", compute, self.is_main)

    def final_dir(self) -> Path:
        return final_tmp_dir(self.output_dir, self.is_main)

    def publish(self, folder: Path, evidence: dict) -> Path:
        """Main process: ``folder`` (a completely written model) becomes ``final/``, then ``eval.json``."""
        final = publish_final(folder, self.output_dir)
        write_json_atomic(self.output_dir / "eval.json", evidence)
        return final


def clear_run_dir(out: Path) -> None:
    """Remove what a previous run of a stage wrote (checkpoints, final model, metrics), nothing else."""
    for child in out.iterdir():
        if CHECKPOINT_RE.match(child.name) or child.name in {
            "final",
            "eval.json",
            "metrics.jsonl",
            "baseline.json",
            "merged",  # RL's merged copies of adapter inputs (gptpipe.rlhf.merge_adapters)
        }:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif child.name.startswith("eval-") and child.suffix == ".json":  # the old model's lm-eval scores
            child.unlink()
        elif child.name.startswith(
            (".final.tmp", ".eval.json.tmp", ".baseline.json.tmp")
        ):  # incl. .final.tmp.merged
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def publish_final(tmp_dir: Path, output_dir: str | Path) -> Path:
    """Move a completely written model folder into place as ``final/``."""
    final = Path(output_dir) / "final"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    return final


def final_tmp_dir(output_dir: str | Path, is_main_process: bool = True) -> Path:
    """Where ``final/`` is written before it is published (one fixed name: every rank must agree on it)."""
    tmp = Path(output_dir) / ".final.tmp"
    if is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def measured_once(path: str | Path, compute, is_main_process: bool = True) -> dict:
    """``compute()`` once per run and kept in ``path``: "before" numbers survive a resume unchanged."""
    found = read_json(path)
    if found is None:
        found = compute()
        if is_main_process:
            write_json_atomic(path, found)
    return found

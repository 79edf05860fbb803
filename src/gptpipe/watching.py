"""The reward-hacking watch while an RL stage trains: every ``eval_steps`` steps the watched held-out prompts
are answered (``gptpipe.rlhf.evaluate``), logged as ``eval/*``, and the alarm (``gptpipe.hacking``) rings when
the reward rises while answer accuracy falls; ``keep_best_model`` keeps the most accurate policy in ``best/``.
Each checkpoint holds the watch's evaluations, so a resumed run's alarm compares with the same history.
Shared by gptpipe's PPO trainer and TRL's trainers (a callback)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from transformers import TrainerCallback

from gptpipe.hacking import RewardHackingWatch


def watch_step(watch: RewardHackingWatch, step: int, found: dict, log, is_main: bool, save_best=None) -> bool:
    """One evaluation of the watched prompts (``found``, from ``evaluate``): logged as ``eval/*`` with ``log``, a
    warning when the reward-hacking alarm rings, the policy saved with ``save_best`` when it is the most accurate
    so far; whether the alarm rang."""
    record, alarm, best = watch.observe(step, found)
    if alarm and is_main:
        print(f"[rl] warning: {alarm}", file=sys.stderr, flush=True)
    log(record)
    if best and save_best is not None:
        save_best()
    return bool(alarm)


def new_watch(cfg, prompts) -> RewardHackingWatch:
    """The alarm for ``prompts`` watched prompts: accuracy must fall by more than 1.5 of them."""
    return RewardHackingWatch(cfg.hacking_window, tolerance=1.5 / max(len(prompts), 1))


WATCH_FILE = "hacking_watch.json"  # in each checkpoint: the evaluations a resumed run's alarm compares with


def save_watch(watch: RewardHackingWatch, checkpoint: Path) -> None:
    (Path(checkpoint) / WATCH_FILE).write_text(json.dumps(watch.state()))


def load_watch(watch: RewardHackingWatch, checkpoint: Path | None) -> None:
    path = Path(checkpoint) / WATCH_FILE if checkpoint else None
    if path is not None and path.is_file():
        watch.load_state(json.loads(path.read_text()))


def best_saver(save, output_dir, is_main: bool, wait):
    """``save_best()``: the policy written by ``save(folder)`` (collective) to ``<output_dir>/best/``, replacing
    the one before only once it is whole (``keep_best_model``)."""
    best = Path(output_dir) / "best"
    tmp = best.with_name(".best.tmp")

    def save_best() -> None:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        wait()
        save(tmp)
        wait()
        if is_main:
            shutil.rmtree(best, ignore_errors=True)
            os.replace(tmp, best)

    return save_best


class WatchCallback(TrainerCallback):
    """The reward-hacking alarm in TRL's trainers: every ``eval_steps`` steps, ``check(step)`` (a ``watch_step``);
    stops training when it rang and ``stop_on_reward_hacking``. Each checkpoint keeps the watch's evaluations."""

    def __init__(self, cfg, watch: RewardHackingWatch, check):
        self.every, self.stop, self.watch, self.check = (
            int(cfg.eval_steps or 0),
            cfg.stop_on_reward_hacking,
            watch,
            check,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0 and self.check(state.global_step) and self.stop:
            print(f"[rl] stopped at step {state.global_step}: stop_on_reward_hacking", flush=True)
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_watch(self.watch, Path(args.output_dir) / f"checkpoint-{state.global_step}")

"""RL step time: gptpipe's PPO against TRL's GRPOTrainer (gptpipe's ``algorithm: grpo`` is a thin wrapper of
it), same policy, reward model, prompts (the tiny world's), samples per step and response length.

    python -m bench.rl                 # make bench runs this

Each step samples 32 responses of up to 24 tokens and makes one update on them (PPO: ppo_epochs 1, one
minibatch, policy + critic; GRPO: 4 prompts x 8 samples). The step is split into generation, scoring
(reward model, reference and old log-probs, values, advantages) and training (forward/backward/step).
PPO's split comes from its own logged ``time_*`` metrics; GRPO's from timers around ``GRPOTrainer._generate``
and ``_generate_and_score_completions``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import yaml

from bench import common, fixtures

SAMPLES, LENGTH = 32, 24
PHASES = ("generation", "scoring", "training")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="steps per run (the first 2 are not timed)")
    ap.add_argument("--work", type=Path, default=common.ROOT / "runs" / "bench")
    ap.add_argument("--worker", nargs=2, metavar=("ALGORITHM", "RECIPE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(*a.worker)
    work = a.work / "rl"
    work.mkdir(parents=True, exist_ok=True)
    policy = fixtures.base_model(a.work, 4096)
    reward = fixtures.reward_model(a.work, policy)
    shared = {
        "stage": "rl",
        "overwrite": True,
        "resume": False,
        "model": {"name_or_path": str(policy)},
        "reward_model": str(reward),
        "datasets": [{"path": "tinyworld:rl_prompts"}],
        "eval_datasets": [{"path": "tinyworld:rl_prompts", "split": "eval"}],
        "eval_prompts": 8,
        "max_steps": a.steps,
        "learning_rate": 1e-5,
        "seed": 42,
        "logging_steps": 1,
        "report_to": "none",
    }
    recipes = {
        "gptpipe PPO": {
            **shared,
            "algorithm": "ppo",
            "per_device_train_batch_size": SAMPLES,
            "max_new_tokens": LENGTH,
            "ppo_epochs": 1,
            "num_minibatches": 1,
            "save_steps": 0,
        },
        "TRL GRPOTrainer": {
            **shared,
            "algorithm": "grpo",
            "per_device_train_batch_size": SAMPLES,
            "num_generations": 8,
            "max_completion_length": LENGTH,
            "beta": 0.05,
            "save_strategy": "no",
            "bf16": False,
            "gradient_checkpointing": False,
            "disable_tqdm": True,
        },
    }
    contenders = {}
    for name, recipe in recipes.items():
        algorithm = recipe["algorithm"]
        recipe["output_dir"] = str(work / algorithm)
        path = work / f"{algorithm}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        contenders[name] = [common.python(), "-m", "bench.rl", "--worker", algorithm, str(path)]
    print(f"RL step time, {SAMPLES} samples x {LENGTH} new tokens per step, {a.rounds} rounds")
    report(common.interleave(contenders, a.rounds, work, env={"PYTHONPATH": str(common.ROOT)}), work, a)


def worker(algorithm: str, recipe: str) -> None:
    """Run the recipe with gptpipe in this process and write the per-phase seconds of the timed steps."""
    from gptpipe.cli import main as gptpipe_main
    from gptpipe.recipe import load_recipe

    skip = 2
    cfg = load_recipe(recipe)
    if algorithm == "ppo":
        gptpipe_main(["train", recipe])
        from gptpipe.tracking import read_metrics

        steps = [r for r in read_metrics(cfg.output_dir) if r["step"] > skip]
        phases = {p: sum(r[f"time_{p}"] for r in steps) for p in PHASES}
        lengths = [r["response_length"] for r in steps]
    else:
        phases, lengths = _time_grpo(skip, lambda: gptpipe_main(["train", recipe]))
        steps = [None] * (cfg.max_steps - skip)
    seconds = sum(phases.values())
    common.write_result(
        {
            "steps": len(steps),
            "seconds": seconds,
            "samples": SAMPLES * len(steps),
            "mean_length": statistics.mean(lengths) if lengths else None,
            **phases,
            **common.peak_memory_mb(),
        }
    )


def _time_grpo(skip: int, run) -> tuple[dict, list]:
    """Time GRPOTrainer's generation and generation+scoring inside its training steps (after ``skip``)."""
    from trl import GRPOTrainer

    spent = {"_generate": 0.0, "_generate_and_score_completions": 0.0, "training_step": 0.0}
    counting = {"on": False, "step": 0}
    lengths = []

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            start = time.perf_counter()
            result = fn(self, *args, **kwargs)
            if counting["on"]:
                spent[name] += time.perf_counter() - start
            if name == "training_step":
                counting["step"] += 1
                counting["on"] = counting["step"] >= skip
                if counting["on"] and self._metrics["train"].get("completions/mean_length"):
                    lengths.append(self._metrics["train"]["completions/mean_length"][-1])
            return result

        return wrapper

    for name in spent:
        setattr(GRPOTrainer, name, timed(name, getattr(GRPOTrainer, name)))
    run()
    generate, both = spent["_generate"], spent["_generate_and_score_completions"]
    phases = {"generation": generate, "scoring": both - generate, "training": spent["training_step"] - both}
    return phases, lengths


def report(results: dict, work: Path, a) -> None:
    rows, summary = [], {}
    for name, runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            rows.append([name, "-", "-", "-", "-", "-", runs[-1]["error"][:60]])
            continue
        med = {k: statistics.median(r[k] / r["steps"] for r in good) for k in ("seconds", *PHASES)}
        s = summary[name] = {
            "step_seconds": med["seconds"],
            "samples_per_s": SAMPLES / med["seconds"],
            **{f"{p}_share": med[p] / med["seconds"] for p in PHASES},
            "mean_length": good[0]["mean_length"],
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in good),
        }
        rows.append(
            [name, s["samples_per_s"], s["step_seconds"], *(f"{s[f'{p}_share']:.0%}" for p in PHASES), ""]
        )
    print(
        common.table(["trainer", "samples/s", "s/step", "generation", "scoring", "training", "error"], rows)
    )
    ratios = {}
    if len(summary) == 2:
        ratios["PPO samples/s / GRPO samples/s"] = (
            summary["gptpipe PPO"]["samples_per_s"] / summary["TRL GRPOTrainer"]["samples_per_s"]
        )
        print(f"PPO samples/s / GRPO samples/s: {ratios['PPO samples/s / GRPO samples/s']:.3f}")
    common.save(work, a, summary, ratios)


if __name__ == "__main__":
    sys.exit(main())

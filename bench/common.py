"""What every benchmark shares: a step timer, interleaved runs in separate processes, medians, tables.

Each contender runs in its own process (so one's peak memory is not another's), and the contenders take
turns: A B C, A B C, A B C. Times are the medians over those rounds; the printed figures are ratios
against the fastest peer measured in the same rounds, never absolute times alone.

This module imports only ``transformers`` (for ``TrainerCallback``), so the peers' scripts can import it from
another virtualenv (LLaMA-Factory pins older transformers).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
RESULT_ENV = "BENCH_RESULT"  # the file a StepTimer writes its measurement to
SKIP_ENV = "BENCH_SKIP_STEPS"  # steps left out of the timing (allocation, first-call overheads)


def peak_memory_mb() -> dict:
    """This process's peak resident memory and, with CUDA, the peak allocated GPU memory (MiB)."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        import torch

        if torch.cuda.is_available():
            peak["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return peak


def write_result(result: dict) -> None:
    path = os.environ.get(RESULT_ENV)
    if path:
        Path(path).write_text(json.dumps(result))


class StepTimer(TrainerCallback):
    """Times optimizer steps after the first ``BENCH_SKIP_STEPS`` and counts the tokens they saw.

    Tokens come from the Trainer's own ``num_input_tokens_seen`` (set ``include_num_input_tokens_seen:
    non_padding``), so padding is not counted as work. Writes ``{steps, seconds, tokens, peak_*}`` to the
    file named by ``BENCH_RESULT`` when training ends.
    """

    def __init__(self):
        self.skip = int(os.environ.get(SKIP_ENV, "5"))
        self.start = self.start_step = self.start_tokens = None
        self.end = self.end_step = self.end_tokens = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.skip:
            self.start, self.start_step, self.start_tokens = (
                time.perf_counter(),
                state.global_step,
                state.num_input_tokens_seen,
            )
        elif self.start is not None:
            self.end, self.end_step, self.end_tokens = (
                time.perf_counter(),
                state.global_step,
                state.num_input_tokens_seen,
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.end is None or not state.is_world_process_zero:
            return
        write_result(
            {
                "steps": self.end_step - self.start_step,
                "seconds": self.end - self.start,
                "tokens": int(self.end_tokens - self.start_tokens),
                **peak_memory_mb(),
            }
        )


def run_one(name: str, cmd: list[str], env: dict, result_file: Path, log_file: Path) -> dict:
    """Run one contender; its measurement, or ``{"error": ...}`` with the log's tail."""
    result_file.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(
            cmd, env={**env, RESULT_ENV: str(result_file)}, stdout=log, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not result_file.exists():
        tail = log_file.read_text().strip().splitlines()[-8:]
        return {"error": f"{name} exited {proc.returncode}; log {log_file}:\n  " + "\n  ".join(tail)}
    return {**json.loads(result_file.read_text()), "wall_seconds": wall}


def interleave(contenders: dict[str, list[str]], rounds: int, work: Path, env: dict | None = None) -> dict:
    """Run every contender once per round, in turn; {name: [result per round]}. A contender that fails
    once is dropped from later rounds (its error is kept)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(rounds):
        for name, cmd in contenders.items():
            if results[name] and "error" in results[name][-1]:
                continue
            print(f"  round {r + 1}/{rounds}: {name}", flush=True)
            out = run_one(name, cmd, env, work / f"{name}.result.json", work / f"{name}.log")
            if "error" in out:
                print(f"  ! {out['error']}", file=sys.stderr)
            results[name].append(out)
    return results


def summarize(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Median tokens/s, steps/s and peak memory per contender (failed ones carry their error)."""
    summary = {}
    for name, runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            summary[name] = {"error": runs[-1]["error"] if runs else "not run"}
            continue
        per_round = [r["tokens"] / r["seconds"] for r in good]
        summary[name] = {
            "tokens_per_s": statistics.median(per_round),
            "tokens_per_s_rounds": per_round,  # the spread: how far to trust a ratio of medians
            "steps_per_s": statistics.median(r["steps"] / r["seconds"] for r in good),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in good),
            "rounds": len(good),
        }
        if all("peak_gpu_mb" in r for r in good):
            summary[name]["peak_gpu_mb"] = statistics.median(r["peak_gpu_mb"] for r in good)
    return summary


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (what docs/benchmarks.md holds)."""
    cells = [[_cell(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def save(work: Path, args, summary: dict, ratios: dict, **extra) -> Path:
    """Write a benchmark's settings, medians and ratios next to its runs (``<work>/summary.json``)."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {"settings": settings, "summary": summary, "ratios": ratios, **extra, "machine": machine()}
    path = work / "summary.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_throughput(summary: dict) -> None:
    """The table of ``summarize``'s medians, one row per contender, with each round's tokens/s."""
    rows = [
        [
            n,
            r.get("tokens_per_s", "-"),
            " ".join(f"{v:,.0f}" for v in r.get("tokens_per_s_rounds", [])) or "-",
            r.get("steps_per_s", "-"),
            r.get("peak_rss_mb", "-"),
            r.get("error", "")[:60],
        ]
        for n, r in summary.items()
    ]
    print(table(["contender", "tokens/s", "rounds", "steps/s", "peak RSS MiB", "error"], rows))


def machine() -> str:
    cores = os.cpu_count()
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, {cores} CPU cores"
    except ImportError:
        pass
    return f"CPU only, {cores} cores"


def python() -> str:
    """The interpreter running the benchmark (the project's .venv under make)."""
    return sys.executable

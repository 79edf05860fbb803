"""How far the learning tests' numbers move between seeds and thread counts (`make test-spread`).

Runs the `learning`-marked tests once per (training seed, thread count), each configuration in its own pytest
process with its own temporary folder, collects what every check measured (tests/helpers/learning.py) and
writes the table between the spread markers of docs/testing.md. A threshold is sound when it sits clearly below
the worst value in its row.

    python scripts/learning_spread.py --seeds 42 0 1 2 3 --threads 2 1   # 42: make test's own seed
    python scripts/learning_spread.py --table-only   # rebuild the table from runs/spread/learning.jsonl
"""

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- spread:begin -->", "<!-- spread:end -->"


def _seed_list(seeds: list[int]) -> str:
    """0-4, or 0-2, 42: runs of consecutive seeds as ranges."""
    parts, start = [], seeds[0]
    for prev, cur in zip(seeds, [*seeds[1:], None], strict=True):
        if cur is None or cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(parts)


def run_one(seed: int, threads: int, out: Path, log: Path, extra: list[str]) -> tuple[int, int, int, float]:
    """One pytest run of the learning tests under one seed and thread count; returns its exit status."""
    env = {
        **os.environ,
        "GPTPIPE_TEST_SEED": str(seed),
        "GPTPIPE_LEARNING_LOG": str(log),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
    }
    base = out / f"seed{seed}-threads{threads}"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "learning", "-p", "no:cacheprovider"]
    # Runs side by side share the cores: a longer time limit than make test's.
    cmd += ["--basetemp", str(base), "-o", "addopts=", "-o", "timeout=1800", *extra]
    start = time.time()
    with open(out / f"seed{seed}-threads{threads}.log", "w") as f:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return seed, threads, code, time.time() - start


def table(rows: list[dict]) -> str:
    """One line per (test, metric): threshold, range over every run, and the range per thread count."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["test"], r["metric"])].append(r)
    thread_counts = sorted({str(r["threads"]) for r in rows})
    head = ["test", "metric", "threshold", "seeds", "range (all runs)"]
    head += [f"range, {t} thread{'s' if t != '1' else ''}" for t in thread_counts] + ["worst margin"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (test, metric), group in sorted(groups.items()):
        values = [g["value"] for g in group]
        direction, threshold = group[0]["direction"], group[0]["threshold"]
        worst = min(values) if direction == ">=" else max(values)
        margin = worst - threshold if direction == ">=" else threshold - worst
        seeds = sorted({g["seed"] for g in group})
        cells = [
            test.split("::", 1)[1] if "::" in test else test,
            metric,
            f"{direction} {threshold:g}",
            _seed_list(seeds),
            f"{min(values):.3f} - {max(values):.3f} ({len(values)} runs)",
        ]
        for t in thread_counts:
            vals = [g["value"] for g in group if str(g["threads"]) == t]
            cells.append(f"{min(vals):.3f} - {max(vals):.3f}" if vals else "")
        cells.append(f"{margin:+.3f}" + ("" if margin > 0 else " **FAILS**"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(doc: Path, text: str, note: str) -> None:
    content = doc.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{doc}: the markers {BEGIN} and {END} are missing; add them where the table goes")
    before, rest = content.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    doc.write_text(f"{before}{BEGIN}\n{note}\n\n{text}\n{END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # 42 first: the recipes' seed, which every test trains with when GPTPIPE_TEST_SEED is unset (`make test`)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1, 2, 3])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--jobs", type=int, default=0, help="runs at once (default: cores / threads)")
    parser.add_argument("--out", type=Path, default=REPO / "runs/spread")
    parser.add_argument("--doc", type=Path, default=REPO / "docs/testing.md")
    parser.add_argument(
        "--append", action="store_true", help="add to the last runs' log (e.g. one more seed)"
    )
    parser.add_argument("--table-only", action="store_true", help="rebuild the table from the last runs' log")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest, e.g. -k reward")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "learning.jsonl"
    if not args.table_only:
        if not args.append:
            log.unlink(missing_ok=True)
        for threads in args.threads:
            # As many runs at once as the cores hold: oversubscribed torch threads slow every run several-fold.
            jobs = args.jobs or max(1, (os.cpu_count() or 1) // threads)
            with ThreadPoolExecutor(jobs) as pool:
                futures = [
                    pool.submit(run_one, s, threads, args.out, log, args.pytest_args) for s in args.seeds
                ]
                for future in futures:
                    seed, threads, code, seconds = future.result()
                    status = "passed" if code == 0 else f"FAILED (exit {code})"
                    print(f"seed {seed}, {threads} thread(s): {status} in {seconds:.0f} s", flush=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    text = table(rows)
    print(text)
    cpu = subprocess.run(["sh", "-c", "lscpu | grep 'Model name' | head -1"], capture_output=True, text=True)
    machine = cpu.stdout.split(":", 1)[-1].strip() or "unknown CPU"
    note = (
        f"Measured {time.strftime('%Y-%m-%d')} on {machine} ({os.cpu_count()} cores) by "
        f"`python scripts/learning_spread.py --seeds {' '.join(map(str, sorted({r['seed'] for r in rows})))} "
        f"--threads {' '.join(sorted({str(r['threads']) for r in rows}))}`."
    )
    write_table(args.doc, text, note)
    print(f"table written to {args.doc}")


if __name__ == "__main__":
    main()

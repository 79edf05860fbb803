"""SFT data pipeline: load + convert (gptpipe) + chat template + tokenize + bfd packing (TRL), measured cold
(a fresh datasets cache per run) on the alpaca sample replicated 1x, 4x and 16x.

    python -m bench.data               # make bench runs this

Per scale: tokens/s through the whole pipeline, the peak RAM it added (RSS peak minus RSS before the data),
packing's bin fill and the non-pad share of batches of 8 with bfd packing against plain padding to the
longest row. RAM should stay flat as the data grows: datasets keeps rows in memory-mapped Arrow files.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import common, fixtures

SCALES = (1, 4, 16)
BATCH = 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--scales", type=int, nargs="+", default=list(SCALES))
    ap.add_argument("--work", type=Path, default=common.ROOT / "runs" / "bench")
    ap.add_argument("--worker", nargs=3, metavar=("DATA", "PACKING", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(Path(a.worker[0]), a.worker[1], Path(a.worker[2]), a.max_length, a.work)
    fixtures.require_data()
    work = a.work / "data"
    work.mkdir(parents=True, exist_ok=True)
    fixtures.base_model(a.work, 4096)
    rows = json.loads(fixtures.ALPACA.read_text())
    contenders = {}
    for scale in a.scales:
        data = work / f"alpaca-x{scale}.json"
        if not data.exists():
            data.write_text(json.dumps(rows * scale))
        for packing in ("bfd", "none") if scale == a.scales[0] else ("bfd",):
            name = f"x{scale} {packing}"
            out = work / name.replace(" ", "-")
            contenders[name] = [
                common.python(),
                "-m",
                "bench.data",
                "--max-length",
                str(a.max_length),
                "--work",
                str(a.work),
                "--worker",
                str(data),
                packing,
                str(out),
            ]
    print(f"SFT data pipeline, alpaca sample x {a.scales}, max_length {a.max_length}, {a.rounds} rounds")
    results = common.interleave(contenders, a.rounds, work, env={"PYTHONPATH": str(common.ROOT)})
    report(results, a, work)


def worker(data: Path, packing: str, out: Path, max_length: int, bench_work: Path) -> None:
    """One cold run of the pipeline; writes its measurement to $BENCH_RESULT."""
    import os

    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="bench-data-cache-")  # cold: nothing cached
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from gptpipe.recipe import load_recipe
    from gptpipe.stages.sft import load_conversations

    base = fixtures.base_model(bench_work, 4096)
    recipe = out.with_suffix(".yaml")
    recipe.write_text(
        yaml.safe_dump(
            {
                "stage": "sft",
                "output_dir": str(out),
                "model": {"name_or_path": str(base)},
                "datasets": [{"path": str(data), "format": "alpaca"}],
                "max_length": max_length,
                "packing": packing != "none",
                "max_steps": 1,
                "bf16": False,
                "gradient_checkpointing": False,
                "report_to": "none",
            }
        )
    )
    cfg = load_recipe(recipe)
    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModelForCausalLM.from_pretrained(base)
    rss_before = _rss_mb()
    start = time.perf_counter()
    train, _ = load_conversations(cfg)  # gptpipe: load, check and convert the alpaca rows to conversations
    ds = SFTTrainer(model=model, args=cfg, train_dataset=train, processing_class=tokenizer).train_dataset
    seconds = time.perf_counter() - start
    peak = _rss_mb()  # before counting, which reads the token columns
    lengths = [
        n
        for batch in ds.select_columns(["input_ids"]).iter(batch_size=1024)
        for n in map(len, batch["input_ids"])
    ]
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)  # the Trainer's sampler shuffles before batching
    real = padded = 0
    for i in range(0, len(order), BATCH):
        batch = [lengths[j] for j in order[i : i + BATCH]]
        real, padded = real + sum(batch), padded + len(batch) * max(batch)
    common.write_result(
        {
            "rows_in": len(train),
            "rows_out": len(lengths),
            "tokens": sum(lengths),
            "seconds": seconds,
            "rss_before_mb": rss_before,
            "peak_rss_mb": peak,
            "data_ram_mb": peak - rss_before,
            "bin_fill": sum(lengths) / (len(lengths) * max_length) if packing != "none" else None,
            "nonpad_fraction": real / padded,
        }
    )


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(results: dict, a, work: Path) -> None:
    rows, summary = [], {}
    for name, runs in results.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            rows.append([name, "-", "-", "-", "-", "-", "-", runs[-1]["error"][:60]])
            continue
        med = {k: statistics.median(r[k] for r in good) for k in ("seconds", "data_ram_mb", "peak_rss_mb")}
        first = good[0]
        summary[name] = {
            **med,
            "tokens": first["tokens"],
            "tokens_per_s": first["tokens"] / med["seconds"],
            "rows_in": first["rows_in"],
            "rows_out": first["rows_out"],
            "bin_fill": first["bin_fill"],
            "nonpad_fraction": first["nonpad_fraction"],
        }
        s = summary[name]
        rows.append(
            [
                name,
                s["rows_in"],
                s["tokens"],
                s["tokens_per_s"],
                s["data_ram_mb"],
                s["peak_rss_mb"],
                "-" if s["bin_fill"] is None else s["bin_fill"],
                s["nonpad_fraction"],
            ]
        )
    print(
        common.table(
            [
                "run",
                "rows",
                "tokens",
                "tokens/s",
                "RAM added MiB",
                "peak RSS MiB",
                "bin fill",
                "non-pad share (batches of 8)",
            ],
            rows,
        )
    )
    ratios = {}
    first, last = f"x{a.scales[0]} bfd", f"x{a.scales[-1]} bfd"
    if first in summary and last in summary:
        ratios["peak RSS, largest / smallest"] = summary[last]["peak_rss_mb"] / summary[first]["peak_rss_mb"]
        ratios["data size, largest / smallest"] = summary[last]["tokens"] / summary[first]["tokens"]
        ratios["tokens/s, largest / smallest"] = (
            summary[last]["tokens_per_s"] / summary[first]["tokens_per_s"]
        )
    if first in summary and f"x{a.scales[0]} none" in summary:
        padded = summary[f"x{a.scales[0]} none"]
        ratios["non-pad share, bfd packing / padding"] = (
            summary[first]["nonpad_fraction"] / padded["nonpad_fraction"]
        )
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    common.save(work, a, summary, ratios)


if __name__ == "__main__":
    sys.exit(main())

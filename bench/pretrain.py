"""Pretraining throughput: gptpipe against a plain HF Trainer script (the run_clm recipe), same model, text,
block size, batch and settings.

    python -m bench.pretrain            # make bench runs this

Prints median tokens/s, steps/s and peak memory per contender and gptpipe's tokens/s over the HF Trainer's
(goal >= 1.0, i.e. gptpipe costs no more than the Trainer it wraps).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from bench import common, fixtures
from bench.sft import peer_command, pythonpath


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--steps", type=int, default=25, help="optimizer steps per run (the first 5 are not timed)"
    )
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--work", type=Path, default=common.ROOT / "runs" / "bench")
    a = ap.parse_args()
    fixtures.require_data()
    work = a.work / f"pretrain-v{a.vocab}"
    work.mkdir(parents=True, exist_ok=True)
    s = {
        "model": str(fixtures.base_model(a.work, a.vocab)),
        "data": str(fixtures.WIKI),
        "steps": a.steps,
        "batch": a.batch,
        "block_size": a.block_size,
        "learning_rate": 1e-3,
        "seed": 42,
        "logging_steps": 10,
    }
    recipe = {
        "stage": "pretrain",
        "output_dir": str(work / "gptpipe"),
        "overwrite": True,
        "resume": False,
        "model": {"name_or_path": s["model"]},  # the same saved weights as the peer, not a new init
        "datasets": [{"path": s["data"]}],
        "block_size": a.block_size,
        "max_steps": a.steps,
        "per_device_train_batch_size": a.batch,
        "learning_rate": s["learning_rate"],
        "seed": s["seed"],
        "logging_steps": s["logging_steps"],
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_pin_memory": False,
        "include_num_input_tokens_seen": "non_padding",
        "callbacks": ["bench.common:StepTimer"],
    }
    path = work / "gptpipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    contenders = {
        "gptpipe": [common.python(), "-m", "gptpipe", "train", str(path)],
        "HF Trainer": peer_command("hf_pretrain", work / "hf", s),
    }
    print(
        f"pretraining throughput, vocab {a.vocab}, batch {a.batch} x {a.block_size} tokens, {a.rounds} rounds"
    )
    summary = common.summarize(common.interleave(contenders, a.rounds, work, env=pythonpath()))
    common.print_throughput(summary)
    ratios = {}
    if all("tokens_per_s" in summary[n] for n in contenders):
        ratios["gptpipe / HF Trainer"] = (
            summary["gptpipe"]["tokens_per_s"] / summary["HF Trainer"]["tokens_per_s"]
        )
        print(f"gptpipe / HF Trainer (tokens/s): {ratios['gptpipe / HF Trainer']:.3f}")
    common.save(work, a, summary, ratios)


if __name__ == "__main__":
    main()

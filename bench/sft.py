"""SFT throughput: gptpipe against a plain TRL SFTTrainer script, a plain HF Trainer script and (``--peers``)
LLaMA-Factory, on the same model, conversations, batch and settings.

    python -m bench.sft                 # make bench runs this
    python -m bench.sft --peers         # + LLaMA-Factory (make bench-peers builds its virtualenv)
    python -m bench.sft --vocab 32768   # a large vocabulary: where TRL's fused LM head pays

Prints median tokens/s (real, non-pad tokens), steps/s and peak memory per contender, then the ratios:
gptpipe against the fastest peer (goal >= 1.0) and gptpipe against the object it wraps (goal: costs <= 1.02x).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from bench import common, fixtures

LLAMAFACTORY_PYTHON = common.ROOT / "bench" / ".venv-llamafactory" / "bin" / "python"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--steps", type=int, default=30, help="optimizer steps per run (the first 5 are not timed)"
    )
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--peers", action="store_true", help="add LLaMA-Factory (needs make bench-peers)")
    ap.add_argument("--work", type=Path, default=common.ROOT / "runs" / "bench")
    a = ap.parse_args()
    fixtures.require_data()
    work = a.work / f"sft-v{a.vocab}"
    work.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": str(fixtures.base_model(a.work, a.vocab)),
        "data": str(fixtures.alpaca_messages(a.work)),
        "alpaca": str(fixtures.ALPACA),
        "steps": a.steps,
        "batch": a.batch,
        "max_length": a.max_length,
        "learning_rate": 5e-4,
        "seed": 42,
        "logging_steps": 10,
    }
    contenders = {
        "gptpipe": gptpipe_command(work, settings, fused_lm_head=None),
        "gptpipe (TRL's fused head)": gptpipe_command(work, settings, fused_lm_head=True),
        "TRL SFTTrainer": peer_command("trl_sft", work / "trl", settings),
        "HF Trainer": peer_command("hf_sft", work / "hf", settings),
    }
    if a.peers:
        if LLAMAFACTORY_PYTHON.exists():
            contenders["LLaMA-Factory"] = peer_command(
                "llamafactory_sft", work / "llamafactory", settings, python=str(LLAMAFACTORY_PYTHON)
            )
        else:
            print(f"LLaMA-Factory skipped: no {LLAMAFACTORY_PYTHON} (run make bench-peers)")
    print(f"SFT throughput, vocab {a.vocab}, batch {a.batch}, max_length {a.max_length}, {a.rounds} rounds")
    summary = common.summarize(common.interleave(contenders, a.rounds, work, env=pythonpath()))
    report(summary, a, work)


def gptpipe_command(work: Path, s: dict, fused_lm_head: bool | None) -> list[str]:
    name = "gptpipe" if fused_lm_head is None else "gptpipe-fused"
    recipe = {
        "stage": "sft",
        "output_dir": str(work / name),
        "overwrite": True,
        "resume": False,
        "model": {"name_or_path": s["model"]},
        "datasets": [{"path": s["alpaca"], "format": "alpaca"}],
        "max_length": s["max_length"],
        "max_steps": s["steps"],
        "per_device_train_batch_size": s["batch"],
        "learning_rate": s["learning_rate"],
        "seed": s["seed"],
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": s["logging_steps"],
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_pin_memory": False,
        "include_num_input_tokens_seen": "non_padding",
        "callbacks": ["bench.common:StepTimer"],
    }
    if fused_lm_head is not None:
        recipe["fused_lm_head"] = fused_lm_head
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return [common.python(), "-m", "gptpipe", "train", str(path)]


def peer_command(script: str, out: Path, s: dict, python: str | None = None) -> list[str]:
    return [
        python or common.python(),
        "-m",
        f"bench.peers.{script}",
        json.dumps({**s, "output_dir": str(out)}),
    ]


def pythonpath() -> dict:
    return {"PYTHONPATH": str(common.ROOT)}


def report(summary: dict, a, work: Path) -> None:
    peers = [n for n in summary if not n.startswith("gptpipe") and "error" not in summary[n]]
    common.print_throughput(summary)
    ratios = {}
    ours = summary.get("gptpipe", {}).get("tokens_per_s")
    if ours and peers:
        fastest = max(peers, key=lambda n: summary[n]["tokens_per_s"])
        ratios["gptpipe / fastest peer"] = (ours / summary[fastest]["tokens_per_s"], fastest)
    pairs = [("gptpipe (TRL's fused head)", "TRL SFTTrainer"), ("gptpipe", "HF Trainer")]
    for ours_name, wrapped in pairs:
        if "tokens_per_s" in summary.get(ours_name, {}) and "tokens_per_s" in summary.get(wrapped, {}):
            cost = summary[wrapped]["tokens_per_s"] / summary[ours_name]["tokens_per_s"]
            ratios[f"cost of {ours_name} / {wrapped}"] = (cost, wrapped)
    for name, (value, against) in ratios.items():
        print(f"{name}: {value:.3f}" + (f" ({against})" if name.endswith("peer") else ""))
    common.save(work, a, summary, ratios)


if __name__ == "__main__":
    main()

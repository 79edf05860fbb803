"""GPU benchmarks (skipped without CUDA): pretraining MFU of ~125M and ~350M Llama models in bf16 through
gptpipe's pretrain stage, with sdpa, flash-attention 2 (when installed), torch.compile and Liger kernels;
then the SFT and RL benchmarks on the GPU.

    python -m bench.gpu                # make bench-gpu

MFU = tokens/s x flops per token / the GPU's dense bf16 peak, with flops per token = 6N + 12·L·H·Q·T
(N parameters, L layers, H heads, Q head size, T sequence length: the PaLM / nanoGPT estimate).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from bench import common, fixtures

# Dense bf16 peak TFLOP/s (no sparsity), from the vendors' data sheets.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
SIZES = {  # Llama shapes of GPT-2 small / medium size
    "125M": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    "350M": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
}
VARIANTS = {
    "sdpa": {"model": {"attn_implementation": "sdpa"}},
    "flash-attention 2": {"model": {"attn_implementation": "flash_attention_2"}},
    "sdpa + torch.compile": {"model": {"attn_implementation": "sdpa"}, "torch_compile": True},
    "sdpa + Liger": {"model": {"attn_implementation": "sdpa"}, "use_liger_kernel": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40, help="steps per run (the first 10 are not timed)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--work", type=Path, default=common.ROOT / "runs" / "bench")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu skipped: no CUDA device (run make bench-gpu on a GPU machine)")
        return
    fixtures.require_data()
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    work = a.work / "gpu"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = fixtures.base_model(a.work, a.vocab)  # its tokenizer; the models below are built new
    contenders, flops = {}, {}
    for size, shape in SIZES.items():
        n_params = _parameters(shape, tokenizer)
        heads, layers = shape["num_attention_heads"], shape["num_hidden_layers"]
        flops[size] = 6 * n_params + 12 * layers * heads * (shape["hidden_size"] // heads) * a.block_size
        for variant, extra in VARIANTS.items():
            label = f"{size} {variant}"
            recipe = {
                "stage": "pretrain",
                "output_dir": str(work / label.replace(" ", "-").replace("+", "")),
                "overwrite": True,
                "resume": False,
                "model": {
                    "tokenizer": str(tokenizer),
                    **shape,
                    "max_position_embeddings": a.block_size,
                    "tie_word_embeddings": False,
                    "dtype": "bfloat16",
                    **extra.get("model", {}),
                },
                "datasets": [{"path": str(fixtures.WIKI)}],
                "block_size": a.block_size,
                "max_steps": a.steps,
                "per_device_train_batch_size": a.batch,
                "learning_rate": 3e-4,
                "bf16": True,
                "logging_steps": 10,
                "save_strategy": "no",
                "report_to": "none",
                "include_num_input_tokens_seen": "non_padding",
                "callbacks": ["bench.common:StepTimer"],
                **{k: v for k, v in extra.items() if k != "model"},
            }
            path = work / f"{recipe['output_dir'].rsplit('/', 1)[1]}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            contenders[label] = [common.python(), "-m", "gptpipe", "train", str(path)]
    print(f"pretraining MFU on {name} (peak {peak} TFLOP/s bf16), batch {a.batch} x {a.block_size} tokens")
    env = {"PYTHONPATH": str(common.ROOT), common.SKIP_ENV: "10"}
    summary = common.summarize(common.interleave(contenders, a.rounds, work, env=env))
    rows = []
    for label, r in summary.items():
        size = label.split()[0]
        if "error" in r:
            rows.append([label, "-", "-", "-", r["error"].splitlines()[-1][:80]])
            continue
        r["mfu"] = r["tokens_per_s"] * flops[size] / (peak * 1e12) if peak else None
        rows.append(
            [label, r["tokens_per_s"], f"{r['mfu']:.1%}" if peak else "?", r.get("peak_gpu_mb", "-"), ""]
        )
    print(common.table(["model / attention", "tokens/s", "MFU", "peak GPU MiB", "error"], rows))
    common.save(work, a, summary, {}, device=name, peak_tflops=peak, flops_per_token=flops)
    for module in ("bench.sft", "bench.rl"):  # SFT against the peers; PPO's generation share, on the GPU
        subprocess.run([common.python(), "-m", module, "--work", str(a.work)], check=False)


def _parameters(shape: dict, tokenizer: Path) -> int:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **shape)
    import torch

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters()) - vocab * shape["hidden_size"]  # lookup table: no flops


if __name__ == "__main__":
    sys.exit(main())

"""The GPU suite (`make test-gpu`; skipped without CUDA): bf16 training of every stage, each shipped
accelerate config launched for real (single_gpu, multi_gpu, fsdp2, fsdp2_qlora, zero3 + LoRA save/load,
zero3_offload), QLoRA, the 8-bit optimizer, Liger kernels and flash-attention when installed.

Runs use as many GPUs as are visible (at least 1); each asserts its layout, that the loss fell, and
that final/ loads with plain transformers (or peft)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, reward_overrides, rl_overrides, sft_overrides, small_pretrain

from gptpipe.cli import run
from gptpipe.tracking import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
SFT, PRETRAIN = str(REPO / "recipes/tiny/sft.yaml"), str(REPO / "recipes/tiny/pretrain.yaml")
REWARD = str(REPO / "recipes/tiny/reward.yaml")
BF16 = ["bf16=true"]


def launch(config: str, recipe: str, args: list[str], processes: int = GPUS) -> subprocess.CompletedProcess:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", str(REPO / "accelerate_configs" / f"{config}.yaml")]
    cmd += ["--num_processes", str(processes), "-m", "gptpipe", "train", recipe, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ})
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def evidence(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def layout(out: Path) -> dict:
    return json.loads((out / "distributed.json").read_text())


@pytest.fixture(scope="module")
def gpu_base(tokenizer_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-base")
    run(["train", PRETRAIN, *small_pretrain(tokenizer_dir, out, max_steps=200, eval_steps=200), *BF16])
    assert evidence(out)["eval_loss_after"] < evidence(out)["eval_loss_before"]
    return out / "final"


def test_every_stage_trains_in_bf16_on_one_gpu(gpu_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    sft = tmp_path / "sft"
    run(["train", SFT, *sft_overrides(gpu_base, sft, max_steps=40, eval_steps=40), *BF16])
    assert evidence(sft)["eval_loss_after"] < evidence(sft)["eval_loss_before"]
    reward = tmp_path / "reward"
    run(["train", REWARD, *reward_overrides(sft / "final", reward, max_steps=40, eval_steps=40), *BF16])
    AutoModelForSequenceClassification.from_pretrained(reward / "final")
    rl = tmp_path / "rl"
    run(
        [
            "train",
            str(REPO / "recipes/tiny/rl.yaml"),
            *rl_overrides(sft / "final", reward / "final", rl),
            *BF16,
        ]
    )
    assert evidence(rl)["kl_after"] > 0
    AutoModelForCausalLM.from_pretrained(rl / "final")


def test_single_gpu_config(gpu_base, tmp_path):
    launch("single_gpu", SFT, [*sft_overrides(gpu_base, tmp_path / "x"), *BF16], processes=1)
    assert layout(tmp_path / "x")["world_size"] == 1


@pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")
def test_multi_gpu_ddp_config(gpu_base, tmp_path):
    launch("multi_gpu", SFT, [*sft_overrides(gpu_base, tmp_path / "x"), *BF16])
    assert layout(tmp_path / "x") == {
        **layout(tmp_path / "x"),
        "world_size": GPUS,
        "distributed_type": "MULTI_GPU",
    }


def test_fsdp2_sft_saves_a_whole_model(gpu_base, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fsdp"
    launch("fsdp2", SFT, [*sft_overrides(gpu_base, out), *BF16])
    assert layout(out)["distributed_type"] == "FSDP"
    assert evidence(out)["eval_loss_after"] < evidence(out)["eval_loss_before"]
    AutoModelForCausalLM.from_pretrained(out / "final")


def test_fsdp2_qlora_saves_an_adapter(gpu_base, tmp_path):
    out = tmp_path / "fsdp-qlora"
    model = [
        "model.dtype=bfloat16",
        "model.lora={r: 8}",
        "model.quantization={bits: 4, quant_storage: bfloat16}",
    ]
    launch("fsdp2_qlora", SFT, [*sft_overrides(gpu_base, out), *model, *BF16])
    assert (out / "final/adapter_model.safetensors").stat().st_size > 0


def test_zero3_lora_saves_a_real_adapter_that_loads(gpu_base, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "zero3-lora"
    launch("zero3", SFT, [*sft_overrides(gpu_base, out), "model.lora={r: 8}", *BF16])
    assert layout(out)["zero_stage"] == 3
    adapter = load_file(out / "final/adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpu_base), out / "final")


def test_zero3_offload_pretrains(tokenizer_dir, tmp_path):
    out = tmp_path / "offload"
    launch(
        "zero3_offload", PRETRAIN, [*small_pretrain(tokenizer_dir, out, max_steps=20, eval_steps=20), *BF16]
    )
    assert evidence(out)["eval_loss_after"] < evidence(out)["eval_loss_before"]


def test_ppo_under_zero3(gpu_base, tmp_path):
    sft = tmp_path / "sft"
    run(["train", SFT, *sft_overrides(gpu_base, sft, max_steps=40, eval_steps=40), *BF16])
    reward = tmp_path / "reward"
    run(["train", REWARD, *reward_overrides(sft / "final", reward), *BF16])
    out = tmp_path / "rl"
    launch(
        "zero3",
        str(REPO / "recipes/tiny/rl.yaml"),
        [*rl_overrides(sft / "final", reward / "final", out), *BF16],
    )
    assert layout(out)["zero_stage"] == 3 and evidence(out)["kl_after"] > 0


def test_qlora_and_8bit_optimizer(gpu_base, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    switches = ["model.lora={r: 8}", "model.quantization={bits: 4}", "optim=adamw_bnb_8bit"]
    run(["train", SFT, *sft_overrides(gpu_base, out, max_steps=40, eval_steps=40), *switches, *BF16])
    assert evidence(out)["quantized_layers"] > 0
    assert evidence(out)["eval_loss_after"] < evidence(out)["eval_loss_before"]


def test_liger_kernels(gpu_base, tmp_path):
    pytest.importorskip("liger_kernel", reason="pip install 'gptpipe[liger]'")
    out = tmp_path / "liger"
    run(["train", SFT, *sft_overrides(gpu_base, out), "use_liger_kernel=true", *BF16])
    assert evidence(out)["eval_loss_after"] < evidence(out)["eval_loss_before"]


def test_flash_attention(gpu_base, tmp_path):
    if importlib.util.find_spec("flash_attn") is None:
        pytest.skip("pip install 'gptpipe[flash]'")
    out = tmp_path / "flash"
    args = ["model.attn_implementation=flash_attention_2", "model.dtype=bfloat16", "padding_free=true"]
    run(["train", SFT, *sft_overrides(gpu_base, out), *args, *BF16])
    assert evidence(out)["eval_loss_after"] < evidence(out)["eval_loss_before"]


def test_ppo_resumes_bit_identical_on_a_gpu(gpu_base, tmp_path):
    """Generation samples from the CUDA RNG: a PPO run resumed from its checkpoint repeats every later
    iteration's figures exactly, because checkpoints hold the CUDA RNG states too (one process, fp32)."""
    sft = tmp_path / "sft"
    run(["train", SFT, *sft_overrides(gpu_base, sft, max_steps=40, eval_steps=40)])
    reward = tmp_path / "reward"
    run(["train", REWARD, *reward_overrides(sft / "final", reward)])
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = {"max_steps": 4, "save_steps": 2}
    run(
        [
            "train",
            str(REPO / "recipes/tiny/rl.yaml"),
            *rl_overrides(sft / "final", reward / "final", whole, **args),
        ]
    )
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")  # as if stopped after its checkpoint
    run(
        [
            "train",
            str(REPO / "recipes/tiny/rl.yaml"),
            *rl_overrides(sft / "final", reward / "final", resumed, **args),
        ]
    )

    def later(run_dir):  # iterations 3 and 4, without the wall-clock phase timings
        return [
            {k: v for k, v in r.items() if not k.startswith("time_")}
            for r in read_metrics(run_dir)
            if r["step"] > 2
        ]

    assert later(resumed) == later(whole) and len(later(whole)) == 2

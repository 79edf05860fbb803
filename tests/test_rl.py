"""PPO stage on the tiny world: runs end to end from the SFT and reward models, writes its evidence and a
policy that loads with plain transformers, and a killed run resumes bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, rl_overrides
from test_resume import check_kill_and_resume
from transformers import AutoModelForCausalLM

from gptpipe.cli import run
from gptpipe.errors import UserError
from gptpipe.stages.rl import batch_rows

RL = str(REPO / "recipes/tiny/rl.yaml")


def test_batches_are_a_function_of_seed_and_step():
    assert batch_rows(10, 4, 3, seed=1) == batch_rows(10, 4, 3, seed=1)
    first_epoch = [r for step in range(5) for r in batch_rows(10, 2, step, seed=1)]
    assert sorted(first_epoch) == list(range(10))  # every prompt once per epoch
    assert batch_rows(10, 2, 0, seed=1) != batch_rows(10, 2, 0, seed=2)


def test_ppo_runs_and_reports_reward_kl_and_accuracy(tiny_sft, tiny_reward, tmp_path):
    run(["train", RL, *rl_overrides(tiny_sft, tiny_reward, tmp_path / "rl")])
    e = json.loads((tmp_path / "rl/eval.json").read_text())
    assert e["kl_before"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert e["kl_after"] != 0.0 and e["train_steps"] == 6
    assert {"reward_before", "reward_after", "answer_accuracy_before", "answer_accuracy_after"} <= e.keys()
    records = [json.loads(line) for line in (tmp_path / "rl/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    first = records[0]
    assert (
        first["approx_kl"] < 0.05 and 0.9 < first["ratio_mean"] < 1.1
    )  # dropout off, same positions: ratio ~1
    assert {"entropy", "clipfrac", "value_error", "explained_variance", "response_length"} <= first.keys()
    AutoModelForCausalLM.from_pretrained(tmp_path / "rl/final")


def test_ppo_kill_and_resume_is_bit_identical(tiny_sft, tiny_reward, tmp_path):
    def args(out):
        return rl_overrides(tiny_sft, tiny_reward, out)

    check_kill_and_resume(
        tmp_path,
        RL,
        args,
        steps=6,
        checkpoint=3,
        kill_at=5,
        keys=("reward", "kl", "policy_loss", "value_loss"),
    )


def test_missing_reward_model_is_a_clear_error(tiny_sft, tmp_path):
    with pytest.raises(UserError, match="reward_model is required"):
        run(["train", RL, *rl_overrides(tiny_sft, "null", tmp_path / "x")])


def test_ppo_with_a_lora_policy_uses_the_disabled_adapter_as_reference(tiny_sft, tiny_reward, tmp_path):
    out = tmp_path / "rl-lora"
    overrides = rl_overrides(
        tiny_sft, tiny_reward, out, max_steps=3, save_steps=2, learning_rate="1e-3", eval_prompts=8
    )
    lora = "{r: 8, alpha: 16, dropout: 0.0}"
    # The memory switches together: LoRA policy, LoRA critic, 8-bit frozen reward model.
    run(
        ["train", RL, *overrides, f"model.lora={lora}", f"value_lora={lora}", "reward_quantization={bits: 8}"]
    )
    e = json.loads((out / "eval.json").read_text())
    assert e["kl_before"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter is a no-op (B = 0)
    assert abs(e["kl_after"]) > 1e-4  # the adapter trained; the reference (adapter off) did not move
    assert (out / "final/adapter_config.json").is_file()
    assert (out / "checkpoint-2/critic/adapter_config.json").is_file()


@pytest.mark.distributed
def test_ppo_under_ddp_with_two_processes(tiny_sft, tiny_reward, tmp_path):
    """DDP on CPU (gloo) through accelerate_configs/cpu_ddp.yaml: two processes each roll out their share."""
    out = tmp_path / "rl-ddp"
    overrides = rl_overrides(
        tiny_sft, tiny_reward, out, max_steps=2, per_device_train_batch_size=4, eval_prompts=8, save_steps=0
    )
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", str(REPO / "accelerate_configs/cpu_ddp.yaml")]
    cmd += ["-m", "gptpipe", "train", RL, *overrides, "use_cpu=true"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    e = json.loads((out / "eval.json").read_text())
    assert e["world_size"] == 2 and e["train_steps"] == 2
    assert "8 per iteration (2 processes)" in done.stdout
    assert json.loads((out / "distributed.json").read_text())["world_size"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # only the main process logs

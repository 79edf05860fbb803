"""Several processes on CPU (gloo): SFT under DeepSpeed ZeRO-2 with 2 processes reaches the loss of one
process with the same global batch, records its layout, and saves a loadable model; pretraining under
ZeRO-3 saves the whole model; launcher mistakes (a DeepSpeed config that would silently run plain DDP
on CPU, a launcher that starts one of two processes) are refused; --launch and the Slurm node script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, sft_overrides, small_pretrain
from transformers import AutoModelForCausalLM

from gptpipe.cli import run

SFT = str(REPO / "recipes/tiny/sft.yaml")
PRETRAIN = str(REPO / "recipes/tiny/pretrain.yaml")
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


@pytest.mark.distributed
def test_sft_zero2_two_processes_matches_one_process(tiny_base, tmp_path):
    pytest.importorskip("deepspeed", reason="make setup installs deepspeed (DS_BUILD_OPS=0)")

    def args(out, batch):
        return sft_overrides(tiny_base, out, per_device_train_batch_size=batch, save_steps=100)

    run(["train", SFT, *args(tmp_path / "one", 32)])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "gptpipe",
        "train",
        SFT,
    ]
    extra = ["use_cpu=true", f"deepspeed={REPO / 'deepspeed_configs/zero2.json'}"]
    two = subprocess.run([*cmd, *args(tmp_path / "two", 16), *extra], capture_output=True, text=True, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    layout = json.loads((tmp_path / "two/distributed.json").read_text())
    assert layout == {**layout, "world_size": 2, "distributed_type": "DEEPSPEED", "zero_stage": 2}
    one = json.loads((tmp_path / "one/eval.json").read_text())["eval_loss_after"]
    both = json.loads((tmp_path / "two/eval.json").read_text())["eval_loss_after"]
    # Same global batch (32); the ranks draw different shards, so the order of examples differs a little.
    assert abs(both - one) / one < 0.10, (one, both)
    AutoModelForCausalLM.from_pretrained(tmp_path / "two/final")


@pytest.mark.distributed
def test_accelerate_deepspeed_config_on_cpu_is_refused(tiny_base, tmp_path):
    accelerate = str(Path(sys.executable).parent / "accelerate")  # the venv's, activated or not
    cmd = [accelerate, "launch", "--config_file", str(REPO / "accelerate_configs/zero2.yaml")]
    cmd += ["--num_processes", "2", "-m", "gptpipe", "train", SFT, *sft_overrides(tiny_base, tmp_path / "x")]
    done = subprocess.run([*cmd, "use_cpu=true"], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert done.returncode != 0
    assert "asks for DEEPSPEED, but on CPU it would silently run MULTI_CPU" in done.stderr
    assert not (tmp_path / "x/final").exists()


@pytest.mark.distributed
def test_launcher_that_starts_one_of_two_processes_is_an_error(tiny_base, tmp_path):
    """`accelerate launch --cpu --num_processes 2` quietly starts ONE process: say so instead of training."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "2", "-m", "gptpipe", "train", SFT]
    done = subprocess.run(
        [*cmd, *sft_overrides(tiny_base, tmp_path / "x")], capture_output=True, text=True, env=ENV
    )
    assert done.returncode != 0
    assert "asked for 2 processes but this run has world size 1" in done.stderr
    assert not (tmp_path / "x/final").exists()


def test_launch_shorthand_builds_the_accelerate_command(capsys):
    run(["train", SFT, "max_steps=5", "--launch", "zero2", "--gpus", "8", "--nodes", "2", "--print-command"])
    cmd = capsys.readouterr().out.split()
    assert cmd[1:3] == ["launch", "--config_file"] and cmd[3].endswith("accelerate_configs/zero2.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "16" and cmd[cmd.index("--num_machines") + 1] == "2"
    assert cmd[cmd.index("--deepspeed_config_file") + 1] == str(REPO / "deepspeed_configs/zero2.json")
    assert cmd[-5:] == ["-m", "gptpipe", "train", SFT, "max_steps=5"]
    run(["train", SFT, "--launch", "cpu_ddp", "--print-command"])
    assert capsys.readouterr().out.split()[-1] == "use_cpu=true"  # accelerate does not pass use_cpu on


@pytest.mark.distributed
def test_slurm_node_script_launches_the_processes(tiny_base, tmp_path):
    """scripts/slurm/node.sh is what each Slurm node runs; here as a one-node job with 2 CPU processes."""
    venv = Path(sys.executable).parent.parent
    env = {**ENV, "SLURM_NNODES": "1", "SLURM_NODEID": "0", "GPUS_PER_NODE": "2", "MAIN_ADDR": "127.0.0.1"}
    env |= {"MAIN_PORT": "29531", "GPTPIPE_CONFIG": "cpu_ddp", "VENV": str(venv)}
    args = ["train", SFT, *sft_overrides(tiny_base, tmp_path / "slurm", max_steps=2), "use_cpu=true"]
    done = subprocess.run(
        ["bash", "scripts/slurm/node.sh", *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "slurm/distributed.json").read_text())["world_size"] == 2
    assert (tmp_path / "slurm/final").is_dir()


@pytest.mark.distributed
def test_pretrain_zero3_two_processes_saves_a_full_model(tokenizer_dir, tmp_path):
    """ZeRO-3 shards the weights themselves; the saved final/ must still be the whole model."""
    pytest.importorskip("deepspeed", reason="make setup installs deepspeed (DS_BUILD_OPS=0)")
    out = tmp_path / "zero3"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gptpipe", "train"]
    args = small_pretrain(tokenizer_dir, out, max_steps=6, eval_steps=6, logging_steps=2)
    extra = [
        "use_cpu=true",
        f"deepspeed={REPO / 'deepspeed_configs/zero3.json'}",
        "per_device_train_batch_size=8",
    ]
    done = subprocess.run([*cmd, PRETRAIN, *args, *extra], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "distributed.json").read_text())["zero_stage"] == 3
    evidence = json.loads((out / "eval.json").read_text())
    assert evidence["eval_loss_after"] < evidence["eval_loss_before"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert sum(p.numel() for p in model.parameters()) == evidence["parameters"]  # not a shard

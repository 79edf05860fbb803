"""Several processes on CPU (gloo): real DeepSpeed engines (ZeRO-3 for SFT with LoRA and for pretraining,
ZeRO-2 through the accelerate config) train exactly what one process does with the same global batch,
record their layout and save loadable models; a launcher that starts one of two processes is refused;
--launch and the Slurm node script."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, sft_overrides, small_pretrain
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gptpipe.cli import run
from gptpipe.tracking import read_metrics

SFT = str(REPO / "recipes/tiny/sft.yaml")
PRETRAIN = str(REPO / "recipes/tiny/pretrain.yaml")
ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gptpipe"]
RUN = {"capture_output": True, "text": True, "env": ENV}


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.mark.distributed
def test_sft_zero3_lora_two_processes_matches_one_process(tiny_base, tmp_path):
    """A real DeepSpeed ZeRO-3 engine on 2 CPU processes trains exactly what one process does with the same
    global batch (accelerate hands each process every other micro-batch of the same order), and saves a
    LoRA adapter that is not empty (ZeRO-3 shards it; the 16-bit gather on save puts it together)."""
    pytest.importorskip("deepspeed", reason="make setup installs deepspeed (DS_BUILD_OPS=0)")

    def args(out, batch):
        extra = {"model.lora": "{r: 8, dropout: 0.0}", "logging_steps": 2}  # dropout draws differ per process
        return sft_overrides(tiny_base, out, per_device_train_batch_size=batch, **extra)

    run(["train", SFT, *args(tmp_path / "one", 32)])
    extra = ["use_cpu=true", f"deepspeed={REPO / 'deepspeed_configs/zero3.json'}"]
    two = subprocess.run([*TORCHRUN, "train", SFT, *args(tmp_path / "two", 16), *extra], **RUN)
    assert two.returncode == 0, two.stderr[-3000:]
    layout = json.loads((tmp_path / "two/distributed.json").read_text())
    assert layout == {**layout, "world_size": 2, "distributed_type": "DEEPSPEED", "zero_stage": 3}
    one, both = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(both) == [2, 4, 6, 8, 10]
    for step, loss in one.items():  # summed in another order: not bit for bit
        assert both[step] == pytest.approx(loss, rel=1e-4), (step, one, both)
    adapter = load_file(tmp_path / "two/final/adapter_model.safetensors")
    trained = [t for name, t in adapter.items() if "lora_B" in name]  # B starts at zero
    assert (
        trained and all(t.numel() > 0 for t in adapter.values()) and any(t.abs().sum() > 0 for t in trained)
    )
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "two/final")


@pytest.mark.extended  # a DeepSpeed engine for a Trainer stage: the SFT ZeRO-3 test above
@pytest.mark.distributed
def test_accelerate_zero2_config_runs_deepspeed_on_cpu(tiny_base, tmp_path):
    """accelerate_configs/zero2.yaml as a user launches it: accelerate alone would quietly run plain DDP on
    a CPU; gptpipe builds a real DeepSpeed ZeRO-2 engine, which trains packed SFT exactly as one process
    does with the same global batch."""
    pytest.importorskip("deepspeed", reason="make setup installs deepspeed (DS_BUILD_OPS=0)")
    accelerate = str(Path(sys.executable).parent / "accelerate")  # the venv's, activated or not
    cmd = [accelerate, "launch", "--config_file", str(REPO / "accelerate_configs/zero2.yaml")]
    cmd += [
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "-m",
        "gptpipe",
        "train",
        SFT,
    ]  # 0: a free port

    def overrides(out, batch):
        return sft_overrides(
            tiny_base, out, max_steps=4, logging_steps=1, packing="true", per_device_train_batch_size=batch
        )

    # Global batch 4 packed rows (one process) or 2 + 2: padding-free attention costs the square of a row's length.
    run(["train", SFT, *overrides(tmp_path / "one", 4)])  # first: it prepares the data both runs read
    done = subprocess.run([*cmd, *overrides(tmp_path / "x", 2), "use_cpu=true"], **RUN, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    layout = json.loads((tmp_path / "x/distributed.json").read_text())
    assert layout == {**layout, "world_size": 2, "distributed_type": "DEEPSPEED", "zero_stage": 2}
    AutoModelForCausalLM.from_pretrained(tmp_path / "x/final")
    one, both = _losses(tmp_path / "one"), _losses(tmp_path / "x")
    assert sorted(both) == [1, 2, 3, 4] and all(both[s] == pytest.approx(one[s], rel=1e-5) for s in one), (
        one,
        both,
    )


@pytest.mark.extended  # the launch command itself: test_launch_shorthand_builds_the_accelerate_command
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


TINY_STAGES = ("tokenizer", "pretrain", "sft", "reward", "rl")
# Every stage shrunk to seconds; what each trains is tested elsewhere: here, that each runs under the launcher.
SMALL_STAGES = {
    "tokenizer": {"max_train_documents": 2000},
    "pretrain": {
        "model.hidden_size": 32,
        "model.intermediate_size": 64,
        "model.num_attention_heads": 4,
        "block_size": 64,
        "max_steps": 4,
        "eval_steps": 4,
        "probe_datasets": [],
        "use_cpu": True,
    },
    "sft": {"max_steps": 2, "eval_steps": 2, "answer_datasets": [], "use_cpu": True},
    "reward": {"max_steps": 2, "eval_steps": 2, "use_cpu": True},
    "rl": {
        "max_steps": 1,
        "per_device_train_batch_size": 4,
        "eval_prompts": 4,
        "max_new_tokens": 8,
        "ppo_epochs": 1,
        "use_cpu": True,
    },
}


@pytest.mark.extended  # the launch it builds: test_launch_shorthand_builds_the_accelerate_command
@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_node_script_launches_the_whole_pipeline(tmp_path):
    """scripts/slurm/node.sh (what each Slurm node runs, here a one-node job with 2 CPU processes) launching
    the tiny pipeline: every stage goes through the one runner, so each records the 2-process layout; the
    tokenizer stage runs on the main process alone (one final/ written once) while the other waits."""
    venv = Path(sys.executable).parent.parent
    env = {**ENV, "SLURM_NNODES": "1", "SLURM_NODEID": "0", "GPUS_PER_NODE": "2", "MAIN_ADDR": "127.0.0.1"}
    env |= {"MAIN_PORT": "29531", "GPTPIPE_CONFIG": "cpu_ddp", "VENV": str(venv)}
    stages = [
        {"recipe": str(REPO / f"recipes/tiny/{s}.yaml"), "overrides": SMALL_STAGES[s]} for s in TINY_STAGES
    ]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "runs"), "stages": stages}))
    done = subprocess.run(
        ["bash", "scripts/slurm/node.sh", "pipeline", str(pipeline)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in TINY_STAGES:
        layout = json.loads((tmp_path / "runs" / stage / "distributed.json").read_text())
        assert layout["world_size"] == 2, (stage, layout)
        assert (tmp_path / "runs" / stage / "final").is_dir() and (
            tmp_path / "runs" / stage / "eval.json"
        ).is_file()
    assert json.loads((tmp_path / "runs/tokenizer/distributed.json").read_text())["runs_on"] == "main process"
    assert json.loads((tmp_path / "runs/sft/distributed.json").read_text())["distributed_type"] == "MULTI_CPU"
    assert done.stdout.count("[tokenizer] saved") == 1  # one process trained and wrote it
    assert not list((tmp_path / "runs/tokenizer").glob(".main-process-result-*"))
    AutoModelForCausalLM.from_pretrained(tmp_path / "runs/rl/final")
    assert (tmp_path / "runs/report.md").is_file()


@pytest.mark.extended  # ZeRO-3's engine: the SFT test above; a whole model saved from it: PPO's ZeRO-3 test
@pytest.mark.distributed
def test_pretrain_zero3_two_processes_matches_one_process(tokenizer_dir, tmp_path):
    """ZeRO-3 (weights sharded too) on 2 CPU processes: the losses of one process with the same global
    batch, and final/ is the whole model, not a shard."""
    pytest.importorskip("deepspeed", reason="make setup installs deepspeed (DS_BUILD_OPS=0)")

    def args(out, batch):
        return small_pretrain(
            tokenizer_dir, out, max_steps=6, eval_steps=6, logging_steps=2, per_device_train_batch_size=batch
        )

    run(["train", PRETRAIN, *args(tmp_path / "one", 16)])
    extra = ["use_cpu=true", f"deepspeed={REPO / 'deepspeed_configs/zero3.json'}"]
    done = subprocess.run([*TORCHRUN, "train", PRETRAIN, *args(tmp_path / "two", 8), *extra], **RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two/distributed.json").read_text())["zero_stage"] == 3
    one, both = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(both) == [2, 4, 6] and all(both[s] == pytest.approx(one[s], rel=1e-4) for s in one), (
        one,
        both,
    )
    evidence = json.loads((tmp_path / "two/eval.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two/final")
    assert sum(p.numel() for p in model.parameters()) == evidence["parameters"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "accelerate_configs").glob("*.yaml")))
def test_every_shipped_accelerate_config_loads_and_launches(name, capsys):
    """accelerate reads each shipped config (unknown keys or values fail here), its DeepSpeed JSON exists,
    and --launch builds the command; the runs themselves are the CPU tests above and tests/test_gpu.py."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = REPO / "accelerate_configs" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}
    run(["train", SFT, "--launch", name, "--gpus", "2", "--print-command"])
    cmd = capsys.readouterr().out.split()
    if config.distributed_type == "DEEPSPEED":
        ds_file = Path(cmd[cmd.index("--deepspeed_config_file") + 1])
        ds = json.loads(ds_file.read_text())
        assert ds["zero_optimization"]["stage"] in (2, 3)
        if ds["zero_optimization"]["stage"] == 3:  # saves gather whole weights (ZeRO-3 + LoRA adapters)
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if name.startswith("fsdp"):
        assert config.fsdp_config["fsdp_version"] == 2


def test_every_deepspeed_config_is_shipped_with_a_launch_config():
    used = {
        (yaml.safe_load(p.read_text()).get("deepspeed_config") or {}).get("deepspeed_config_file")
        for p in (REPO / "accelerate_configs").glob("*.yaml")
    }
    shipped = {f"deepspeed_configs/{p.name}" for p in (REPO / "deepspeed_configs").glob("*.json")}
    assert shipped <= used, shipped - used


def test_memory_switches_that_cannot_work_together_are_refused(tmp_path):
    from gptpipe.distributed import refuse_incompatible
    from gptpipe.errors import UserError
    from gptpipe.recipe import load_recipe

    def cfg(*extra):
        return load_recipe(SFT, [*sft_overrides(tmp_path / "base", tmp_path / "x"), *extra])

    qlora = cfg("model.quantization={bits: 4}", "model.lora={r: 8}")
    with pytest.raises(UserError, match="cannot be sharded by DeepSpeed ZeRO-3"):
        refuse_incompatible(qlora, "DEEPSPEED", 3)
    refuse_incompatible(qlora, "DEEPSPEED", 2)  # ZeRO-2 keeps whole (quantized) weights: allowed
    with pytest.raises(UserError, match="quant_storage: bfloat16"):
        refuse_incompatible(qlora, "FSDP", None)
    refuse_incompatible(cfg("model.quantization={bits: 4, quant_storage: bfloat16}"), "FSDP", None)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(UserError, match=r"pip install 'gptpipe\[flash\]'"):
            refuse_incompatible(cfg("model.attn_implementation=flash_attention_2"), "NO", None)

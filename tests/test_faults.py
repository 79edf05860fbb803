"""Faults injected into real runs on CPU (gptpipe.faults, docs/fault-tolerance.md): preemption by SIGTERM,
a kill while a checkpoint is being written, a NaN loss, a full disk, running out of memory, for the
Hugging Face stages (pretraining stands for them) and gptpipe's own PPO."""

import json
import signal

import pytest
import torch
from conftest import REPO, rl_overrides, small_pretrain, tiny_llama_config
from safetensors.torch import load_file
from test_resume import PRETRAIN, check_interrupted_runs, logged

from gptpipe import faults
from gptpipe.cli import main
from gptpipe.runs import checkpoints, is_complete, last_checkpoint, mark_complete, rotate_checkpoints

RL = str(REPO / "recipes/tiny/rl.yaml")
SIGNAL = "fault_callbacks:SignalAtStep"
KILL_ON_SAVE = "fault_callbacks:KillOnSave"


def cli(args: list[str], capsys) -> tuple[int, str]:
    """``gptpipe ...`` in this process: (exit code, what it printed to stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(args)
    return ended.value.code, capsys.readouterr().err


def test_preempted_then_killed_while_saving_resumes_bit_identical(tokenizer_dir, tmp_path):
    """SIGTERM during step 7: step 7 finishes, checkpoint-7 is saved, exit 75. The rerun is killed while
    writing checkpoint-10 (before it is marked complete): checkpoint-7 survives although save_total_limit
    is 1. The next rerun drops the half-written checkpoint, resumes from 7 and ends exactly where an
    uninterrupted run ends."""

    def args(out):
        return small_pretrain(
            tokenizer_dir,
            out,
            max_steps=14,
            logging_steps=1,
            save_steps=5,
            eval_steps=7,
            save_total_limit=1,
        )

    preempt = (SIGNAL, {"GPTPIPE_TEST_SIGNAL_AT_STEP": 7}, 75, 7, 7)
    kill_on_save = (KILL_ON_SAVE, {"GPTPIPE_TEST_KILL_ON_SAVE": 10}, -9, 7, 10)
    resumed = check_interrupted_runs(
        tmp_path, PRETRAIN, args, 14, [preempt, kill_on_save], ("loss", "grad_norm", "eval_loss")
    )
    assert "removing incomplete" in resumed and "checkpoint-10" in resumed


def test_ppo_preempted_then_killed_while_saving_resumes_bit_identical(tiny_sft, tiny_reward, tmp_path):
    """With PPO-ptx: the ptx rows of each update are a function of the step, so the resumed run takes the same."""

    def args(out):
        ptx = {"ptx_coef": 1.0, "ptx_datasets": "[{path: tinyworld:sft}]"}
        return rl_overrides(tiny_sft, tiny_reward, out, max_steps=5, save_steps=3, save_total_limit=1, **ptx)

    preempt = (SIGNAL, {"GPTPIPE_TEST_SIGNAL_AT_STEP": 2}, 75, 2, 2)
    kill_on_save = (KILL_ON_SAVE, {"GPTPIPE_TEST_KILL_ON_SAVE": 3}, -9, 2, 3)
    compared = ("reward", "kl", "policy_loss", "value_loss", "ptx_loss")
    check_interrupted_runs(tmp_path, RL, args, 5, [preempt, kill_on_save], compared)


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(
    tokenizer_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("GPTPIPE_TEST_NAN_AT_STEP", "7")
    out = tmp_path / "run"
    args = small_pretrain(
        tokenizer_dir, out, max_steps=10, save_steps=5, eval_steps=10, callbacks="[fault_callbacks:NaNAtStep]"
    )
    code, err = cli(["train", PRETRAIN, *args], capsys)
    assert code == 3 and "Traceback" not in err
    assert "step 7: the gradient: NaN or infinite" in err
    assert f"last good checkpoint is {out / 'checkpoint-5'}" in err and "on_nonfinite: skip" in err
    assert last_checkpoint(out) == out / "checkpoint-5" and not (out / "final").exists()
    assert [step for step, _ in checkpoints(out)] == [5]


def test_nan_steps_can_be_skipped_and_are_counted(tokenizer_dir, tmp_path, monkeypatch, capsys):
    from gptpipe.cli import run

    monkeypatch.setenv("GPTPIPE_TEST_NAN_AT_STEP", "3")
    out = tmp_path / "run"
    args = small_pretrain(
        tokenizer_dir,
        out,
        max_steps=6,
        logging_steps=1,
        save_steps=100,
        eval_steps=6,
        on_nonfinite="skip",
        callbacks="[fault_callbacks:NaNAtStep]",
    )
    run(["train", PRETRAIN, *args])
    assert "step 3: non-finite gradient, update skipped" in capsys.readouterr().err
    evidence = json.loads((out / "eval.json").read_text())
    assert evidence["skipped_nonfinite_steps"] == 1
    weights = load_file(out / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # the NaN update never reached them
    assert [s for s, v in logged(out, "loss") if v == v] == [1, 2, 3, 4, 5, 6]  # later steps trained on


def test_full_disk_stops_before_writing_a_checkpoint(tokenizer_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(faults, "free_bytes", lambda path: 10_000)  # a quota of 10 kB
    out = tmp_path / "run"
    code, err = cli(
        ["train", PRETRAIN, *small_pretrain(tokenizer_dir, out, max_steps=8, save_steps=4)], capsys
    )
    assert code == 4 and "Traceback" not in err
    assert "not enough disk space to save checkpoint-4" in err and "GB needed" in err
    assert checkpoints(out) == [] and not (out / "final").exists()  # nothing half-written


def test_out_of_memory_names_the_stage_the_batch_and_what_to_change(
    tokenizer_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("GPTPIPE_TEST_OOM_AT_STEP", "2")
    args = small_pretrain(
        tokenizer_dir, tmp_path / "run", max_steps=4, callbacks="[fault_callbacks:OOMAtStep]"
    )
    code, err = cli(["train", PRETRAIN, *args, "per_device_train_batch_size=4"], capsys)
    assert code == 5 and "Traceback" not in err
    assert "[pretrain] out of host (CPU) memory on a batch of shape [4, 64]" in err
    assert "gradient_accumulation_steps" in err and "gradient_checkpointing" in err and "ZeRO-3" in err


def test_checkpoints_count_only_when_marked_complete(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        mark_complete(tmp_path / f"checkpoint-{step}", step, 1)
    (tmp_path / "checkpoint-8").mkdir()  # killed while saving: no marker
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "checkpoint_complete.json").write_text('{"st')  # killed writing the marker
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-6"
    assert not is_complete(tmp_path / "checkpoint-10")
    rotate_checkpoints(tmp_path, keep=2, protect=tmp_path / "checkpoint-2")
    assert [s for s, _ in checkpoints(tmp_path)] == [2, 6, 8, 10]  # 4 rotated; incomplete ones not counted


def test_stop_signals_are_remembered_then_restored():
    previous = signal.getsignal(signal.SIGUSR1)
    stop = faults.StopSignals().install()
    signal.raise_signal(signal.SIGUSR1)
    assert stop.received == signal.SIGUSR1 and stop.agreed("cpu")
    stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_ppo_iteration_guards_rewards_and_skips_or_raises(tmp_path):
    from transformers import LlamaForCausalLM

    from gptpipe.ppo.iteration import NonFiniteUpdate, PPOModels, PPOSettings, ppo_iteration
    from gptpipe.ppo.kl import FixedKLController
    from gptpipe.ppo.value import build_value_model

    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config())
    reference = LlamaForCausalLM(tiny_llama_config()).requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    policy.save_pretrained(tmp_path / "policy")
    critic = build_value_model(str(tmp_path / "policy"), "policy")
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (policy, critic)]
    before = {k: v.clone() for k, v in policy.state_dict().items()}

    def broken_reward_model(rollout):
        return torch.full((rollout.input_ids.shape[0],), float("nan"))

    def iterate(skip: bool, reward_model=broken_reward_model):
        models = PPOModels(policy, reference, critic, *optimizers)
        settings = PPOSettings(
            pad_token_id=0, eos_token_ids=(2,), max_new_tokens=4, ppo_epochs=1, skip_nonfinite=skip
        )
        return ppo_iteration(
            models,
            reward_model,
            [[1, 5, 6], [1, 7, 8]],
            FixedKLController(0.1),
            settings,
            torch.Generator().manual_seed(0),
        )

    with pytest.raises(NonFiniteUpdate, match="rewards"):
        iterate(skip=False)
    assert iterate(skip=True)["skipped_nonfinite"] == 1
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # nothing was applied

    # Finite rollouts and rewards, but the update's forward pass (with gradients) blows up.
    def reward_model(rollout):
        return torch.ones(rollout.input_ids.shape[0])

    policy.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output * float("nan") if torch.is_grad_enabled() else output
    )
    with pytest.raises(NonFiniteUpdate, match="gradient norm"):
        iterate(False, reward_model)
    assert (
        iterate(True, reward_model)["skipped_nonfinite"] == 1
    )  # one minibatch, one epoch: one update dropped
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())

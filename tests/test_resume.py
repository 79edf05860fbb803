"""Kill a run hard after a checkpoint, rerun the same command: it resumes and every later logged loss, the
final weights and the evidence equal the uninterrupted run's bit for bit (CPU). SFT, reward and DPO here;
pretraining and PPO, preempted and killed while saving, in test_faults.py."""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, as_overrides, reward_overrides, sft_overrides, small_pretrain
from safetensors.torch import load_file

from gptpipe.runs import last_checkpoint

PRETRAIN = str(REPO / "recipes/tiny/pretrain.yaml")
TIMING_KEYS = {"seconds"}  # wall-clock fields: the only evidence allowed to differ


def gptpipe(args, recipe=PRETRAIN, **env):
    run_env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "helpers"), **env}
    return subprocess.run(
        [sys.executable, "-m", "gptpipe", "train", recipe, *args],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=REPO,
    )


def in_process(args, recipe) -> str:
    """``gptpipe train`` in this process; returns what it printed."""
    from gptpipe.cli import run

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run(["train", recipe, *args])
    return out.getvalue()


def logged(output_dir, key):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def check_kill_and_resume(
    tmp_path, recipe, args, steps, checkpoint, kill_at, keys=("loss", "grad_norm", "eval_loss")
):
    """Reference run; the same run killed (SIGKILL) at ``kill_at``; rerun: all must match the reference.

    Only the killed run needs its own process; the reference and the rerun run in this one (faster).
    """
    # It logged past its last checkpoint: the rerun must drop those lines.
    faults = [
        ("kill_callback:KillAtStep", {"GPTPIPE_TEST_KILL_AT_STEP": kill_at}, -9, checkpoint, kill_at - 1)
    ]
    check_interrupted_runs(tmp_path, recipe, args, steps, faults, keys)


def check_interrupted_runs(tmp_path, recipe, args, steps, faults, keys):
    """Reference run; then the same command in a process of its own once per fault, each ended by it; then
    once more, in this process: every later logged value, the final weights and the evidence must equal the
    uninterrupted run's bit for bit. ``faults``: (callback, environment, exit code, the checkpoint that
    the next run must resume from, the last step it logged)."""
    in_process(args(tmp_path / "reference"), recipe)
    run = tmp_path / "interrupted"
    for callback, env, returncode, checkpoint, last_logged in faults:
        ended = gptpipe(
            args(run) + [f"callbacks=[{callback}]"], recipe, **{k: str(v) for k, v in env.items()}
        )
        assert ended.returncode == returncode, ended.stderr[-3000:]
        assert "Traceback" not in ended.stderr or returncode == -9
        assert last_checkpoint(run) == run / f"checkpoint-{checkpoint}"
        assert not (run / "final").exists() and not (run / "eval.json").exists()  # it never looks finished
        assert max(step for step, _ in logged(run, keys[0])) == last_logged

    resumed = in_process(args(run), recipe)  # the same command again
    assert f"resuming from {run / f'checkpoint-{faults[-1][3]}'}" in resumed

    for key in keys:
        assert logged(run, key) == logged(tmp_path / "reference", key), key
    assert len(logged(run, keys[0])) == steps
    ref = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    new = load_file(run / "final" / "model.safetensors")
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
    ref_evidence = json.loads((tmp_path / "reference" / "eval.json").read_text())
    new_evidence = json.loads((run / "eval.json").read_text())
    assert {k: v for k, v in new_evidence.items() if k not in TIMING_KEYS} == {
        k: v for k, v in ref_evidence.items() if k not in TIMING_KEYS
    }
    return resumed


def test_sft_kill_and_resume_is_bit_identical(tiny_base, tmp_path):
    def args(out):
        # Batch 8, not the recipe's 32: the steps are the test (bit-identical resume at any batch size).
        return sft_overrides(
            tiny_base,
            out,
            max_steps=20,
            logging_steps=1,
            save_steps=10,
            eval_steps=10,
            per_device_train_batch_size=8,
        )

    check_kill_and_resume(
        tmp_path, str(REPO / "recipes/tiny/sft.yaml"), args, steps=20, checkpoint=10, kill_at=13
    )


@pytest.mark.extended  # the Trainer's resume: the SFT kill-and-resume test above
def test_reward_kill_and_resume_is_bit_identical(tiny_sft, tmp_path):
    def args(out):
        return reward_overrides(
            tiny_sft,
            out,
            max_steps=16,
            logging_steps=1,
            save_steps=8,
            eval_steps=8,
            check_reload="false",
            per_device_train_batch_size=8,  # the steps are the test, not the batch
            **{"eval_datasets.0.max_samples": 64},  # evaluation is most of this run's time
        )

    check_kill_and_resume(
        tmp_path, str(REPO / "recipes/tiny/reward.yaml"), args, steps=16, checkpoint=8, kill_at=11
    )


def test_resume_false_starts_over(tokenizer_dir, tmp_path, monkeypatch, capsys):
    from gptpipe.cli import run as train

    run = tmp_path / "run"
    monkeypatch.setenv("GPTPIPE_TEST_CRASH_AT_STEP", "7")
    crash = small_pretrain(
        tokenizer_dir, run, max_steps=20, save_steps=5, eval_steps=10, callbacks="[kill_callback:CrashAtStep]"
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(["train", PRETRAIN, *crash])
    assert (run / "checkpoint-5").is_dir() and not (run / "final").exists()
    monkeypatch.delenv("GPTPIPE_TEST_CRASH_AT_STEP")
    capsys.readouterr()
    train(
        [
            "train",
            PRETRAIN,
            *small_pretrain(tokenizer_dir, run, max_steps=20, save_steps=50, eval_steps=10, resume="false"),
        ]
    )
    assert "resuming" not in capsys.readouterr().out
    assert not (run / "checkpoint-5").exists()  # the old run's checkpoints were cleared
    assert [s for s, _ in logged(run, "loss")] == [5, 10, 15, 20]


def test_resume_from_checkpoint_continues_another_runs_checkpoint(tokenizer_dir, tmp_path, capsys):
    """``resume_from_checkpoint: PATH`` (the HF key) starts a new run folder from an earlier run's checkpoint:
    it continues that run exactly (the step-10 loss is the first run's)."""
    from gptpipe.cli import run as train
    from gptpipe.errors import UserError

    first, second = tmp_path / "first", tmp_path / "second"
    train(
        ["train", PRETRAIN, *small_pretrain(tokenizer_dir, first, max_steps=10, save_steps=5, eval_steps=10)]
    )
    capsys.readouterr()
    args = small_pretrain(tokenizer_dir, second, max_steps=10, save_steps=50, eval_steps=10)
    train(["train", PRETRAIN, *args, f"resume_from_checkpoint={first / 'checkpoint-5'}"])
    assert f"resuming from {first / 'checkpoint-5'}" in capsys.readouterr().out
    assert logged(second, "loss") == [s for s in logged(first, "loss") if s[0] > 5]
    assert json.loads((second / "eval.json").read_text())["train_steps"] == 10
    with pytest.raises(UserError, match="resume_from_checkpoint: .* is not a folder"):
        train(
            ["train", PRETRAIN, *small_pretrain(tokenizer_dir, tmp_path / "x"), "resume_from_checkpoint=nope"]
        )


@pytest.mark.extended  # the Trainer's resume: the SFT kill-and-resume test
def test_dpo_kill_and_resume_is_bit_identical(tiny_sft, tmp_path):
    def args(out):
        settings = {"output_dir": out, "model.name_or_path": tiny_sft, "max_steps": 8, "logging_steps": 1}
        settings |= {
            "save_steps": 4,
            "eval_prompts": 8,
            "disable_tqdm": "true",
            "per_device_train_batch_size": 8,
        }
        settings |= {
            "datasets.0.max_samples": 256,
            "eval_datasets.0.max_samples": 32,
        }  # the steps are the test
        return as_overrides(settings)

    check_kill_and_resume(
        tmp_path,
        str(REPO / "recipes/tiny/dpo.yaml"),
        args,
        steps=8,
        checkpoint=4,
        kill_at=6,
        keys=("loss", "grad_norm"),
    )

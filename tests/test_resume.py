"""Kill a run hard after a checkpoint, rerun the same command: it resumes and every later logged loss,
and the final weights, equal the uninterrupted run's bit for bit (CPU). Pretraining and SFT."""

import json
import os
import subprocess
import sys

import torch
from conftest import REPO, small_pretrain
from safetensors.torch import load_file

PRETRAIN = str(REPO / "recipes/tiny/pretrain.yaml")


def gptpipe(args, recipe=PRETRAIN, **env):
    run_env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "helpers"), **env}
    return subprocess.run(
        [sys.executable, "-m", "gptpipe", "train", recipe, *args],
        capture_output=True,
        text=True,
        env=run_env,
        cwd=REPO,
    )


def logged(output_dir, key):
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def test_kill_and_resume_is_bit_identical(tokenizer_dir, tmp_path):
    def args(out, *extra):
        return small_pretrain(
            tokenizer_dir, out, max_steps=30, logging_steps=1, save_steps=10, eval_steps=10
        ) + list(extra)

    reference = gptpipe(args(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "interrupted"
    killed = gptpipe(args(run, "callbacks=[kill_callback:KillAtStep]"), GPTPIPE_TEST_KILL_AT_STEP="15")
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no chance to clean up
    assert (
        (run / "checkpoint-10").is_dir() and not (run / "final").exists() and not (run / "eval.json").exists()
    )
    assert max(step for step, _ in logged(run, "loss")) == 14  # it logged past its last checkpoint

    resumed = gptpipe(args(run))  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "checkpoint-10" in resumed.stdout

    for key in ("loss", "grad_norm", "eval_loss"):
        assert logged(run, key) == logged(tmp_path / "reference", key), key
    assert len(logged(run, "loss")) == 30
    ref_weights = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    new_weights = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(ref_weights[k], new_weights[k]) for k in ref_weights)
    evidence = json.loads((run / "eval.json").read_text())
    assert evidence == {
        **json.loads((tmp_path / "reference" / "eval.json").read_text()),
        "seconds": evidence["seconds"],
    }


def test_resume_false_starts_over(tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    killed = gptpipe(
        small_pretrain(
            tokenizer_dir,
            run,
            max_steps=20,
            save_steps=5,
            eval_steps=10,
            **{"callbacks": "[kill_callback:KillAtStep]"},
        ),
        GPTPIPE_TEST_KILL_AT_STEP="7",
    )
    assert killed.returncode == -9
    fresh = gptpipe(
        small_pretrain(tokenizer_dir, run, max_steps=20, save_steps=50, eval_steps=10, resume="false")
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming" not in fresh.stdout
    assert not (run / "checkpoint-5").exists()  # the old run's checkpoints were cleared
    assert [s for s, _ in logged(run, "loss")] == [5, 10, 15, 20]


def test_sft_kill_and_resume_is_bit_identical(tiny_base, tmp_path):
    from conftest import sft_overrides

    sft = str(REPO / "recipes/tiny/sft.yaml")

    def args(out, *extra):
        return sft_overrides(
            tiny_base, out, max_steps=20, logging_steps=1, save_steps=10, eval_steps=10
        ) + list(extra)

    reference = gptpipe(args(tmp_path / "reference"), recipe=sft)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "interrupted"
    killed = gptpipe(
        args(run, "callbacks=[kill_callback:KillAtStep]"), recipe=sft, GPTPIPE_TEST_KILL_AT_STEP="13"
    )
    assert killed.returncode == -9 and (run / "checkpoint-10").is_dir() and not (run / "final").exists()
    resumed = gptpipe(args(run), recipe=sft)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    for key in ("loss", "grad_norm", "eval_loss"):
        assert logged(run, key) == logged(tmp_path / "reference", key), key
    ref = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    new = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(ref[k], new[k]) for k in ref)

"""Sweeps: a 2x2 grid over a tiny pretraining run is ranked by its metric, and a sweep cut off mid-trial
finishes on rerun without retraining finished trials (the interrupted trial resumes from its checkpoint)."""

import csv
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from gptpipe.cli import run
from gptpipe.errors import UserError
from gptpipe.sweep import load_sweep, trial_name


def write_sweep(tmp_path, tokenizer_dir, **extra):
    sweep = {
        "base": str(REPO / "recipes/tiny/pretrain.yaml"),
        "output_dir": str(tmp_path / "sweep"),
        "metric": "perplexity_after",
        "direction": "minimize",
        "grid": {"learning_rate": [1.0e-3, 3.0e-3], "model.hidden_size": [32, 64]},
        "overrides": {
            "model.tokenizer": str(tokenizer_dir),
            "model.intermediate_size": 64,
            "model.num_attention_heads": 4,
            "block_size": 64,
            "max_steps": 12,
            "save_steps": 6,
            "eval_steps": 12,
            "logging_steps": 3,
            "probe_datasets": [],
            "disable_tqdm": True,
            "callbacks": ["kill_callback:KillAtStep"],  # a no-op unless GPTPIPE_TEST_KILL_AT_STEP is set
        },
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def sweep_cmd(path, *args, **env):
    run_env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "helpers"), **env}
    return subprocess.run(
        [sys.executable, "-m", "gptpipe", "sweep", str(path), *args],
        capture_output=True,
        text=True,
        env=run_env,
    )


@pytest.mark.extended  # a sweep rerun that finishes: test_trial_that_crashes_is_failed_and_the_rerun_finishes
def test_interrupted_sweep_finishes_and_ranks(tokenizer_dir, tmp_path, capsys):
    path = write_sweep(tmp_path, tokenizer_dir)
    out = tmp_path / "sweep"
    run(["sweep", str(path), "--max-trials", "2"])  # two trials, then the job ends
    finished = sorted(p for p in out.iterdir() if (p / "eval.json").is_file())
    assert len(finished) == 2
    stamps = {p: (p / "eval.json").stat().st_mtime_ns for p in finished}

    killed = sweep_cmd(path, GPTPIPE_TEST_KILL_AT_STEP="9")  # the third trial dies after its checkpoint
    assert killed.returncode == -9, killed.stderr[-3000:]

    capsys.readouterr()
    run(["sweep", str(path)])  # the same command again
    resumed = capsys.readouterr().out
    assert "was cut off: running it again" in resumed and "resuming from" in resumed
    assert {p: (p / "eval.json").stat().st_mtime_ns for p in finished} == stamps  # not retrained

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    values = [float(r["perplexity_after"]) for r in rows]
    assert values == sorted(values)  # best (lowest perplexity) first
    assert "| best |" in (out / "results.md").read_text().splitlines()[4]
    assert (out / "plots/learning_rate.png").is_file() and (out / "study.db").is_file()


def test_trial_that_crashes_is_failed_and_the_rerun_finishes(tokenizer_dir, tmp_path, monkeypatch, capsys):
    """A trial that raises something other than a user error (out of memory, a bug in a library) is marked
    FAIL in the study; left RUNNING, every rerun would retry it first and the sweep would never finish."""
    import optuna

    path = write_sweep(tmp_path, tokenizer_dir, grid={"learning_rate": [1.0e-3, 3.0e-3]})
    spec = yaml.safe_load(path.read_text())
    spec["overrides"] |= {
        "max_steps": 2,
        "eval_steps": 2,
        "callbacks": ["fault_callbacks:CrashAtLearningRate"],
    }
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("GPTPIPE_TEST_CRASH_AT_LR", "0.003")
    run(["sweep", str(path)])
    assert "RuntimeError('simulated crash inside a library" in capsys.readouterr().out
    storage = f"sqlite:///{tmp_path / 'sweep/study.db'}"
    states = [t.state.name for t in optuna.load_study(study_name="sweep", storage=storage).trials]
    assert states == ["COMPLETE", "FAIL"]
    run(["sweep", str(path)])  # the rerun tries the failed point once more and finishes
    states = [t.state.name for t in optuna.load_study(study_name="sweep", storage=storage).trials]
    assert states == ["COMPLETE", "FAIL", "FAIL"]
    with open(tmp_path / "sweep/results.csv") as f:
        assert [r["trial"] for r in csv.DictReader(f)] == ["learning_rate=0.001"]


def test_emit_writes_one_command_per_trial(tokenizer_dir, tmp_path, capsys):
    path = write_sweep(tmp_path, tokenizer_dir)
    run(["sweep", str(path), "--emit", "slurm"])
    commands = (tmp_path / "sweep/commands.sh").read_text().splitlines()
    assert len(commands) == 4 and all(c.startswith("gptpipe train ") for c in commands)
    script = (tmp_path / "sweep/sweep.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script and "SLURM_ARRAY_TASK_ID" in script
    assert {c.split("output_dir=")[1] for c in commands} == {
        str(tmp_path / "sweep" / trial_name({"learning_rate": lr, "model.hidden_size": h}))
        for lr in (1e-3, 3e-3)
        for h in (32, 64)
    }


def test_sweep_errors_name_the_key(tokenizer_dir, tmp_path):
    with pytest.raises(UserError, match="nothing to sweep"):
        load_sweep(write_sweep(tmp_path, tokenizer_dir, grid={}))
    with pytest.raises(UserError, match="random search needs the number of trials"):
        load_sweep(
            write_sweep(tmp_path, tokenizer_dir, random={"learning_rate": {"low": 1e-4, "high": 1e-2}})
        )


def test_trials_rank_by_an_lm_eval_score(tokenizer_dir, tmp_path):
    """metric: lm_eval.<task>.<metric> reads the scores a trial's eval_tasks wrote (eval-*.json)."""
    import json

    from gptpipe.sweep import read_metric

    cfg = load_sweep(write_sweep(tmp_path, tokenizer_dir, metric="lm_eval.tinyworld.answer_accuracy"))
    trial = tmp_path / "trial"
    trial.mkdir()
    scores = {"tinyworld": {"answer_accuracy": 0.75, "answer_accuracy_stderr": 0.05}}
    (trial / "eval-tinyworld.json").write_text(json.dumps({"results": scores}))
    assert read_metric(cfg, trial) == 0.75
    cfg.metric = "lm_eval.mmlu.acc"
    with pytest.raises(UserError, match="lm_eval.mmlu.acc.*no such score"):
        read_metric(cfg, trial)

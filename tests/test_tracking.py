"""Tracking: wandb works offline, a resumed run continues the same wandb run, and no credential from the
environment lands in any file of a run folder (config.yaml, metrics, reports, wandb's own files)."""

import os
import subprocess
import sys

from conftest import REPO, small_pretrain

from gptpipe.files import redact

PRETRAIN = str(REPO / "recipes/tiny/pretrain.yaml")
SECRETS = {"WANDB_API_KEY": "wandb-secret-4f9a2c7e1b", "HF_TOKEN": "hf_secretTOKENvalue123456"}


def train(args, **env):
    run_env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "tests/helpers"),
        "WANDB_MODE": "offline",
        **SECRETS,
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "gptpipe", "train", PRETRAIN, *args],
        capture_output=True,
        text=True,
        env=run_env,
    )


def test_wandb_offline_resume_keeps_the_run_id_and_no_secret_is_written(tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    args = small_pretrain(
        tokenizer_dir,
        out,
        max_steps=20,
        save_steps=10,
        report_to="[wandb]",
        callbacks="[kill_callback:KillAtStep]",
    )
    killed = train(args, GPTPIPE_TEST_KILL_AT_STEP="15")
    assert killed.returncode == -9, killed.stderr[-3000:]
    run_id = (out / "wandb_run_id").read_text().strip()

    resumed = train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert (out / "wandb_run_id").read_text().strip() == run_id
    offline_runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(
        name.endswith(run_id) for name in offline_runs
    )  # one wandb run, resumed

    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10 and (out / "report.md").is_file()
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in data, f"{secret} found in {path}"


def test_redact_hides_credentials_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", "abcdef123456")
    monkeypatch.setenv("SOME_PATH", "abcdefgh")  # not a credential name: left alone
    assert redact("key abcdef123456 path abcdefgh") == "key *** path abcdefgh"


def test_tensorboard_events_go_into_the_run_folder(tokenizer_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gptpipe.cli import run

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # restored after the test
    monkeypatch.chdir(tmp_path)  # TensorBoard's own default would be ./runs here
    out = tmp_path / "run"
    run(["train", PRETRAIN, *small_pretrain(tokenizer_dir, out, max_steps=10, report_to="[tensorboard]")])
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert not (tmp_path / "runs").exists()

"""Resume cost: seconds from launch to the end of the first training step when an SFT run resumes early
(step 10) and late (step 5,060) in a 20,000-step run. It must not grow with the step: the Trainer skips
to the resumed position through the sampler (no replay of the skipped batches).

    python -m bench.resume             # make bench runs this

The late checkpoint is the early one with its step number set to 5,060 in trainer_state.json, so the two
differ only in where the data must be resumed (epoch 40, 60 batches in); training 5,000 steps first would
take a quarter of an hour here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from transformers import TrainerCallback

from bench import common, fixtures

EARLY, LATE, TOTAL = 10, 5060, 20_000
LAUNCH_ENV = "BENCH_LAUNCHED_AT"


class FirstStep(TrainerCallback):
    """Writes the seconds from launch (``BENCH_LAUNCHED_AT``) to the end of the first step, then stops."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            common.write_result(
                {"seconds": time.time() - float(os.environ[LAUNCH_ENV]), "step": state.global_step}
            )
        control.should_training_stop = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=common.ROOT / "runs" / "bench")
    ap.add_argument("--worker", nargs=2, metavar=("PREPARED", "RECIPE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(Path(a.worker[0]), a.worker[1])
    fixtures.require_data()
    work = a.work / "resume"
    work.mkdir(parents=True, exist_ok=True)
    recipe = {
        "stage": "sft",
        "output_dir": str(work / "run"),
        "model": {"name_or_path": str(fixtures.base_model(a.work, 4096))},
        "datasets": [{"path": str(fixtures.ALPACA), "format": "alpaca"}],
        "max_length": 256,
        "max_steps": TOTAL,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-4,
        "seed": 42,
        "bf16": False,
        "gradient_checkpointing": False,
        "logging_steps": 10,
        "save_steps": EARLY,
        "report_to": "none",
        "dataloader_pin_memory": False,
    }
    prepared = prepare(work, recipe)
    contenders = {}
    for step, name in ((EARLY, "early"), (LATE, "late")):
        path = work / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                {**recipe, "output_dir": str(work / name), "callbacks": ["bench.resume:FirstStep"]},
                sort_keys=False,
            )
        )
        contenders[f"resume at step {step}"] = [
            common.python(),
            "-m",
            "bench.resume",
            "--worker",
            str(prepared[step]),
            str(path),
        ]
    print(
        f"resume cost: launch to first step, SFT resumed at step {EARLY} and {LATE} of {TOTAL}, {a.rounds} rounds"
    )
    results = common.interleave(contenders, a.rounds, work, env={"PYTHONPATH": str(common.ROOT)})
    rows, summary = [], {}
    for name, runs in results.items():
        good = [r["seconds"] for r in runs if "error" not in r]
        summary[name] = {"seconds": statistics.median(good)} if good else {"error": runs[-1]["error"]}
        rows.append([name, summary[name].get("seconds", "-"), summary[name].get("error", "")[:60]])
    print(common.table(["run", "launch to first step, s", "error"], rows))
    ratios = {}
    early, late = (summary[f"resume at step {s}"].get("seconds") for s in (EARLY, LATE))
    if early and late:
        ratios["late / early"] = late / early
        print(f"resume late / resume early: {late / early:.3f}")
    common.save(work, a, summary, ratios)


def prepare(work: Path, recipe: dict) -> dict[int, Path]:
    """Run the first EARLY steps once (checkpoint-EARLY), and derive the late checkpoint from it."""
    early, late = work / "prepared-early", work / "prepared-late"
    if not (late / f"checkpoint-{LATE}").is_dir():
        shutil.rmtree(work / "run", ignore_errors=True)
        path = work / "prepare.yaml"
        path.write_text(yaml.safe_dump({**recipe, "max_steps": EARLY}, sort_keys=False))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(common.ROOT)}
        with open(work / "prepare.log", "w") as log:
            subprocess.run(
                [common.python(), "-m", "gptpipe", "train", str(path)],
                env=env,
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        for folder in (early, late):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
        shutil.copytree(work / "run" / f"checkpoint-{EARLY}", early / f"checkpoint-{EARLY}")
        target = late / f"checkpoint-{LATE}"
        shutil.copytree(work / "run" / f"checkpoint-{EARLY}", target)
        state = json.loads((target / "trainer_state.json").read_text())
        state["global_step"] = LATE
        (target / "trainer_state.json").write_text(json.dumps(state))
    return {EARLY: early, LATE: late}


def worker(prepared: Path, recipe: str) -> None:
    """Copy the prepared checkpoint into a fresh run folder, then launch gptpipe (the clock starts here)."""
    out = Path(yaml.safe_load(Path(recipe).read_text())["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(prepared, out)
    os.environ[LAUNCH_ENV] = str(time.time())
    os.execv(common.python(), [common.python(), "-m", "gptpipe", "train", recipe])


if __name__ == "__main__":
    sys.exit(main())

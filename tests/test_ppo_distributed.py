"""PPO's update under DeepSpeed on 2 CPU processes (gloo), without the stage around it."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

HELPER = REPO / "tests/helpers/ppo_deepspeed_accumulation.py"


@pytest.mark.extended  # PPO in a ZeRO engine: the 2-process ZeRO-3 test in tests/test_rl.py
@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_update_is_ddps_and_takes_one_step_per_minibatch(tmp_path):
    """gradient_accumulation_steps 2 under ZeRO-2 gives the parameters of 1, after one optimizer step: outside
    accelerator.accumulate() accelerate marks every micro-batch a DeepSpeed step boundary, so each took a step.
    And ZeRO-2 (one engine) updates exactly as DDP (two models): the same loss, the same joint clipping."""
    pytest.importorskip("deepspeed", reason="make setup installs deepspeed (DS_BUILD_OPS=0)")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(HELPER),
        str(tmp_path / "m"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    one, two = found["zero2 accumulation 1"], found["zero2 accumulation 2"]
    assert one["optimizer_steps"] == two["optimizer_steps"] == 1
    assert two["sums"] == pytest.approx(
        one["sums"], abs=1e-4
    )  # summed in another order; 2 steps differ by ~1
    # Policy and critic clipped together on both paths (max_grad_norm 0.05, SGD): the same update (measured: equal).
    # Clipped each on its own under DDP, with the value loss weighted 1 under DeepSpeed, the sums differed by 0.01.
    assert found["ddp clipped"]["sums"] == pytest.approx(found["zero2 clipped"]["sums"], abs=1e-4)

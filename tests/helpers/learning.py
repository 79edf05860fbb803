"""Learning checks that hold on any machine.

Float trajectories differ between CPUs and thread counts, so a learning test's threshold is set from its
spread: `make test-spread` runs every `learning`-marked test over several training seeds
(``GPTPIPE_TEST_SEED``) and thread counts, each check appending what it measured to
``GPTPIPE_LEARNING_LOG``, and writes the table in docs/testing.md. Each threshold sits below the worst
value seen, with the range in a comment beside it.

    with learning_checks() as check:
        check.at_least("held-out pairwise accuracy", e["pairwise_accuracy_after"], 0.8)

Every check in the block is recorded, then the block fails naming each one that missed.
"""

import contextlib
import json
import os

# The training seed of every run a test starts (recipes default to 42); the spread runs set others.
SEED = int(os.environ.get("GPTPIPE_TEST_SEED", "42"))


# ``seed: N`` for every training run when the spread asks for a seed other than the recipes' own.
SEED_SETTINGS = {"seed": SEED} if "GPTPIPE_TEST_SEED" in os.environ else {}


class Checks:
    def __init__(self):
        self.missed: list[str] = []

    def _check(self, metric: str, value: float, threshold: float, direction: str, context) -> None:
        value = float(value)
        log = os.environ.get("GPTPIPE_LEARNING_LOG")
        if log:
            row = {
                "test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
                "metric": metric,
                "value": value,
                "threshold": threshold,
                "direction": direction,
                "seed": SEED,
                "threads": os.environ.get("OMP_NUM_THREADS", "default"),
            }
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
        if not (value >= threshold if direction == ">=" else value <= threshold):
            detail = f"; {context}" if context is not None else ""
            self.missed.append(f"{metric} = {value:.4f}, expected {direction} {threshold}{detail}")

    def at_least(self, metric: str, value: float, threshold: float, context=None) -> None:
        self._check(metric, value, threshold, ">=", context)

    def at_most(self, metric: str, value: float, threshold: float, context=None) -> None:
        self._check(metric, value, threshold, "<=", context)


@contextlib.contextmanager
def learning_checks():
    checks = Checks()
    yield checks
    assert not checks.missed, f"seed {SEED}: " + "\n".join(checks.missed)

"""A TrainerCallback for tests: SIGKILL its own process after step $GPTPIPE_TEST_KILL_AT_STEP (a hard crash);
a no-op when the variable is unset."""

import os
import signal

from transformers import TrainerCallback


class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("GPTPIPE_TEST_KILL_AT_STEP", -1)):
            os.kill(os.getpid(), signal.SIGKILL)


class CrashAtStep(TrainerCallback):
    """Raise after step $GPTPIPE_TEST_CRASH_AT_STEP: an interrupted run, cheap enough to run in-process."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("GPTPIPE_TEST_CRASH_AT_STEP", -1)):
            raise RuntimeError(f"simulated crash at step {state.global_step}")

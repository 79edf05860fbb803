"""A TrainerCallback for tests: SIGKILL its own process after step $GPTPIPE_TEST_KILL_AT_STEP (a hard crash);
a no-op when the variable is unset."""

import os
import signal

from transformers import TrainerCallback


class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("GPTPIPE_TEST_KILL_AT_STEP", -1)):
            os.kill(os.getpid(), signal.SIGKILL)

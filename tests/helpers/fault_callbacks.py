"""TrainerCallbacks that inject faults for tests (each a no-op unless its environment variable is set).

GPTPIPE_TEST_SIGNAL_AT_STEP=N[:SIGNAL]  send SIGTERM (or SIGUSR1...) to this process during step N
GPTPIPE_TEST_SIGNAL_RANK=R               ...only on process R (default: every process)
GPTPIPE_TEST_KILL_ON_SAVE=N              SIGKILL this process once checkpoint-N is written but not yet marked
                                         complete (these callbacks run before gptpipe's own)
GPTPIPE_TEST_NAN_AT_STEP=N               make step N's forward passes NaN (the input embeddings' output)
GPTPIPE_TEST_OOM_AT_STEP=N               ask the allocator for a petabyte at step N (a real allocation failure)
GPTPIPE_TEST_CRASH_AT_LR=X               raise a RuntimeError (a bug, not a user error) when training starts
                                         with learning_rate X (one trial of a sweep)
"""

import os
import signal

import torch
from transformers import TrainerCallback


def _step(name: str) -> int:
    return int(os.environ.get(name, "-1").split(":")[0])


class SignalAtStep(TrainerCallback):
    """Hugging Face trainers: during step N (from on_step_begin); PPO, which calls only on_step_end: after it."""

    sent = False

    def _send(self):
        rank = os.environ.get("GPTPIPE_TEST_SIGNAL_RANK")
        if rank is not None and rank != os.environ.get("RANK", "0"):
            return
        self.sent = True
        spec = os.environ["GPTPIPE_TEST_SIGNAL_AT_STEP"]
        name = spec.split(":")[1] if ":" in spec else "SIGTERM"
        os.kill(os.getpid(), getattr(signal, name))

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.sent and state.global_step + 1 == _step("GPTPIPE_TEST_SIGNAL_AT_STEP"):
            self._send()

    def on_step_end(self, args, state, control, **kwargs):
        if not self.sent and state.global_step == _step("GPTPIPE_TEST_SIGNAL_AT_STEP"):
            self._send()


class KillOnSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == _step("GPTPIPE_TEST_KILL_ON_SAVE"):
            os.kill(os.getpid(), signal.SIGKILL)


class NaNAtStep(TrainerCallback):
    handle = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == _step("GPTPIPE_TEST_NAN_AT_STEP"):
            embeddings = model.get_input_embeddings()
            self.handle = embeddings.register_forward_hook(
                lambda module, inputs, output: output * float("nan")
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class OOMAtStep(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == _step("GPTPIPE_TEST_OOM_AT_STEP"):
            torch.empty(2**50, dtype=torch.uint8)


class CrashAtLearningRate(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        crash_at = os.environ.get("GPTPIPE_TEST_CRASH_AT_LR")
        if crash_at is not None and args.learning_rate == float(crash_at):
            raise RuntimeError(f"simulated crash inside a library at learning_rate {args.learning_rate}")

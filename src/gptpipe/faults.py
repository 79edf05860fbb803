"""What long jobs on a shared cluster meet, handled the same way in every stage (docs/fault-tolerance.md).

- **Preemption**: SIGTERM or SIGUSR1 (what Slurm sends before preempting a job, or ahead of its time
  limit with ``--signal=USR1@SECONDS``) lets the current optimizer step finish; then every process agrees
  to stop at the same step (one all-reduce of a flag per step), a checkpoint is saved and the run exits
  with code 75 (``errors.Preempted``). Under Slurm, SIGUSR1 also requeues the job (``scontrol requeue``);
  the requeued job runs the same command and resumes from that checkpoint.
- **NaN/inf**: a non-finite gradient (a NaN loss makes every gradient NaN) stops the run before the
  optimizer applies it, naming the step and the last good checkpoint; ``on_nonfinite: skip`` drops that
  update instead, counts it in ``metrics.jsonl`` and ``eval.json``, and still stops after
  ``max_skipped_steps`` of them.
- **Disk space**: before each checkpoint (and before ``final/``), free space is checked against the
  expected size (the previous checkpoint's, or the model's and optimizer's tensors); too little stops the
  run before anything is written.
- **Out of memory**: reported with the stage, the shape of the last batch and what to change
  (``describe_oom``, called by the CLI).

Checkpoints themselves are complete-or-invisible: ``runs.last_checkpoint`` only accepts a folder whose
``trainer_state.json`` (written last) parses, and ``runs.prepare_run_dir`` removes incomplete ones.

Hugging Face trainers get all of this from one callback, ``guard(trainer, cfg)``; gptpipe's PPO loop calls
the same pieces directly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from gptpipe.errors import DiskFullError, NonFiniteError, OutOfMemory, Preempted, UserError
from gptpipe.finite import all_finite, any_process
from gptpipe.runs import last_checkpoint, mark_complete, rotate_checkpoints
from gptpipe.tracking import append_metrics

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DISK_MARGIN = 1.1  # free space wanted: 10% over the expected checkpoint size

# What the out-of-memory message reports: the running stage and the shape of the last forward's input.
_context: dict = {}


class StopSignals:
    """Remembers the first SIGTERM/SIGUSR1 instead of dying on it; the training loop polls ``agreed``."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python only allows it there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            name = signal.Signals(signum).name
            os.write(
                2, f"[gptpipe] {name} received: finishing this step, then saving a checkpoint\n".encode()
            )

    def agreed(self, device) -> bool:
        """True on every process once any process has received a signal (collective: all must call it)."""
        return any_process(self.received is not None, device)


def preempted(
    stage: str, step: int, output_dir, signum: int | None, requeue: bool, is_main: bool
) -> Preempted:
    """The exception that ends a run stopped by a signal (its checkpoint already saved); requeues the Slurm
    job on SIGUSR1 when asked to."""
    name = signal.Signals(signum).name if signum else "a signal on another process"
    job = os.environ.get("SLURM_JOB_ID")
    note = "Run the same command again to continue from it."
    if requeue and job and signum == signal.SIGUSR1:
        note = _requeue(job) if is_main else "The main process requeues the Slurm job."
    checkpoint = last_checkpoint(output_dir)
    return Preempted(f"[{stage}] stopped by {name} after step {step}; checkpoint saved: {checkpoint}. {note}")


def _requeue(job: str) -> str:
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"Could not requeue Slurm job {job} ({e}); resubmit the same command to continue."
    if done.returncode != 0:
        return (
            f"`scontrol requeue {job}` failed ({done.stderr.strip()}); resubmit the same command to continue."
        )
    return f"Slurm job {job} requeued: it resumes from this checkpoint when it starts again."


# ---------------------------------------------------------------------------------------------------
# Numerical faults


def nonfinite_error(stage: str, step: int, what: str, output_dir, skipping: bool = False) -> NonFiniteError:
    checkpoint = last_checkpoint(output_dir)
    last = (
        f"the last good checkpoint is {checkpoint} (a rerun resumes from it)"
        if checkpoint
        else "no checkpoint yet"
    )
    if skipping:
        return NonFiniteError(
            f"[{stage}] step {step}: {what}: NaN or infinite again; max_skipped_steps reached, so the run "
            f"stops; {last}. Lower learning_rate, add warmup_steps, or check the data."
        )
    return NonFiniteError(
        f"[{stage}] step {step}: {what}: NaN or infinite; training stopped before applying it; {last}. "
        "Lower learning_rate, add warmup_steps or max_grad_norm, check the data (empty or all-masked rows), "
        "prefer bf16 over fp16, or set on_nonfinite: skip to drop such steps (counted in eval.json)."
    )


def skipped_steps(output_dir, up_to_step: int) -> int:
    """Updates ``on_nonfinite: skip`` dropped up to a step (read from metrics.jsonl: survives a resume)."""
    import json

    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    records = (json.loads(line) for line in path.read_text().splitlines() if line)
    return sum(1 for r in records if "skipped_nonfinite" in r and r.get("step", 0) <= up_to_step)


# ---------------------------------------------------------------------------------------------------
# Disk space


def free_bytes(path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def tensors_bytes(model=None, optimizer=None, world_size: int = 1) -> int:
    """Bytes of a model's weights plus its optimizer's state (ZeRO shards counted once per process)."""
    total = 0
    if model is not None:
        for p in model.parameters():
            total += getattr(p, "ds_numel", p.numel()) * p.element_size()
    state = getattr(getattr(optimizer, "optimizer", optimizer), "state", None)
    if isinstance(state, dict):
        shard = sum(
            t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t)
        )
        total += shard * (world_size if _sharded(optimizer) else 1)
    return total


def _sharded(optimizer) -> bool:
    return "deepspeed" in type(getattr(optimizer, "optimizer", optimizer)).__module__


def ensure_disk_space(stage: str, folder, needed: int, what: str, output_dir, device) -> None:
    """Stop before writing ``what`` into ``folder`` when its file system lacks ``needed`` bytes (+10%).
    Collective: every process checks its own view and all stop together."""
    free = free_bytes(folder)
    short = free < needed * DISK_MARGIN
    if not any_process(short, device):
        return
    checkpoint = last_checkpoint(output_dir)
    raise DiskFullError(
        f"[{stage}] not enough disk space to save {what} in {folder}: about {needed / 1e9:.2f} GB needed, "
        f"{free / 1e9:.2f} GB free (nothing was written; "
        f"{f'the last complete checkpoint is {checkpoint}' if checkpoint else 'no checkpoint yet'}). "
        "Free space there or point output_dir at a larger disk, then rerun the same command; lower "
        "save_total_limit, or save_only_model: true, to keep checkpoints smaller."
    )


# ---------------------------------------------------------------------------------------------------
# Out of memory


def note_stage(cfg) -> None:
    """Remember the running stage's batch settings for ``describe_oom``."""
    _context.clear()
    _context.update(
        stage=getattr(cfg, "stage", "?"),
        per_device_train_batch_size=getattr(cfg, "per_device_train_batch_size", None),
        gradient_accumulation_steps=getattr(cfg, "gradient_accumulation_steps", None),
        max_length=getattr(cfg, "max_length", None) or getattr(cfg, "block_size", None),
    )


def record_batch_shapes(model) -> None:
    """Keep the shape of each forward's ``input_ids`` (for the out-of-memory message); a pre-hook, no cost."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_tensor(ids):
            _context["batch_shape"] = tuple(ids.shape)

    model.register_forward_pre_hook(hook, with_kwargs=True)


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def describe_oom(error: BaseException) -> OutOfMemory:
    where = "GPU" if isinstance(error, torch.OutOfMemoryError) else "host (CPU)"
    c = _context
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    shape = c.get("batch_shape")
    settings = ", ".join(
        f"{k} {c[k]}"
        for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length")
        if c.get(k)
    )
    return OutOfMemory(
        f"[{c.get('stage', 'gptpipe')}] out of {where} memory"
        + (f" on a batch of shape {list(shape)} (rows x tokens)" if shape else "")
        + (f"; {settings}" if settings else "")
        + f".\n  {first}\nTry, in this order:\n"
        "  - a smaller per_device_train_batch_size with a larger gradient_accumulation_steps (same effective "
        "batch, same results);\n"
        "  - gradient_checkpointing: true (recompute activations in the backward pass);\n"
        "  - a shorter max_length / block_size;\n"
        "  - model.lora (LoRA), or model.quantization {bits: 4} with LoRA (QLoRA);\n"
        "  - more processes with DeepSpeed ZeRO-3 (accelerate_configs/zero3.yaml), or CPU offload "
        "(accelerate_configs/zero3_offload.yaml)."
    )


# ---------------------------------------------------------------------------------------------------
# Hugging Face trainers


def guard(trainer, cfg) -> FaultGuard:
    """Add the fault handling to a ``transformers.Trainer`` (or TRL trainer) before ``train()``."""
    callback = FaultGuard(trainer, cfg)
    trainer.add_callback(callback)
    return callback


class FaultGuard(TrainerCallback):
    """Preemption, NaN/inf and disk-space handling for Hugging Face trainers (see the module docstring)."""

    def __init__(self, trainer, cfg):
        self.trainer, self.cfg = trainer, cfg
        self.stage = cfg.stage
        self.output_dir = Path(cfg.output_dir)
        self.signals = StopSignals()
        self.skip = getattr(cfg, "on_nonfinite", "stop") == "skip"
        self.pending_skip = False
        self.skipped = 0
        self.stopped_at: int | None = None
        if self.skip and self.deepspeed:
            raise UserError(
                "on_nonfinite: skip is not available under DeepSpeed (the engine applies each update inside "
                "backward, before it can be dropped); use on_nonfinite: stop, or fp16, whose loss scaler "
                "skips overflowing steps itself"
            )
        # Rotation moves here (on_save), after the new checkpoint is marked complete: the Trainer's own runs
        # before every process has finished writing.
        self.keep = trainer.args.save_total_limit
        trainer.args.save_total_limit = None
        note_stage(cfg)

    @property
    def device(self):
        return self.trainer.accelerator.device

    @property
    def deepspeed(self) -> bool:
        return bool(getattr(self.trainer, "is_deepspeed_enabled", False))

    def summary(self) -> dict:
        """For eval.json: how many updates ``on_nonfinite: skip`` dropped (only when skipping)."""
        return {"skipped_nonfinite_steps": self.skipped} if self.skip else {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.signals.install()
        self.skipped = skipped_steps(self.output_dir, state.global_step)  # those before the resumed step
        if model is not None:
            record_batch_shapes(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Under DeepSpeed the engine stepped inside backward(): handled in on_step_end.
        if self.deepspeed or model is None:
            return
        params = [p for p in model.parameters() if p.grad is not None]
        if all_finite([p.grad for p in params]):
            return
        self._nonfinite(state.global_step + 1, "the gradient")
        for p in params:  # skip: torch optimizers leave parameters without a gradient untouched
            p.grad = None
        self.pending_skip = True

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if self.deepspeed:
            norm = self.trainer.model_wrapped.get_global_grad_norm()
            if norm is not None and not torch.isfinite(torch.as_tensor(norm)).all():
                self._fail(
                    nonfinite_error(self.stage, state.global_step, "the gradient norm", self.output_dir)
                )
        if self.pending_skip:
            self.pending_skip = False
            self.skipped += 1
            if state.is_world_process_zero:
                append_metrics(self.output_dir, {"step": state.global_step, "skipped_nonfinite": 1})
            print(
                f"[{self.stage}] step {state.global_step}: non-finite gradient, update skipped",
                file=sys.stderr,
            )
        if self.signals.agreed(self.device):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        if control.should_save:
            self._check_disk(state, optimizer)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        if control.should_save:
            self._check_disk(state, optimizer)

    def on_save(self, args, state, control, **kwargs):
        """The Trainer wrote checkpoint-N on every process: mark it complete, then rotate the old ones."""
        self.trainer.accelerator.wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            mark_complete(folder, state.global_step, self.trainer.accelerator.num_processes)
            rotate_checkpoints(folder.parent, self.keep, state.best_model_checkpoint)
        self.trainer.accelerator.wait_for_everyone()  # no process moves on (or exits) before it counts

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.signals.uninstall()
        if self.stopped_at is not None:
            raise preempted(
                self.stage,
                self.stopped_at,
                self.output_dir,
                self.signals.received,
                getattr(self.cfg, "slurm_requeue", True),
                state.is_world_process_zero,
            )
        if model is not None:  # final/ holds the weights only
            needed = tensors_bytes(model)
            ensure_disk_space(self.stage, self.output_dir, needed, "final/", self.output_dir, self.device)

    def _nonfinite(self, step: int, what: str) -> None:
        if not self.skip:
            self._fail(nonfinite_error(self.stage, step, what, self.output_dir))
        if self.skipped >= getattr(self.cfg, "max_skipped_steps", 20):
            self._fail(nonfinite_error(self.stage, step, what, self.output_dir, skipping=True))

    def _fail(self, error: Exception) -> None:
        self.signals.uninstall()  # the default handlers again (the process may go on, e.g. in tests)
        raise error

    def _check_disk(self, state, optimizer) -> None:
        previous = last_checkpoint(self.output_dir)
        needed = (
            folder_bytes(previous)
            if previous
            else tensors_bytes(self.trainer.model, optimizer, self.trainer.accelerator.num_processes)
        )
        what = f"checkpoint-{state.global_step}"
        try:
            ensure_disk_space(self.stage, self.output_dir, needed, what, self.output_dir, self.device)
        except DiskFullError as e:
            self._fail(e)

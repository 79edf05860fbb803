"""The private parts of the wrapped libraries gptpipe still needs: all of them here, each saying why no
public path serves. ``tests/test_internals.py`` checks every one against the installed libraries, so an
upgrade that changes them fails there, by name, not deep inside a training run."""

from __future__ import annotations

import os
from pathlib import Path

from accelerate.state import AcceleratorState
from trl import SFTTrainer

# What SFTTrainer._prepare_dataset reads from its trainer (tests/test_internals.py keeps this list true).
SFT_PREPARE_READS = ("_tokenizer", "chat_template", "completion_only_loss")


def sft_prepare_dataset(trainer_fields, dataset, tokenizer, args, packing: bool, name: str):
    """TRL's own tokenization, loss masks and packing, without a model: ``gptpipe prepare`` and the prepared-
    data cache need exactly the rows ``SFTTrainer`` would make, and TRL offers them only through the private
    ``SFTTrainer._prepare_dataset`` (building a trainer needs the model). ``trainer_fields`` holds the
    attributes it reads (``SFT_PREPARE_READS``), set as ``SFTTrainer.__init__`` sets them."""
    return SFTTrainer._prepare_dataset(trainer_fields, dataset, tokenizer, args, packing, None, name)


def reset_process_state(training_args) -> None:
    """Forget the process state TrainingArguments set up (its cached ``_setup_devices`` and accelerate's
    shared state), so a different one can be made: accelerate has no public way to replace its state, and
    DeepSpeed on CPU needs one accelerate never builds by itself (``gptpipe.distributed``)."""
    vars(training_args).pop("_setup_devices", None)
    AcceleratorState._reset_state(reset_partial_state=True)


def forget_prepared_model(accelerator, model) -> None:
    """Undo accelerate's "already prepared" mark on a model that ``Trainer.evaluate()`` prepared for
    evaluation only, so ``train()`` wraps it for training (DDP); accelerate has no public "unprepare"."""
    model._is_accelerate_prepared = False
    accelerator._models = [m for m in accelerator._models if m is not model]


def parent_command_line() -> list[str]:
    """The launcher's command line (Linux; empty elsewhere): a launcher that quietly starts one of several
    processes (``accelerate launch --cpu --num_processes 2``) leaves no other trace of what was asked."""
    try:
        return Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []

"""Every private part of a wrapped library that gptpipe uses (gptpipe/internals.py), checked against the
installed versions: an upgrade that renames or reshapes one fails here, by name."""

import inspect
import re

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import TrainingArguments
from trl import SFTTrainer

from gptpipe import internals


def test_sft_prepare_dataset_has_the_signature_and_reads_only_the_fields_we_set():
    params = list(inspect.signature(SFTTrainer._prepare_dataset).parameters)
    assert params == [
        "self",
        "dataset",
        "processing_class",
        "args",
        "packing",
        "formatting_func",
        "dataset_name",
    ]
    reads = set(re.findall(r"self\.(\w+)", inspect.getsource(SFTTrainer._prepare_dataset)))
    assert reads == set(internals.SFT_PREPARE_READS), reads


def test_process_state_can_be_reset(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert isinstance(vars(TrainingArguments).get("_setup_devices"), __import__("functools").cached_property)
    assert args.device.type == "cpu" and "_setup_devices" in vars(args)
    assert "reset_partial_state" in inspect.signature(AcceleratorState._reset_state).parameters
    internals.reset_process_state(args)
    assert "_setup_devices" not in vars(args) and not AcceleratorState._shared_state


def test_a_prepared_model_can_be_forgotten():
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    assert model in accelerator._models and getattr(model, "_is_accelerate_prepared", False)
    internals.forget_prepared_model(accelerator, model)
    assert model not in accelerator._models and not model._is_accelerate_prepared


def test_parent_command_line_is_a_list():
    assert isinstance(internals.parent_command_line(), list)

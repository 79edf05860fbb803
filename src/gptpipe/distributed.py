"""Distributed runs: say what is running, and do the set-up the launchers leave out.

Every stage runs unchanged on one process or many: ``accelerate launch`` (DDP, DeepSpeed ZeRO) or
``torchrun``. Before a stage starts, the main process prints the layout (processes, engine, ZeRO stage,
backend) and records it in ``<output_dir>/distributed.json``.

One gap is filled here: DeepSpeed on CPU (gloo, as in CI). accelerate never selects DeepSpeed for a CPU
process (``cpu=True`` makes it plain DDP, silently), and without ``cpu=True`` it finds no backend and runs
one process. So when DeepSpeed is asked for (the recipe key ``deepspeed:`` or an accelerate DeepSpeed
config) on a multi-process launch without CUDA, the process state is made here, before the stage's
config builds its own: DeepSpeed's communication over gloo, the state marked DeepSpeed, and the
config told to use it (``accelerator_config.use_configured_state``). The Trainer then builds a real
DeepSpeed engine, as on GPUs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from accelerate.state import PartialState

from gptpipe.errors import UserError
from gptpipe.internals import forget_prepared_model, parent_command_line, reset_process_state


def start_distributed(cfg) -> dict:
    """Set up and describe the process layout before a stage starts; write ``distributed.json``.

    Trainer-based stages (their config has ``distributed_state``) train on every process. The others
    (tokenizer, rank) run on the main process while the rest wait (``gptpipe.runner``): their layout says
    ``"runs_on": "main process"``.
    """
    if not hasattr(cfg, "distributed_state"):
        return _main_process_layout(cfg)
    if wants_deepspeed(cfg) and _launched_processes() > 1 and not _has_gpu():
        _deepspeed_on_cpu(cfg)
    world = cfg.world_size  # sets up torch.distributed when launched with several processes
    refuse_one_of_many(world)
    state = cfg.distributed_state
    kind = getattr(state.distributed_type, "value", str(state.distributed_type))
    on_cpu = cfg.use_cpu or str(cfg.device).startswith("cpu")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and on_cpu and kind != "FSDP":
        raise UserError(
            f"the accelerate config asks for FSDP, but on CPU it would silently run {kind}. FSDP needs GPUs; "
            "on CPU use DDP (accelerate_configs/cpu_ddp.yaml or torchrun) or DeepSpeed ZeRO-3 "
            "(torchrun ... deepspeed=deepspeed_configs/zero3.json)."
        )
    if wants_deepspeed(cfg) and world > 1 and kind != "DEEPSPEED":
        raise UserError(f"DeepSpeed was asked for, but this run would silently run {kind}")
    layout = {
        "world_size": world,
        "distributed_type": kind,
        "backend": state.backend,
        "device": str(cfg.device),
    }
    stage = zero_stage(cfg) if wants_deepspeed(cfg) else None  # DeepSpeed runs when asked (checked above)
    if stage is not None and kind == "DEEPSPEED":
        layout["zero_stage"] = stage
    refuse_incompatible(cfg, kind, stage)
    if cfg.process_index == 0:
        engine = layout["distributed_type"] + (
            f" (ZeRO-{layout['zero_stage']})" if "zero_stage" in layout else ""
        )
        print(f"[gptpipe] {world} process{'es' if world > 1 else ''}, {engine}, backend {layout['backend']}")
        _write_layout(cfg.output_dir, layout)
    return layout


def refuse_one_of_many(world: int) -> None:
    """A launcher asked for several processes but started one (``accelerate launch --cpu``): say so."""
    requested = requested_processes()
    if requested > 1 and world == 1:
        raise UserError(
            f"the launcher was asked for {requested} processes but this run has world size 1, so every "
            "process would train alone (`accelerate launch --cpu` starts one process whatever --num_processes "
            "says). On CPU: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes "
            f"{requested} -m gptpipe train RECIPE use_cpu=true, or torchrun --nproc_per_node {requested} -m "
            "gptpipe train RECIPE use_cpu=true."
        )


def _main_process_layout(cfg) -> dict:
    """The layout of a stage that runs on the main process only; ``{}`` when not launched on several."""
    if _launched_processes() == 1:
        refuse_one_of_many(1)
        return {}
    state = PartialState()  # the launcher's process group, as a Trainer would set it up
    layout = {
        "world_size": state.num_processes,
        "distributed_type": getattr(state.distributed_type, "value", str(state.distributed_type)),
        "backend": state.backend,
        "device": str(state.device),
        "runs_on": "main process",  # the others wait for it (gptpipe.runner)
    }
    if state.is_main_process:
        print(f"[gptpipe] {state.num_processes} processes; stage {cfg.stage} runs on the main process")
        _write_layout(cfg.output_dir, layout)
    return layout


def _write_layout(output_dir, layout: dict) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(layout, indent=2) + "\n")


def refuse_incompatible(cfg, kind: str, stage: int | None) -> None:
    """Memory switches that cannot work together, stopped before any model is loaded."""
    quantized = [
        key
        for key, value in (
            ("model.quantization", getattr(getattr(cfg, "model", None), "quantization", None)),
            ("reward_quantization", getattr(cfg, "reward_quantization", None)),
        )
        if value is not None
    ]
    if quantized and stage == 3:
        raise UserError(
            f"{quantized[0]}: bitsandbytes-quantized weights cannot be sharded by DeepSpeed ZeRO-3. Drop the "
            "quantization (ZeRO-3 already splits the weights over the GPUs), or keep it and use ZeRO-2 or "
            "DDP; 4-bit QLoRA sharded over GPUs is FSDP (accelerate_configs/fsdp2_qlora.yaml)."
        )
    optional = [
        (getattr(cfg, "use_liger_kernel", False), "liger_kernel", "use_liger_kernel: true", "liger"),
        (
            getattr(getattr(cfg, "model", None), "attn_implementation", None) == "flash_attention_2",
            "flash_attn",
            "model.attn_implementation: flash_attention_2",
            "flash",
        ),
    ]
    for wanted, module, key, extra in optional:
        if wanted and importlib.util.find_spec(module) is None:
            raise UserError(
                f"{key} needs the {module} package: pip install 'gptpipe[{extra}]' (GPU machines), or drop the key"
            )
    quantization = getattr(getattr(cfg, "model", None), "quantization", None)
    fsdp = kind == "FSDP" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if fsdp and quantization is not None:
        if quantization.bits != 4 or not quantization.quant_storage:
            raise UserError(
                "model.quantization with FSDP: FSDP shards only 4-bit weights stored in the model's dtype. "
                "Set model.quantization: {bits: 4, quant_storage: bfloat16} (with model.dtype: bfloat16), as "
                "accelerate_configs/fsdp2_qlora.yaml says."
            )


def wants_deepspeed(cfg) -> bool:
    """The recipe's ``deepspeed:`` key or an accelerate DeepSpeed launch config."""
    return bool(getattr(cfg, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"


def _deepspeed_on_cpu(cfg) -> None:
    """Make the process state a DeepSpeed one over gloo on CPU (see the module docstring)."""
    # TrainingArguments set up a plain CPU state when it was built: start again from there (the gloo
    # process group it opened stays, and DeepSpeed's communication wraps it).
    reset_process_state(cfg)
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # read again when the Trainer makes its Accelerator
    os.environ.pop("ACCELERATE_USE_CPU", None)  # would make that Accelerator a plain CPU one
    cfg.use_cpu = False  # the same, through TrainingArguments
    PartialState(backend="gloo", timeout=timedelta(seconds=cfg.ddp_timeout))
    cfg.accelerator_config.use_configured_state = True


def _launched_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_gpu() -> bool:
    return torch.cuda.is_available()


def zero_stage(cfg) -> int | None:
    """The DeepSpeed ZeRO stage, from the recipe's ``deepspeed:`` or the accelerate launch config."""
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    source = getattr(cfg, "deepspeed", None) or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not source:
        return None
    config = source if isinstance(source, dict) else json.loads(Path(source).read_text())
    return config.get("zero_optimization", {}).get("stage")


def requested_processes() -> int:
    """How many processes the launcher that started us was asked for (1 when unknown).

    Read from the parent's command line (``accelerate launch --num_processes N``, ``torchrun
    --nproc_per_node N``): the only trace of the request when a launcher quietly starts one process.
    """
    args = parent_command_line()
    if not any("accelerate" in a or "torchrun" in a or "torch.distributed.run" in a for a in args[:3]):
        return 1
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes", "--nproc_per_node", "--nproc-per-node"):
            value = (
                arg.split("=", 1)[1]
                if arg.startswith(flag + "=")
                else args[i + 1]
                if arg == flag and i + 1 < len(args)
                else None
            )
            if value is not None and value.isdigit():
                return int(value)
    return 1


def launch_command(config: str, gpus: int, nodes: int, gptpipe_args: list[str]) -> list[str]:
    """``gptpipe train RECIPE --launch zero2 --gpus 8`` -> the ``accelerate launch`` command it stands for.

    ``config`` is a file or a name in ``accelerate_configs/`` (the current directory's, else the one
    beside this package's source). A DeepSpeed config's JSON is passed as an absolute path, so the
    command works from any directory. ``use_cpu=true`` is added to a ``train`` command when the config
    runs on CPU (accelerate does not pass the config's ``use_cpu`` on to the processes).
    """
    path = find_config(config)
    settings = yaml.safe_load(path.read_text()) or {}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    cmd = [accelerate, "launch", "--config_file", str(path), "--num_processes", str(gpus * nodes)]
    if nodes > 1:
        cmd += ["--num_machines", str(nodes)]
    ds_file = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file and not Path(ds_file).is_absolute():
        resolved = (path.parent.parent / ds_file).resolve()
        if not resolved.is_file():
            raise UserError(f"{path}: deepspeed_config_file {ds_file} not found (looked for {resolved})")
        cmd += ["--deepspeed_config_file", str(resolved)]
    args = list(gptpipe_args)
    is_train = args[:1] == ["train"]  # pipelines take STAGE.use_cpu=true per stage
    if is_train and settings.get("use_cpu") and not any(a.startswith("use_cpu=") for a in args):
        args.append("use_cpu=true")
    return [*cmd, "-m", "gptpipe", *args]


def find_config(config: str) -> Path:
    candidates = [Path(config)]
    if not config.endswith((".yaml", ".yml")):
        for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
            candidates.append(root / "accelerate_configs" / f"{config}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    shipped = Path(__file__).resolve().parents[2] / "accelerate_configs"
    names = sorted(p.stem for p in shipped.glob("*.yaml")) if shipped.is_dir() else []
    raise UserError(f"--launch {config}: no such accelerate config; choose one of {names} or give a file")


@contextlib.contextmanager
def evaluation_before_training(trainer):
    """Around the "before" measurements of a Trainer stage, so they work under DeepSpeed.

    transformers evaluates an untrained DeepSpeed model through a ZeRO-3 inference engine, which
    ``train()`` then keeps (it has no optimizer, so the first backward fails), and refuses ZeRO-1/2
    outright ("ZeRO inference only makes sense with ZeRO Stage 3"). ZeRO-1/2 hold whole weights on every
    process, so they evaluate the plain model; ZeRO-3's inference engine is taken apart afterwards (its
    hooks removed), so ``train()`` builds the training engine.

    Without DeepSpeed, under several processes: ``evaluate()`` prepares the model with accelerate in
    evaluation mode, which marks it as prepared, and ``train()`` then skips preparing it again, so it never
    gets wrapped in DistributedDataParallel: every process would train alone (different gradients on each,
    found by tests/test_invariants.py). The mark is taken off again here.
    """
    if not getattr(trainer, "is_deepspeed_enabled", False):
        yield
        accelerator, model = trainer.accelerator, trainer.model
        if accelerator.num_processes > 1 and getattr(model, "_is_accelerate_prepared", False):
            forget_prepared_model(accelerator, model)
        return
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    trainer.is_deepspeed_enabled = zero3
    try:
        yield
    finally:
        trainer.is_deepspeed_enabled = True
        if trainer.model_wrapped is not trainer.model:
            trainer.accelerator.free_memory()  # destroys the inference engine
            trainer.model_wrapped = trainer.model
            trainer.deepspeed = None

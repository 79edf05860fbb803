"""Distributed runs: say what is running, and do the set-up the launchers leave out.

Every stage runs unchanged on one process or many: ``accelerate launch`` (DDP, DeepSpeed ZeRO) or
``torchrun``. Before a stage starts, the main process prints the layout (processes, engine, ZeRO stage,
backend) and records it in ``<output_dir>/distributed.json``. One gap is filled here: DeepSpeed on CPU
(gloo, as in CI) given as the recipe key ``deepspeed:``, where neither transformers nor accelerate
initializes DeepSpeed's communication layer (it would count one process and reject the batch size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def start_distributed(cfg) -> dict | None:
    """Set up and describe the process layout of a Trainer-based stage (None for other stages)."""
    if not hasattr(cfg, "distributed_state"):
        return None
    world = cfg.world_size  # sets up torch.distributed when launched with several processes
    requested = requested_processes()
    if requested > 1 and world == 1:
        from gptpipe.errors import UserError

        raise UserError(
            f"the launcher was asked for {requested} processes but this run has world size 1, so every "
            "process would train alone (`accelerate launch --cpu` starts one process whatever --num_processes "
            "says). On CPU: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes "
            f"{requested} -m gptpipe train RECIPE use_cpu=true, or torchrun --nproc_per_node {requested} -m "
            "gptpipe train RECIPE use_cpu=true."
        )
    state = cfg.distributed_state
    kind = getattr(state.distributed_type, "value", str(state.distributed_type))
    on_cpu = cfg.use_cpu or str(cfg.device).startswith("cpu")
    for engine in ("DEEPSPEED", "FSDP"):
        if os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true" and on_cpu and kind != engine:
            from gptpipe.errors import UserError

            hint = (
                "On CPU, launch with torchrun and the recipe key deepspeed=deepspeed_configs/zero2.json instead."
                if engine == "DEEPSPEED"
                else "FSDP needs GPUs; on CPU use DDP (accelerate_configs/cpu_ddp.yaml or torchrun)."
            )
            raise UserError(
                f"the accelerate config asks for {engine}, but on CPU it would silently run {kind}. {hint}"
            )
    if getattr(cfg, "deepspeed", None):
        kind = "DEEPSPEED"  # the Trainer builds the DeepSpeed engine from the recipe's deepspeed: config
        if on_cpu and world > 1:
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")  # wraps the gloo group the Trainer made
    layout = {
        "world_size": world,
        "distributed_type": kind,
        "backend": state.backend,
        "device": str(cfg.device),
    }
    stage = zero_stage(cfg) if kind == "DEEPSPEED" else None
    if stage is not None:
        layout["zero_stage"] = stage
    if cfg.process_index == 0:
        engine = layout["distributed_type"] + (f" (ZeRO-{stage})" if stage is not None else "")
        print(f"[gptpipe] {world} process{'es' if world > 1 else ''}, {engine}, backend {layout['backend']}")
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "distributed.json").write_text(json.dumps(layout, indent=2) + "\n")
    return layout


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
    try:
        args = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return 1
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
    import sys

    import yaml

    from gptpipe.errors import UserError

    path = _find_config(config)
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


def _find_config(config: str) -> Path:
    from gptpipe.errors import UserError

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

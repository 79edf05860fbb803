"""PPO's engine set-up on accelerate: the Accelerator (DDP or DeepSpeed), the optimizers the recipe names,
DeepSpeed's batch keys as PPO counts them, and the state dicts to save. TRL's trainers get this from the
HF Trainer; PPO's loop is our own (TRL removed its PPOTrainer), so its set-up is too."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin

from gptpipe.errors import UserError


def build_accelerator(cfg) -> Accelerator:
    """DDP, or DeepSpeed from the recipe's ``deepspeed:`` or an accelerate DeepSpeed config; FSDP is refused."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise UserError(
            "PPO runs under DDP or DeepSpeed ZeRO-2/3 (it trains a policy and a critic as one engine), not "
            "FSDP: launch with accelerate_configs/zero3.yaml instead; GRPO/RLOO recipes (algorithm: grpo | "
            "rloo) run under FSDP."
        )
    if not cfg.deepspeed:
        return Accelerator(cpu=cfg.use_cpu)
    return Accelerator(
        cpu=cfg.use_cpu, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg.hf_deepspeed_config)
    )


def adamw_class(cfg):
    """The recipe's ``optim``: torch's AdamW, or bitsandbytes' 8-bit AdamW (2 bytes/parameter of optimizer
    state instead of 8) for ``adamw_bnb_8bit`` / ``adamw_8bit`` / ``paged_adamw_8bit``."""
    name = str(getattr(cfg.optim, "value", cfg.optim))
    if name.startswith("adamw_torch"):
        return torch.optim.AdamW
    if name in ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb  # optional ([quant] extra): imported only when asked for

        return bnb.optim.PagedAdamW8bit if name.startswith("paged") else bnb.optim.AdamW8bit
    raise UserError(f"optim: {name} is not available for PPO; use adamw_torch or adamw_bnb_8bit")


def adam_settings(cfg) -> dict:
    return {
        "weight_decay": cfg.weight_decay,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "eps": cfg.adam_epsilon,
    }


def fill_deepspeed_config(accelerator: Accelerator, cfg) -> None:
    """DeepSpeed's batch keys as PPO counts them: a micro-batch is one slice of a minibatch."""
    rows, parts = cfg.per_device_train_batch_size, cfg.num_minibatches * cfg.gradient_accumulation_steps
    if rows % parts:
        raise UserError(
            f"per_device_train_batch_size ({rows}) must split evenly into num_minibatches x "
            f"gradient_accumulation_steps ({parts}) micro-batches under DeepSpeed"
        )
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = rows // parts
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["train_batch_size"] = rows // cfg.num_minibatches * accelerator.num_processes
    ds["gradient_clipping"] = cfg.max_grad_norm
    for key, on in (("bf16", cfg.bf16), ("fp16", cfg.fp16)):
        if ds.get(key, {}).get("enabled") == "auto":
            ds[key]["enabled"] = bool(on)
    ds.get("zero_optimization", {}).setdefault("stage", 2)
    ds.pop("optimizer", None)  # PPO brings its own (one AdamW, a parameter group per model)
    ds["zero_force_ds_cpu_optimizer"] = False  # ...also when the config offloads it


def state_dicts(accelerator: Accelerator, engine) -> tuple[dict | None, dict | None]:
    """(policy, critic) state dicts to save: None (each model's own) without DeepSpeed; gathered from the
    engine under DeepSpeed (collective: every process calls it)."""
    if engine is None:
        return None, None
    state = accelerator.get_state_dict(engine)  # ZeRO-3: the main process's copy only
    return engine.module.split_state_dict(state) if state is not None else (None, None)

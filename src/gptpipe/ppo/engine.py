"""PPO's engine set-up on accelerate: the Accelerator (DDP or DeepSpeed), the optimizers the recipe names,
DeepSpeed's batch keys as PPO counts them, and the state dicts to save. TRL's trainers get this from the
HF Trainer; PPO's loop is our own (TRL removed its PPOTrainer), so its set-up is too."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from transformers import get_scheduler

from gptpipe.errors import UserError


def build_accelerator(cfg) -> Accelerator:
    """DDP, or DeepSpeed from the recipe's ``deepspeed:`` or an accelerate DeepSpeed config; FSDP is refused."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise UserError(
            "PPO runs under DDP or DeepSpeed ZeRO-2/3 (it trains a policy and a critic as one engine), not "
            "FSDP: launch with accelerate_configs/zero3.yaml instead; GRPO/RLOO recipes (algorithm: grpo | "
            "rloo) run under FSDP."
        )
    if not cfg.deepspeed:  # bf16/fp16: autocast around the forward passes of the models it prepares
        return Accelerator(
            cpu=cfg.use_cpu, mixed_precision="bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
        )
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


def build_schedulers(cfg, optimizers) -> list:
    """The recipe's learning-rate schedule (``lr_scheduler_type``, ``warmup_steps``, ``lr_scheduler_kwargs``,
    as the HF Trainer reads them), one per optimizer, stepped once per PPO iteration as TRL's PPOTrainer did
    (``max_steps`` iterations; warmup counted in iterations)."""
    name = str(getattr(cfg.lr_scheduler_type, "value", cfg.lr_scheduler_type))
    if name in ("reduce_lr_on_plateau", "greedy"):
        raise UserError(
            f"lr_scheduler_type: {name} follows an evaluation metric, which PPO does not compute during training; "
            "choose a schedule of the step (constant, linear, cosine, constant_with_warmup...)"
        )
    return [
        get_scheduler(
            cfg.lr_scheduler_type,
            optimizer,
            num_warmup_steps=cfg.get_warmup_steps(cfg.max_steps),
            num_training_steps=cfg.max_steps,
            scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or {},
        )
        for optimizer in optimizers
    ]


def fp32_masters(model: torch.nn.Module) -> torch.dtype:
    """Make the trainable weights float32 (returns the dtype they were loaded in). Updated in bf16, Adam's
    small steps round to nothing (at lr 5e-6 on a bf16 1.7B critic, 7.5% of the weights changed in 10 steps);
    DeepSpeed and mixed-precision training keep fp32 masters and compute in bf16 (``bf16: true``).

    On a CPU they also get memory of their own: safetensors loads weights as views into the file, at offsets
    that are not 64-byte aligned and differ from file to file, and CPU kernels sum in another order at another
    alignment, so a run resumed from its checkpoint drifted from the uninterrupted run in the 9th digit
    (measured: a critic's values, 1.9e-9, same weights, same inputs)."""
    loaded = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
        elif p.requires_grad and p.device.type == "cpu":
            p.data = p.data.clone()  # aligned, as the allocator aligns every tensor
    return loaded


def in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> dict | None:
    """The model's state dict with floating weights in ``dtype`` (None: as they are, when already so)."""
    if dtype == torch.float32:
        return None
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}

"""Tensor checks shared by the trainers' fault handling (``gptpipe.faults``) and PPO's math (``gptpipe.ppo``);
imports nothing of gptpipe."""

from __future__ import annotations

import torch


def all_finite(tensors) -> bool:
    """Whether every element of every tensor is finite (one device sync)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def any_process(flag: bool, device) -> bool:
    """``flag`` OR-ed over all processes (itself when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())

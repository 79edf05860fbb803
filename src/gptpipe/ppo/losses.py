"""PPO's clipped policy and value losses and the statistics worth logging with them."""

from __future__ import annotations

import torch

from gptpipe.ppo.advantages import masked_mean


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict]:
    """mean over valid tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(log π_θ − log π_old)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),  # between old and new policy
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict]:
    """½ · mean over valid tokens of max((V − R)², (clip(V, V_old ± ε_v) − R)²)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        residual_var = masked_mean((returns - values) ** 2, mask) - masked_mean(returns - values, mask) ** 2
        returns_var = masked_mean(returns**2, mask) - masked_mean(returns, mask) ** 2
        stats = {
            "value_clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask).item(),
            "value_error": masked_mean(unclipped_error, mask).item(),
            "explained_variance": (1.0 - residual_var / returns_var.clamp(min=1e-8)).item(),
        }
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax over the vocabulary."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)

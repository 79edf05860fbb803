"""From a sequence score to per-token rewards, GAE advantages and returns, and masked whitening."""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (n − 1) variance over the valid entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over valid entries; with ``shift_mean=False`` the mean is kept (used for rewards)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = −β·kl_t on every valid response token, plus the sequence score on the last valid token.

    ``score``: (batch,), ``kl`` and ``mask``: (batch, T); a row's valid tokens need not be contiguous (with
    tools, a tool result's tokens sit between the model's turns, masked out).
    """
    rewards = -beta * kl * mask
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = ((mask > 0) * positions).argmax(dim=1)  # the last valid position (0 in a row with none)
    rows = torch.arange(score.shape[0], device=score.device)
    rewards[rows, last] += score * (mask.sum(dim=1) > 0)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, backwards over each row's valid tokens (V after the last is 0).

    δ_t = r_t + γ·V_{t+1} − V_t;  A_t = δ_t + γλ·A_{t+1};  returns R_t = A_t + V_t, with t+1 the next *valid*
    token: a masked position (padding, or a tool result between two turns: not the policy's action) is
    skipped, as if the row held only its valid tokens. Masked positions stay 0.
    """
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        current = delta + gamma * lam * next_advantage
        # A masked position passes on what follows it unchanged: after the last valid token that is V = 0, A = 0.
        advantages[:, t] = current * valid
        next_value = torch.where(valid > 0, values[:, t], next_value)
        next_advantage = torch.where(valid > 0, current, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns

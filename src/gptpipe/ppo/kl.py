"""KL to the reference policy: per-token estimators and the coefficient β (fixed or adaptive)."""

from __future__ import annotations

import torch

ESTIMATORS = ("k1", "k3")


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π_θ || π_ref) from the sampled tokens' log-probs.

    k1 = log π_θ − log π_ref: unbiased, can be negative. k3 = exp(δ) − 1 − δ with δ = log π_ref − log π_θ:
    unbiased too, never negative, lower variance (Schulman's "Approximating KL divergence").
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        delta = ref_logprobs - logprobs
        return torch.expm1(delta) - delta  # expm1: exact near δ = 0, where exp(δ) − 1 loses digits
    raise ValueError(f"kl_estimator: expected one of {ESTIMATORS}, got {estimator!r}")


class FixedKLController:
    """β stays where the recipe put it."""

    def __init__(self, beta: float):
        self.beta = beta

    def update(self, observed_kl: float, num_samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019: steer β so the per-sample KL tracks ``target``.

    e = clip(KL_obs / target − 1, −0.2, 0.2);  β ← β · (1 + e · n / horizon), n = samples this iteration.
    """

    def __init__(self, beta: float, target: float, horizon: int):
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, observed_kl: float, num_samples: int) -> None:
        error = min(max(observed_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * num_samples / self.horizon

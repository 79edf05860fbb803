"""The reward-hacking alarm: during RL, the reward the policy is trained on rising while a check it is not
trained on (answer accuracy on fixed held-out prompts) falls.

A learned reward model is a proxy: pushed far enough, a policy finds what the proxy scores highly that is not
what it stands for (Gao et al. 2022, "Scaling laws for reward model overoptimization"). Where the prompts carry
a known answer, the stage measures both every ``eval_steps`` iterations; ``RewardHackingWatch`` compares each
measurement with the one ``window`` evaluations before and raises the alarm when the reward rose while accuracy
fell by more than ``tolerance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RewardHackingWatch:
    window: int = 3  # evaluations back to compare with
    tolerance: float = 0.0  # accuracy must fall by more than this (noise: a couple of prompts)
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, reward, accuracy)
    best: tuple[int, float] | None = None  # (step, accuracy) of the most accurate evaluation so far
    rang_at: int | None = None  # the step of the first alarm

    def add(self, step: int, reward: float, accuracy: float) -> str | None:
        """Record one evaluation; the alarm's message when the reward rose while accuracy fell, else None."""
        self.history.append((step, reward, accuracy))
        if self.best is None or accuracy > self.best[1]:
            self.best = (step, accuracy)
        if len(self.history) <= self.window:
            return None
        (s0, r0, a0), (s1, r1, a1) = self.history[-1 - self.window], self.history[-1]
        if r1 > r0 and a1 < a0 - self.tolerance:
            self.rang_at = s1 if self.rang_at is None else self.rang_at
            return (
                f"reward hacking: from step {s0} to {s1} the reward rose {r0:.3f} -> {r1:.3f} while held-out answer "
                f"accuracy fell {a0:.2f} -> {a1:.2f} (most accurate: {self.best[1]:.2f} at step {self.best[0]})"
            )
        return None

    def evidence(self) -> dict:
        """For eval.json: the most accurate evaluation (step, accuracy) and the step of the first alarm."""
        if self.best is None:
            return {}
        found = {"best_accuracy_step": self.best[0], "best_watched_accuracy": self.best[1]}
        return found | ({"reward_hacking_step": self.rang_at} if self.rang_at is not None else {})

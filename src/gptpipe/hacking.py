"""The reward-hacking alarm: during RL, the reward the policy is trained on rising while a check it is not
trained on falls: answer accuracy on fixed held-out prompts, or the reward model's agreement with the answer
check on the policy's current replies.

A learned reward model is a proxy: pushed far enough, a policy finds what the proxy scores highly that is not
what it stands for (Gao et al. 2022, "Scaling laws for reward model overoptimization"). Where the prompts carry
a known answer, the stage measures both every ``eval_steps`` iterations; ``RewardHackingWatch`` compares each
measurement with the one ``window`` evaluations before and raises the alarm when the reward rose while accuracy
fell by more than ``tolerance`` (or the agreement by more than ``agreement_tolerance``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RewardHackingWatch:
    window: int = 3  # evaluations back to compare with
    tolerance: float = 0.0  # accuracy must fall by more than this (noise: a couple of prompts)
    agreement_tolerance: float = 0.1  # the agreement (an AUC over a few dozen replies) must fall by more
    # (step, reward, accuracy, agreement or None) per evaluation
    history: list[tuple[int, float, float, float | None]] = field(default_factory=list)
    best: tuple[int, float] | None = None  # (step, accuracy) of the most accurate evaluation so far
    rang_at: int | None = None  # the step of the first alarm

    def add(self, step: int, reward: float, accuracy: float, agreement: float | None = None) -> str | None:
        """Record one evaluation; the alarm's message when the reward rose while accuracy (or the reward model's
        agreement with the answer check) fell, else None."""
        self.history.append((step, reward, accuracy, agreement))
        if self.best is None or accuracy > self.best[1]:
            self.best = (step, accuracy)
        if len(self.history) <= self.window:
            return None
        (s0, r0, a0, g0), (s1, r1, a1, g1) = self.history[-1 - self.window], self.history[-1]
        if r1 <= r0:
            return None
        fell = []
        if a1 < a0 - self.tolerance:
            fell.append(f"held-out answer accuracy fell {a0:.2f} -> {a1:.2f}")
        if g0 is not None and g1 is not None and g1 < g0 - self.agreement_tolerance:
            fell.append(f"the reward model's agreement with the answer check fell {g0:.2f} -> {g1:.2f}")
        if not fell:
            return None
        self.rang_at = s1 if self.rang_at is None else self.rang_at
        return (
            f"reward hacking: from step {s0} to {s1} the reward rose {r0:.3f} -> {r1:.3f} while "
            f"{' and '.join(fell)} (most accurate: {self.best[1]:.2f} at step {self.best[0]})"
        )

    def observe(self, step: int, found: dict) -> tuple[dict, str | None, bool]:
        """One evaluation of the watched prompts (``gptpipe.rlhf.evaluate``'s dict): its ``metrics.jsonl`` record
        (``eval/*``, ``reward_hacking`` when the alarm rang), the alarm's message or None, and whether it is the
        most accurate evaluation so far."""
        record = {"step": step, **{f"eval/{k}": v for k, v in found.items()}}
        if "answer_accuracy" not in found:
            return record, None, False
        alarm = self.add(step, found["reward"], found["answer_accuracy"], found.get("rm_agreement"))
        if alarm:
            record["reward_hacking"] = 1.0
        return record, alarm, self.best[0] == step

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run's alarm compares with the evaluations before it."""
        return {"history": [list(h) for h in self.history], "best": self.best, "rang_at": self.rang_at}

    def load_state(self, state: dict) -> None:
        self.history = [tuple(h) for h in state["history"]]
        self.best = tuple(state["best"]) if state["best"] else None
        self.rang_at = state["rang_at"]

    def evidence(self) -> dict:
        """For eval.json: the most accurate evaluation (step, accuracy) and the step of the first alarm."""
        if self.best is None:
            return {}
        found = {"best_accuracy_step": self.best[0], "best_watched_accuracy": self.best[1]}
        return found | ({"reward_hacking_step": self.rang_at} if self.rang_at is not None else {})

"""Reward functions: Python code that scores completions, with TRL's signature, so users bring theirs unchanged.

    def reward(prompts, completions, completion_ids=None, **columns) -> list[float | None]

``prompts`` and ``completions`` are message lists for conversational data (a completion is
``[{"role": "assistant", "content": ...}]``), strings otherwise; every other dataset column (``answer``...)
arrives as a keyword list; ``None`` means "no opinion" on that sample (it adds nothing). A recipe names them
in ``reward_funcs:`` as ``module:function`` or ``path/to/file.py:function``, weighted by ``reward_weights``.
GRPO and RLOO hand them to TRL as they are (each wrapped in the check below); PPO adds them to (or uses them
instead of) the reward model's score.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from gptpipe.errors import UserError
from gptpipe.plugins import import_callable

RewardFn = Callable[..., list]


def load_reward_functions(specs: list[str]) -> list[RewardFn]:
    """Each ``module:function`` or ``file.py:function`` imported and wrapped in ``checked``."""
    return [checked(import_callable(spec, f"reward_funcs.{i}"), spec) for i, spec in enumerate(specs)]


def checked(fn: RewardFn, spec: str) -> RewardFn:
    """``fn`` that fails with a message naming it and the row when it raises or returns the wrong thing (a list
    of numbers or None, one per completion); TRL logs it under its own name (``rewards/<name>``)."""

    @functools.wraps(fn)
    def call(prompts, completions, **kwargs):
        try:
            values = fn(prompts=prompts, completions=completions, **kwargs)
        except Exception as e:  # the user's code: say whose it is, not a trace through the trainer
            raise UserError(f"reward function {spec} raised {type(e).__name__}: {e}") from None
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise UserError(
                f"reward function {spec} returned {got} for {len(completions)} completions; expected a list "
                "with one float (or None) per completion"
            )
        for row, value in enumerate(values):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(
                    f"reward function {spec}: row {row}: expected a float or None, got {type(value).__name__} "
                    f"{value!r}"
                )
            if value is not None and not math.isfinite(value):
                raise UserError(f"reward function {spec}: row {row}: {value} is not a finite number")
        return [None if v is None else float(v) for v in values]

    return call


def weighted_sum(per_function: list[list[float | None]], weights: list[float] | None) -> list[float]:
    """One reward per completion: the weighted sum over functions of the values that are not None (as TRL)."""
    weights = weights or [1.0] * len(per_function)
    if len(weights) != len(per_function):
        raise UserError(
            f"reward_weights: {len(weights)} weights for {len(per_function)} rewards (the reward model counts "
            "first when there is one); give one weight per reward"
        )
    rows = len(per_function[0]) if per_function else 0
    return [
        sum(
            w * values[row]
            for w, values in zip(weights, per_function, strict=True)
            if values[row] is not None
        )
        for row in range(rows)
    ]

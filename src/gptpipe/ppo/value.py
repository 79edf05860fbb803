"""The critic: a transformer with one scalar per token, i.e. ``AutoModelForTokenClassification(num_labels=1)``.

Loaded from a reward-model folder (the InstructGPT choice), it starts with the reward model's weights
*and* score head: the value at a response's last token is then exactly the reward model's score.
Loaded from the policy, its head starts at zero (the 2019 code's choice), so every value starts at 0.
Either way it saves and loads as a plain Hugging Face model.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForTokenClassification

from gptpipe.ppo.rollout import Rollout, position_ids

INITS = ("reward", "policy", "checkpoint")


def value_head(model) -> torch.nn.Module:
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has neither a `score` nor a `classifier` head")
    return head


def build_value_model(name_or_path: str, init: str = "reward", **load_kwargs) -> torch.nn.Module:
    """A per-token value model initialized from a reward model or from the policy (see module doc);
    ``checkpoint`` loads a saved critic unchanged."""
    if init not in INITS:
        raise ValueError(f"value_init: expected one of {INITS}, got {init!r}")
    model = AutoModelForTokenClassification.from_pretrained(name_or_path, num_labels=1, **load_kwargs)
    if init == "checkpoint":
        return model
    head = value_head(model)
    with torch.no_grad():
        if init == "policy":
            head.weight.zero_()
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()  # reward models have no bias: keep V(last token) equal to the reward score
    return model


def response_values(model, rollout: Rollout) -> torch.Tensor:
    """V_t for each response token t: the value of the state it was sampled from (position P - 1 + t)."""
    values = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask),
    ).logits[..., 0]
    return values[:, rollout.prompt_length - 1 : -1].float() * rollout.response_mask

"""Rollouts: sample responses for a batch of prompts and recompute their per-token log-probs.

The training forward pass must see exactly what generation saw: the same left padding, the same
position ids (counted from each row's first real token) and logits divided by the same temperature.
Otherwise the PPO ratio starts away from 1 (PPO-NOTES.md, "Known traps").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig


@dataclass
class Rollout:
    """A batch of prompts (left-padded) followed by their responses (right-padded, cut after the first EOS)."""

    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor  # (B, P + R): 1 on real prompt and response tokens
    response_mask: torch.Tensor  # (B, R): 1 on response tokens up to and including the first EOS
    ended: torch.Tensor  # (B,): the response stopped on its own (an EOS within the length limit)
    prompt_length: int  # P: responses start here
    # With tools (``sample_with_tools``): each row's last turn (the answer's tokens) and what came between the
    # prompt and it (the turns with calls and the tool results, as messages); None: one turn, the response.
    final_turns: list[list[int]] | None = None
    turns: list[list[dict]] | None = None

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_length :]


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def response_mask_until_eos(
    responses: torch.Tensor, eos_token_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended): 1 up to and including each row's first stop token; ``ended`` says whether it had one."""
    is_stop = torch.isin(responses, torch.tensor(eos_token_ids, device=responses.device))
    # Positions after the first stop token have a stop earlier in the row: cumulative count > 0 before them.
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    mask = (stops_before == 0).long()
    return mask, is_stop.any(dim=1)


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    pad_token_id: int,
    eos_token_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> Rollout:
    """Sample one response per prompt from the model's own distribution (temperature and top-p only);
    ``greedy`` decodes the most likely response instead (evaluation)."""
    ids, mask = left_pad(prompts, pad_token_id)
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    with _own_settings_only(model):
        # top_k=0: transformers' default top_k=50 would change the sampling distribution silently
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **({"do_sample": False} if greedy else sampling),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_ids,
            pad_token_id=pad_token_id,
        )
    responses = out[:, ids.shape[1] :]
    response_mask, ended = response_mask_until_eos(responses, eos_token_ids)
    return Rollout(
        input_ids=out,
        attention_mask=torch.cat([mask, response_mask], dim=1),
        response_mask=response_mask,
        ended=ended,
        prompt_length=ids.shape[1],
    )


class ToolStep(Protocol):
    """What runs a turn's calls (``gptpipe.tool_use.ToolTurns`` is one: it runs them with a tool box).

    ``step(row, context, turn)``: the tokens that follow a generated turn (its calls' results and the next turn's
    opening) when the turn called tools, else None (the turn is the answer); ``context`` is the row's tokens
    before the turn. ``reset(rows)`` starts a batch; ``turns[row]``: the messages the row's calls added."""

    turns: list[list[dict]]

    def reset(self, rows: int) -> None: ...

    def __call__(self, row: int, context: list[int], turn: list[int]) -> list[int] | None: ...


@torch.no_grad()
def sample_with_tools(
    model,
    prompts: list[list[int]],
    tool_step: ToolStep,
    max_tool_calls: int,
    pad_token_id: int,
    eos_token_ids: list[int],
    max_new_tokens: int,
    **sampling,
) -> Rollout:
    """Multi-turn rollouts: every open row generates a turn (one batch; ``sampling``: ``sample``'s temperature,
    top_p, greedy); a turn that ends and calls tools gets its results appended (``tool_step``) and the row goes
    on, at most ``max_tool_calls`` rounds of calls.

    The response is every turn and every tool result, in order, with no gap (positions stay those of one
    sequence); ``attention_mask`` covers all of it, ``response_mask`` only the model's own tokens: log-probs,
    KL, values, advantages and the losses never count a tool result's tokens (``advantages.gae`` passes
    over them). A row is ``ended`` when its last turn stopped on its own (not cut off at ``max_new_tokens``).
    """
    tool_step.reset(len(prompts))
    pieces: list[list[tuple[list[int], int]]] = [[] for _ in prompts]  # (tokens, 1 own / 0 tool's) per row
    contexts = [list(p) for p in prompts]
    finals: list[list[int]] = [[] for _ in prompts]
    ended = [False] * len(prompts)
    open_rows = list(range(len(prompts)))
    for round_ in range(max_tool_calls + 1):
        if not open_rows:
            break
        batch = [contexts[r] for r in open_rows]
        turn = sample(model, batch, pad_token_id, eos_token_ids, max_new_tokens, **sampling)
        still_open = []
        for i, row in enumerate(open_rows):
            own = turn.responses[i, : int(turn.response_mask[i].sum())].tolist()
            before = contexts[row]
            pieces[row].append((own, 1))
            contexts[row] = before + own
            finals[row], ended[row] = own, bool(turn.ended[i])
            results = tool_step(row, before, own) if ended[row] and round_ < max_tool_calls else None
            if results:
                pieces[row].append((results, 0))
                contexts[row] = contexts[row] + results
                still_open.append(row)
        open_rows = still_open
    rollout = _joined(prompts, pieces, pad_token_id, turn.input_ids.device)
    rollout.ended, rollout.final_turns = torch.tensor(ended, device=rollout.input_ids.device), finals
    rollout.turns = tool_step.turns
    return rollout


def _joined(prompts, pieces, pad_token_id: int, device) -> Rollout:
    """The prompts left-padded, each row's pieces one after the other, right-padded; own tokens masked 1."""
    width = max(sum(len(t) for t, _ in row) for row in pieces)
    responses = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    own_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    real = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, row in enumerate(pieces):
        tokens = [t for piece, _ in row for t in piece]
        responses[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        own_mask[r, : len(tokens)] = torch.tensor([o for piece, o in row for _ in piece], dtype=torch.long)
        real[r, : len(tokens)] = 1
    ids, mask = left_pad(prompts, pad_token_id)
    return Rollout(
        input_ids=torch.cat([ids, responses], dim=1).to(device),
        attention_mask=torch.cat([mask, real], dim=1).to(device),
        response_mask=own_mask.to(device),
        ended=torch.zeros(len(prompts), dtype=torch.bool, device=device),
        prompt_length=ids.shape[1],
    )


@contextlib.contextmanager
def _own_settings_only(model):
    """While sampling: a generation config that holds nothing but the special tokens. ``generate`` fills every
    setting it is not given from the model's ``generation_config``, so a checkpoint that ships
    ``repetition_penalty`` or ``min_p`` (Qwen2.5-Instruct: 1.05) would sample from a distribution other than
    the policy's, and PPO's ratio would not start at 1."""
    # A peft model generates with its base model's config (and copies its own onto it first, if it has one).
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    holders = [m for m in {id(model): model, id(inner): inner}.values() if "generation_config" in vars(m)]
    saved = [m.generation_config for m in holders]
    tokens = inner.generation_config
    for m in holders:
        m.generation_config = GenerationConfig(
            bos_token_id=tokens.bos_token_id,
            eos_token_id=tokens.eos_token_id,
            pad_token_id=tokens.pad_token_id,
        )
    try:
        yield
    finally:
        for m, config in zip(holders, saved, strict=True):
            m.generation_config = config


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (as generation counts them under left padding)."""
    return (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)


def response_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the sampled response tokens, the logits they came from), temperature applied."""
    logits = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask),
    ).logits
    # The token at position i is predicted by the logits at i - 1.
    logits = logits[:, rollout.prompt_length - 1 : -1].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, rollout.responses.unsqueeze(-1)).squeeze(-1)
    return logprobs * rollout.response_mask, logits


@contextlib.contextmanager
def reference_context(policy, reference):
    """The model whose log-probs are the reference's: a frozen copy, or (``reference=None``) the peft
    policy itself with its LoRA adapter disabled, which is the model it started as."""
    if reference is not None:
        yield reference
        return
    with policy.disable_adapter():
        yield policy

"""One PPO iteration: roll out, score, turn scores into advantages, then several epochs of clipped updates.

This is the algorithm's core, free of I/O: the `rl` stage wraps it with data loading, accelerate,
checkpoints and logging. Policy and critic are separate models with separate optimizers (they do not
share a backbone), as in InstructGPT.

Under several processes (``accelerator`` given; DDP), each process rolls out its own share of the prompts
and gradients are averaged by DDP; advantages are whitened per process; the KL controller sees the KL
averaged over all processes, so every process keeps the same β.

Under DeepSpeed, which trains one model per engine, policy and critic are one ``PolicyAndCritic`` module
with one optimizer (a parameter group each): ``critic_optimizer=None`` says so. Each micro-batch then
takes one backward of the summed losses (the two models share no parameter, so each gets exactly its
own gradient), and DeepSpeed clips the gradient norm of both models together.

Both paths update alike: the loss is ``policy_loss + vf_coef * value_loss`` (TRL's PPO, vf_coef 0.1) and the
gradient norm of both models together is clipped to ``max_grad_norm`` (DeepSpeed can only clip an engine's
gradients as a whole, so the DDP path clips jointly too rather than each model on its own).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptpipe.finite import all_finite, any_process
from gptpipe.ppo.advantages import gae, masked_mean, token_rewards, whiten
from gptpipe.ppo.kl import FixedKLController, kl_per_token
from gptpipe.ppo.losses import entropy_from_logits, policy_loss, value_loss
from gptpipe.ppo.ptx import PTXBatch, ptx_loss_sum
from gptpipe.ppo.rollout import (
    Rollout,
    ToolStep,
    reference_context,
    response_logprobs,
    sample,
    sample_with_tools,
)
from gptpipe.ppo.value import response_values

# score_fn(rollout) -> one scalar per sequence (the frozen reward model, or any Python function)
ScoreFn = Callable[[Rollout], torch.Tensor]
# ptx_fn(update) -> the ptx rows of this iteration's update number ``update`` (PPO-ptx, gptpipe.ppo.ptx)
PTXFn = Callable[[int], PTXBatch]


@dataclass
class PPOSettings:
    pad_token_id: int = 0
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these (end of turn, EOS)
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    ppo_epochs: int = 4
    minibatches: int = 1
    clip: float = 0.2
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    kl_estimator: str = "k1"
    missing_eos_score: float | None = None  # replace the score of a response that never stopped
    missing_eos_penalty: float | None = None  # subtract this from it (TRL's key: score - penalty)
    reward_clip: float | None = None  # clip scores to [-c, c]
    whiten_rewards: bool = False  # scale the per-token rewards to unit variance, keeping their mean
    whiten_advantages: bool = True
    vf_coef: float = 0.1  # the value loss's weight in the loss (and so in the jointly clipped gradient norm)
    max_grad_norm: float = 1.0  # of policy and critic together (as DeepSpeed clips one engine)
    gradient_accumulation_steps: int = 1  # micro-batches per minibatch (same update, less memory)
    forward_batch_size: int | None = None  # rows per no-grad forward when scoring a rollout (None: all)
    skip_nonfinite: bool = False  # drop a NaN/inf update (counted) instead of raising NonFiniteUpdate
    ptx_coef: float = 0.0  # PPO-ptx: the weight of the language-model loss on ptx rows in every update
    # With tools: multi-turn rollouts (``rollout.sample_with_tools``) and the rounds of calls an episode may take.
    tool_step: ToolStep | None = None
    max_tool_calls: int = 3


class NonFiniteUpdate(FloatingPointError):
    """Rewards, values, log-probs, a loss or a gradient norm was NaN or infinite; nothing was applied."""

    def __init__(self, what: str):
        super().__init__(f"{what}: NaN or infinite")
        self.what = what


@dataclass
class PPOModels:
    """What one iteration trains. ``reference=None``: the policy is a peft (LoRA) model and the reference is the
    same weights with the adapter disabled (no second copy). ``critic_optimizer=None``: DeepSpeed, where
    ``engine`` is the engine of a ``PolicyAndCritic`` and ``policy_optimizer`` its one optimizer (see above).
    ``accelerator``: given under several processes or DeepSpeed."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    critic: torch.nn.Module
    policy_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer | None = None
    accelerator: object = None
    engine: object = None

    @property
    def joint(self) -> bool:
        return self.critic_optimizer is None

    def backward(self, loss: torch.Tensor) -> None:
        (self.accelerator.backward if self.accelerator else torch.Tensor.backward)(loss)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the gradients of policy and critic together (as DeepSpeed clips its one engine); their norm."""
        clip = self.accelerator.clip_grad_norm_ if self.accelerator else torch.nn.utils.clip_grad_norm_
        return torch.as_tensor(clip([*self.policy.parameters(), *self.critic.parameters()], max_norm))


@dataclass
class Experience:
    """A scored rollout: what the PPO epochs learn from (no gradients)."""

    rollout: Rollout
    mask: torch.Tensor  # the response mask as floats
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    old_values: torch.Tensor
    scores: torch.Tensor  # the reward model's (or score_fn's), before shaping
    kl: torch.Tensor  # per token, masked
    advantages: torch.Tensor
    returns: torch.Tensor


def ppo_iteration(
    models: PPOModels,
    score_fn: ScoreFn,
    prompts: list[list[int]],
    kl_controller: FixedKLController,
    settings: PPOSettings,
    generator: torch.Generator | None = None,
    ptx_fn: PTXFn | None = None,
) -> dict:
    """Run one iteration on a batch of prompts (token ids); returns the statistics to log. ``ptx_fn``: the rows
    of each update's PPO-ptx term (with ``settings.ptx_coef``)."""
    clock = [time.perf_counter()]  # phase timings (seconds), logged as time_generation/scoring/training
    rollout = generate(models, prompts, settings)
    clock.append(time.perf_counter())
    beta = kl_controller.beta  # this iteration's (logged: the update below sets the next one)
    experience = make_experience(models, rollout, score_fn, beta, settings)
    clock.append(time.perf_counter())
    # A broken reward model or a diverged critic: no update from this batch (every process agrees).
    e = experience
    if not _finite_everywhere([e.scores, e.old_values, e.old_logprobs, e.ref_logprobs], models.accelerator):
        if not settings.skip_nonfinite:
            raise NonFiniteUpdate("the rewards, values or log-probs")
        return {"skipped_nonfinite": 1.0, "beta": beta}
    stats, skipped = ppo_update(models, experience, settings, generator, ptx_fn)
    clock.append(time.perf_counter())
    out = {
        key: sum(v * w for v, w in pairs) / max(sum(w for _, w in pairs), 1) for key, pairs in stats.items()
    }
    if skipped:
        out["skipped_nonfinite"] = float(skipped)
    phases = ("time_generation", "time_scoring", "time_training")
    out |= {name: clock[i + 1] - clock[i] for i, name in enumerate(phases)}
    out |= {
        "reward": e.scores.mean().item(),
        "kl": e.kl.sum(dim=1).mean().item(),
        "response_length": e.mask.sum(dim=1).mean().item(),
        "ended_fraction": rollout.ended.float().mean().item(),
    }
    if settings.tool_step is not None:  # this rollout's calls (validity 1.0 when it made none)
        counts = settings.tool_step.counts
        out["tool_calls_per_episode"] = counts["calls"] / len(prompts)
        out["tool_call_validity"] = counts["valid_calls"] / counts["calls"] if counts["calls"] else 1.0
    accelerator = models.accelerator
    if accelerator is not None and accelerator.num_processes > 1:
        out = _mean_over_processes(out, accelerator)  # every process logs and adapts β on the same numbers
    kl_controller.update(out["kl"], len(prompts) * (accelerator.num_processes if accelerator else 1))
    out["beta"] = beta
    return out


def generate(models: PPOModels, prompts: list[list[int]], s: PPOSettings) -> Rollout:
    """One sampled response per prompt from the policy as it is now (dropout off: the ratio starts at 1)."""
    models.policy.eval()
    with for_generation(models.engine or models.policy, models.accelerator) as generating:
        generating = generating.policy if models.engine is not None else generating
        if s.tool_step is None:
            return sample(
                generating, prompts, s.pad_token_id, s.eos_token_ids, s.max_new_tokens, s.temperature, s.top_p
            )
        return sample_with_tools(
            generating,
            prompts,
            s.tool_step,
            s.max_tool_calls,
            s.pad_token_id,
            s.eos_token_ids,
            s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
        )


@torch.no_grad()
def make_experience(
    models: PPOModels, rollout: Rollout, score_fn: ScoreFn, beta: float, s: PPOSettings
) -> Experience:
    """Old log-probs, the reference's, old values and scores; per-token rewards, GAE advantages and returns."""
    mask = rollout.response_mask.float()
    size = s.forward_batch_size
    old_logprobs = _in_rows(lambda r: response_logprobs(models.policy, r, s.temperature)[0], rollout, size)
    bare = models.accelerator.unwrap_model(models.policy) if models.accelerator else models.policy
    with reference_context(bare, models.reference) as ref_model:
        ref_logprobs = _in_rows(lambda r: response_logprobs(ref_model, r, s.temperature)[0], rollout, size)
    old_values = _in_rows(lambda r: response_values(models.critic, r), rollout, size)
    scores = score_fn(rollout).float()
    kl = kl_per_token(old_logprobs, ref_logprobs, s.kl_estimator) * mask
    rewards = per_token_rewards(shape_scores(scores, rollout.ended, s), kl, mask, beta, s)
    advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
    if s.whiten_advantages:
        advantages = whiten(advantages, mask)
    return Experience(rollout, mask, old_logprobs, ref_logprobs, old_values, scores, kl, advantages, returns)


def ppo_update(
    models: PPOModels, e: Experience, s: PPOSettings, generator, ptx_fn: PTXFn | None = None
) -> tuple[dict, int]:
    """``ppo_epochs`` passes over the batch in ``minibatches`` updates (with ``ptx_fn``, each with its PPO-ptx
    rows); returns (statistics as (value, tokens) pairs, updates skipped for a NaN/inf gradient)."""
    stats: dict[str, list[tuple[float, float]]] = {}
    skipped, update = 0, 0
    for _ in range(s.ppo_epochs):
        order = torch.randperm(len(e.rollout.input_ids), generator=generator)
        for minibatch in order.chunk(s.minibatches):
            models.policy_optimizer.zero_grad()
            if not models.joint:
                models.critic_optimizer.zero_grad()
            ptx = ptx_fn(update) if ptx_fn is not None and s.ptx_coef else None
            update += 1
            accumulate_gradients(models, e, minibatch, s, stats, ptx)
            if models.joint:  # the engine clipped and stepped at the last micro-batch
                continue
            norm = models.clip_grad_norm(s.max_grad_norm)
            if not all_finite([norm]):  # the gradients are already averaged: every process agrees
                if not s.skip_nonfinite:
                    raise NonFiniteUpdate("the gradient norm (from the losses or the probability ratio)")
                skipped += 1  # drop this minibatch's update
                models.policy_optimizer.zero_grad(set_to_none=True)
                models.critic_optimizer.zero_grad(set_to_none=True)
                continue
            models.policy_optimizer.step()
            models.critic_optimizer.step()
    return stats, skipped


def accumulate_gradients(
    models: PPOModels, e: Experience, minibatch, s: PPOSettings, stats: dict, ptx: PTXBatch | None = None
) -> None:
    """The minibatch's gradients, one micro-batch at a time: each micro-batch's token-mean loss weighted by its
    share of the minibatch's tokens, so the sum is the gradient of the minibatch's token mean. With ``ptx``, the
    policy's loss is ``policy_loss + ptx_coef * ptx_loss`` (PPO-ptx), the ptx rows split over the micro-batches
    the same way (each chunk's summed NLL over all the ptx rows' tokens: the sum is the token mean)."""
    tokens = e.mask[minibatch].sum().clamp(min=1)
    chunks = minibatch.chunk(s.gradient_accumulation_steps)
    ptx_chunks = torch.arange(len(ptx.input_ids)).chunk(len(chunks)) if ptx is not None else ()
    for index, chunk in enumerate(chunks):
        part, m = _select(e.rollout, chunk), e.mask[chunk]
        share = m.sum() / tokens
        logprobs, logits = response_logprobs(models.policy, part, s.temperature)
        p_loss, p_stats = policy_loss(logprobs, e.old_logprobs[chunk], e.advantages[chunk], m, s.clip)
        ptx_term = torch.zeros((), device=p_loss.device)  # this micro-batch's part of the ptx token mean
        if index < len(ptx_chunks):
            ptx_part = ptx.select(ptx_chunks[index])
            ptx_sum = ptx_loss_sum(models.policy, ptx_part)
            ptx_term = ptx_sum / ptx.tokens.clamp(min=1)
            part_tokens = ptx_part.tokens.item()  # logged as the token mean over all the update's ptx rows
            stats.setdefault("ptx_loss", []).append((ptx_sum.item() / max(part_tokens, 1), part_tokens))
        if not models.joint:
            models.backward(p_loss * share + s.ptx_coef * ptx_term)
        values = response_values(models.critic, part)
        v_loss, v_stats = value_loss(values, e.old_values[chunk], e.returns[chunk], m, s.value_clip)
        if models.joint:  # DeepSpeed divides each micro-batch's loss by its accumulation steps itself
            # ...and steps inside backward: a NaN loss must be caught before it (no skipping here)
            if not _finite_everywhere([p_loss, v_loss, ptx_term], models.accelerator):
                raise NonFiniteUpdate("the policy or value loss (or the probability ratio)")
            # accelerate tells DeepSpeed "step now" from sync_gradients, which is always true outside
            # accelerator.accumulate(): say it at the minibatch's last micro-batch only.
            models.accelerator.sync_gradients = index == len(chunks) - 1
            loss = (p_loss + s.vf_coef * v_loss) * share + s.ptx_coef * ptx_term
            models.backward(loss * s.gradient_accumulation_steps)
            models.accelerator.sync_gradients = True
        else:
            models.backward(s.vf_coef * v_loss * share)
        with torch.no_grad():
            p_stats["entropy"] = masked_mean(entropy_from_logits(logits), m).item()
        found = {**p_stats, **v_stats, "policy_loss": p_loss.item(), "value_loss": v_loss.item()}
        for key, value in found.items():  # each micro-batch's token mean, weighted by its tokens
            stats.setdefault(key, []).append((value, m.sum().item()))


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, s: PPOSettings) -> torch.Tensor:
    """The reward model's scores as PPO optimizes them: a response that never stopped gets
    ``missing_eos_score`` instead, or its score minus ``missing_eos_penalty``; then optional clipping to [-c, c]."""
    if s.missing_eos_score is not None:
        scores = torch.where(ended, scores, torch.full_like(scores, s.missing_eos_score))
    if s.missing_eos_penalty is not None:
        scores = torch.where(ended, scores, scores - s.missing_eos_penalty)
    if s.reward_clip is not None:
        scores = scores.clamp(-s.reward_clip, s.reward_clip)
    return scores


def per_token_rewards(scores, kl, mask, beta: float, s: PPOSettings) -> torch.Tensor:
    """−β·KL on every token plus the score on the last; ``whiten_rewards`` scales them to unit variance over the
    batch's valid tokens and keeps their mean (as the 2019 code and TRL's PPO: the sign of a reward survives)."""
    rewards = token_rewards(scores, kl, mask, beta)
    return whiten(rewards, mask, shift_mean=False) if s.whiten_rewards else rewards


def for_generation(model, accelerator):
    """The bare model for ``generate`` (DDP wraps it; ZeRO-3 needs its parameters gathered and its hooks
    off, as TRL's trainers do)."""
    if accelerator is None:
        return contextlib.nullcontext(model)
    from trl.models.utils import unwrap_model_for_generation

    return unwrap_model_for_generation(model, accelerator)


class PolicyAndCritic(torch.nn.Module):
    """The policy and the critic as one module, for DeepSpeed (one engine, one optimizer; see the module
    docstring). Forward passes call ``.policy`` and ``.critic`` directly."""

    is_gradient_checkpointing = False

    def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module):
        super().__init__()
        self.policy, self.critic = policy, critic
        self.config = policy.config  # accelerate sizes DeepSpeed's communication buckets from it

    def split_state_dict(self, state: dict) -> tuple[dict, dict]:
        """A state dict of this module -> (the policy's, the critic's)."""
        parts: tuple[dict, dict] = ({}, {})
        for key, value in state.items():
            name, rest = key.split(".", 1)
            parts[name == "critic"][rest] = value
        return parts


def _finite_everywhere(tensors: list[torch.Tensor], accelerator) -> bool:
    """Whether every value is finite on every process (one all-reduce when ``accelerator`` is given)."""
    if accelerator is None:
        return all_finite(tensors)
    return not any_process(not all_finite(tensors), accelerator.device)


def _mean_over_processes(stats: dict, accelerator) -> dict:
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist(), strict=True))


def _in_rows(forward, rollout: Rollout, size: int | None) -> torch.Tensor:
    """``forward(rollout)`` a slice of ``size`` rows at a time (all at once when None): the full batch's
    [rows x length x vocabulary] float logits can be larger than the model."""
    rows = len(rollout.input_ids)
    if not size or size >= rows:
        return forward(rollout)
    return torch.cat(
        [forward(_select(rollout, torch.arange(i, min(i + size, rows)))) for i in range(0, rows, size)]
    )


def _select(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    return Rollout(
        input_ids=rollout.input_ids[rows],
        attention_mask=rollout.attention_mask[rows],
        response_mask=rollout.response_mask[rows],
        ended=rollout.ended[rows],
        prompt_length=rollout.prompt_length,
    )

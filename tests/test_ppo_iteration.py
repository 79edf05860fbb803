"""PPO raises a toy reward on a tiny random policy within a few dozen CPU iterations, with KL kept in view."""

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_llama_config
from learning import SEED, learning_checks
from transformers import LlamaForCausalLM

from gptpipe.ppo.iteration import PPOModels, PPOSettings, ppo_iteration
from gptpipe.ppo.kl import AdaptiveKLController
from gptpipe.ppo.value import build_value_model

PAD, EOS, TARGET = 0, 2, 7


@pytest.mark.learning
def test_ppo_raises_a_toy_reward(tmp_path):
    torch.manual_seed(SEED)
    config = tiny_llama_config(vocab_size=24)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(tmp_path / "policy")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    critic = build_value_model(str(tmp_path / "policy"), init="policy")

    def score(rollout):  # the share of response tokens that are TARGET: a reward a policy can learn fast
        hits = ((rollout.responses == TARGET) * rollout.response_mask).sum(dim=1)
        return hits / rollout.response_mask.sum(dim=1).clamp(min=1)

    settings = PPOSettings(
        pad_token_id=PAD, eos_token_ids=(EOS,), max_new_tokens=6, ppo_epochs=2, minibatches=2
    )
    kl_ctl = AdaptiveKLController(beta=0.02, target=2.0, horizon=1000)
    policy_opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED)
    models = PPOModels(policy, reference, critic, policy_opt, critic_opt)
    prompts = [[1, 3 + i % 5, 4 + i % 3] for i in range(16)]
    history = [ppo_iteration(models, score, prompts, kl_ctl, settings, generator) for _ in range(30)]
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    print(f"toy reward {first:.3f} -> {last:.3f}; kl {history[0]['kl']:.3f} -> {history[-1]['kl']:.3f}")
    with learning_checks() as check:
        check.at_most("toy reward, first 3 iterations", first, 0.15)  # seeds 0-4, 1-2 threads: 0.038-0.061
        check.at_least("toy reward gain, last 3 vs first 3", last - first, 0.6)  # 0.925-0.955
    assert history[-1]["kl"] > history[0]["kl"]  # moving away from the reference is what KL measures
    assert (
        history[0]["approx_kl"] < 0.05 and history[0]["ratio_mean"] > 0.9
    )  # first update starts at ratio ~1
    assert kl_ctl.beta != 0.02  # the adaptive controller reacted


def test_scoring_a_rollout_in_slices_gives_the_same_experience(tmp_path):
    """forward_batch_size: the no-grad passes over a rollout, a few rows at a time, compute what one pass does."""
    from gptpipe.ppo.iteration import generate, make_experience

    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config(vocab_size=24)).eval()
    policy.save_pretrained(tmp_path / "policy")
    reference = copy.deepcopy(policy).requires_grad_(False)
    critic = build_value_model(str(tmp_path / "policy"), init="reward").eval()  # a head that is not zero
    models = PPOModels(policy, reference, critic, torch.optim.SGD(policy.parameters(), lr=0.0))
    whole = PPOSettings(pad_token_id=PAD, eos_token_ids=(EOS,), max_new_tokens=6)
    rollout = generate(models, [[1, 3 + i % 5, 4 + i % 3][: 2 + i % 2] for i in range(5)], whole)

    def score(r):
        return r.response_mask.sum(dim=1).float()

    sliced = dataclasses.replace(whole, forward_batch_size=2)
    a, b = (make_experience(models, rollout, score, 0.1, s) for s in (whole, sliced))
    for name in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-5, rtol=1e-5, msg=name)

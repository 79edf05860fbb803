"""PPO math against direct implementations written here: loops over Python floats, one token at a time."""

import math

import pytest
import torch

from gptpipe.ppo.advantages import gae, token_rewards, whiten
from gptpipe.ppo.iteration import PPOSettings, per_token_rewards, shape_scores
from gptpipe.ppo.kl import AdaptiveKLController, FixedKLController, kl_per_token
from gptpipe.ppo.losses import entropy_from_logits, policy_loss, value_loss

# Three responses of lengths 4, 2 and 5 in a batch padded to 5 tokens.
LENGTHS = [4, 2, 5]
MASK = torch.tensor([[1.0 if t < n else 0.0 for t in range(5)] for n in LENGTHS])


def rand(seed, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def test_gae_matches_the_recursion_over_valid_tokens_only():
    rewards, values = rand(1) * MASK, rand(2)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, MASK, gamma, lam)
    for b, n in enumerate(LENGTHS):
        expected, following, next_v = [0.0] * n, 0.0, 0.0
        for t in reversed(range(n)):  # V after the last response token is 0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            following = delta + gamma * lam * following
            expected[t] = following
            next_v = values[b, t].item()
        assert advantages[b, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert returns[b, :n].tolist() == pytest.approx(
            [a + values[b, t].item() for t, a in enumerate(expected)], abs=1e-12
        )
        assert advantages[b, n:].abs().sum() == 0 and returns[b, n:].abs().sum() == 0  # padding stays 0


def test_gae_with_gamma_1_lambda_1_is_reward_to_go_minus_value():
    rewards, values = rand(3) * MASK, rand(4)
    advantages, _ = gae(rewards, values, MASK, 1.0, 1.0)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            assert advantages[b, t].item() == pytest.approx(
                rewards[b, t:n].sum().item() - values[b, t].item(), abs=1e-12
            )


def test_masked_whitening():
    x = rand(5) * 3 + 2
    valid = [x[b, t].item() for b, n in enumerate(LENGTHS) for t in range(n)]
    mean = sum(valid) / len(valid)
    std = math.sqrt(sum((v - mean) ** 2 for v in valid) / (len(valid) - 1))
    for shift_mean in (True, False):
        out = whiten(x, MASK, shift_mean=shift_mean)
        for b, n in enumerate(LENGTHS):
            for t in range(5):
                expected = ((x[b, t].item() - mean) / std + (0 if shift_mean else mean)) if t < n else 0.0
                assert out[b, t].item() == pytest.approx(expected, abs=1e-6)


def test_token_rewards_put_the_score_on_the_last_valid_token():
    kl = rand(6).abs()
    score = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    rewards = token_rewards(score, kl, MASK, beta=0.1)
    for b, n in enumerate(LENGTHS):
        expected = [-0.1 * kl[b, t].item() for t in range(n)]
        expected[-1] += score[b].item()
        assert rewards[b, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert rewards[b, n:].abs().sum() == 0


def test_kl_estimators():
    logp, ref = -rand(7).abs(), -rand(8).abs()
    k1, k3 = kl_per_token(logp, ref, "k1"), kl_per_token(logp, ref, "k3")
    for b in range(3):
        for t in range(5):
            lp, lr = logp[b, t].item(), ref[b, t].item()
            assert k1[b, t].item() == pytest.approx(lp - lr, abs=1e-12)
            assert k3[b, t].item() == pytest.approx(math.exp(lr - lp) - 1 - (lr - lp), abs=1e-12)
    assert (k3 >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_per_token(logp, ref, "k2")


def test_both_estimators_are_unbiased_for_the_true_kl():
    # Sample from p, estimate KL(p || q) on a 4-symbol distribution: both means approach the exact value.
    p = torch.tensor([0.5, 0.25, 0.15, 0.10], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for estimator in ("k1", "k3"):
        estimate = kl_per_token(p.log()[samples], q.log()[samples], estimator).mean().item()
        assert estimate == pytest.approx(exact, rel=0.02)


def test_clipped_policy_loss():
    logp, old, adv = rand(9) * 0.3, rand(10) * 0.3, rand(11)
    loss, stats = policy_loss(logp, old, adv, MASK, clip=0.2)
    terms, clipped = [], 0
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            ratio = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b, t].item()
            plain, cut = -a * ratio, -a * min(max(ratio, 0.8), 1.2)
            terms.append(max(plain, cut))
            clipped += cut > plain
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    assert stats["clipfrac"] == pytest.approx(clipped / len(terms))


def test_policy_loss_gradient_vanishes_outside_the_trust_region():
    old = torch.zeros(1, 1, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.float64)
    for log_ratio, advantage, moves in [
        (0.5, 1.0, False),
        (0.5, -1.0, True),
        (-0.5, -1.0, False),
        (0.05, 1.0, True),
    ]:
        logp = torch.full((1, 1), log_ratio, dtype=torch.float64, requires_grad=True)
        policy_loss(logp, old, torch.full((1, 1), advantage, dtype=torch.float64), mask)[0].backward()
        assert (logp.grad.abs().item() > 0) == moves, (log_ratio, advantage)


def test_clipped_value_loss():
    values, old, returns = rand(12), rand(13), rand(14)
    loss, _ = value_loss(values, old, returns, MASK, clip=0.2)
    terms = []
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            v, vo, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            vc = vo + min(max(v - vo, -0.2), 0.2)
            terms.append(max((v - r) ** 2, (vc - r) ** 2))
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms), abs=1e-12)


def test_adaptive_kl_controller_follows_ziegler_2019():
    ctl = AdaptiveKLController(beta=0.1, target=6.0, horizon=10_000)
    beta = 0.1
    for observed in (12.0, 6.6, 3.0, 0.0, 6.0):
        ctl.update(observed, num_samples=512)
        error = min(max(observed / 6.0 - 1, -0.2), 0.2)
        beta *= 1 + error * 512 / 10_000
        assert ctl.beta == pytest.approx(beta, rel=1e-12)
    restored = AdaptiveKLController(beta=1.0, target=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.beta == ctl.beta
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 512)
    assert fixed.beta == 0.05


def test_entropy_from_logits():
    logits = rand(15, (2, 3, 7))
    ent = entropy_from_logits(logits)
    for i in range(2):
        for j in range(3):
            z = [math.exp(v) for v in logits[i, j].tolist()]
            p = [v / sum(z) for v in z]
            assert ent[i, j].item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-5)
    uniform = entropy_from_logits(torch.zeros(1, 7))
    assert uniform.item() == pytest.approx(math.log(7), abs=1e-6)


def test_score_shaping_matches_a_direct_computation():
    scores = torch.tensor([3.0, -5.0, 0.5, 1.0])
    ended = torch.tensor([True, True, False, True])
    replaced = shape_scores(scores, ended, PPOSettings(missing_eos_score=-2.0, reward_clip=2.0))
    torch.testing.assert_close(replaced, torch.tensor([2.0, -2.0, -2.0, 1.0]))  # replaced, then clipped
    penalized = shape_scores(scores, ended, PPOSettings(missing_eos_penalty=1.0))  # TRL's: score - penalty
    torch.testing.assert_close(penalized, torch.tensor([3.0, -5.0, -0.5, 1.0]))
    torch.testing.assert_close(shape_scores(scores, ended, PPOSettings()), scores)  # off by default


def test_whitened_rewards_keep_their_mean_over_valid_tokens():
    """whiten_rewards as in the 2019 code and TRL's PPO: per-token rewards scaled to unit variance over the
    batch's valid tokens, mean kept (a batch of good answers stays positive), padding left at 0."""
    scores = torch.tensor([2.0, 3.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.4, 0.0, 0.0, 0.0], [0.2, 0.1, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    raw = per_token_rewards(scores, kl, mask, 0.5, PPOSettings())
    got = per_token_rewards(scores, kl, mask, 0.5, PPOSettings(whiten_rewards=True))
    valid = [
        r
        for row, m in zip(raw.tolist(), mask.tolist(), strict=True)
        for r, v in zip(row, m, strict=True)
        if v
    ]
    mean = sum(valid) / len(valid)
    std = (sum((r - mean) ** 2 for r in valid) / (len(valid) - 1)) ** 0.5
    expected = [
        [(r - mean) / std + mean if v else 0.0 for r, v in zip(row, m, strict=True)]
        for row, m in zip(raw.tolist(), mask.tolist(), strict=True)
    ]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert (got * mask).sum() / mask.sum() == pytest.approx(mean, abs=1e-5)


def test_tool_result_tokens_between_turns_are_skipped_as_if_absent():
    # Row 0: own, own, tool, tool, own, pad; row 1: own, tool, own, own, pad, pad. Masked positions are a tool's
    # result (not an action): GAE and the rewards must equal those of the row with them cut out.
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 0], [1, 0, 1, 1, 0, 0]])
    rewards, values, kl = rand(9, (2, 6)), rand(10, (2, 6)), rand(11, (2, 6)).abs()
    score = torch.tensor([2.0, -1.0], dtype=torch.float64)
    shaped = token_rewards(score, kl, mask, beta=0.1)
    advantages, returns = gae(rewards * mask, values, mask, 0.9, 0.8)
    for b in range(2):
        own = mask[b].bool()
        n = int(own.sum())
        compact_mask = torch.ones(1, n, dtype=torch.float64)
        alone = token_rewards(score[b : b + 1], kl[b : b + 1, own], compact_mask, beta=0.1)
        assert shaped[b, own].tolist() == pytest.approx(alone[0].tolist(), abs=1e-12)
        a, r = gae(rewards[b : b + 1, own], values[b : b + 1, own], compact_mask, 0.9, 0.8)
        assert advantages[b, own].tolist() == pytest.approx(a[0].tolist(), abs=1e-12)
        assert returns[b, own].tolist() == pytest.approx(r[0].tolist(), abs=1e-12)
        for out in (shaped, advantages, returns):
            assert out[b, ~own].abs().sum() == 0  # nothing lands on a tool's tokens or the padding

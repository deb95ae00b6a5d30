"""PPO maths in float64 against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.train.ppo.advantages import (
    AdaptiveKLController,
    explained_variance,
    gae,
    kl_estimate,
    kl_penalised_rewards,
    masked_mean,
    masked_whiten,
)
from flywheel.train.ppo.losses import policy_loss, value_loss


@pytest.fixture(autouse=True)
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _batch(seed=0, b=4, r=7):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(b, r, generator=g)
    values = torch.randn(b, r, generator=g)
    lengths = torch.tensor([7, 3, 1, 5])[:b]
    mask = (torch.arange(r)[None, :] < lengths[:, None]).double()
    return rewards * mask, values, mask, lengths


def _brute_gae(rewards, values, lengths, gamma, lam):
    b, r = rewards.shape
    adv = torch.zeros(b, r)
    for i in range(b):
        n = int(lengths[i])
        v = [float(values[i, t]) for t in range(n)] + [0.0]  # the value after the last token is 0
        deltas = [float(rewards[i, t]) + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            adv[i, t] = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t))
    return adv


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_brute_force(gamma, lam):
    rewards, values, mask, lengths = _batch()
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want = _brute_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(ret, (want + values) * mask, rtol=0, atol=1e-10)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_lambda_zero_is_td_error():
    rewards, values, mask, lengths = _batch(1)
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)
    v = values * mask
    next_v = torch.cat([v[:, 1:], torch.zeros(4, 1)], 1)
    torch.testing.assert_close(adv, (rewards + next_v - v) * mask, rtol=0, atol=1e-10)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask, lengths = _batch(2)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1]) * mask
    torch.testing.assert_close(adv, to_go - values * mask, rtol=0, atol=1e-10)
    torch.testing.assert_close(ret, to_go, rtol=0, atol=1e-10)


def test_masked_whiten_equals_whitening_of_the_valid_entries():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3)) * 5 + 2
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float64)
    valid = x[mask.bool()]
    want = (valid - valid.mean()) / torch.sqrt(valid.var(unbiased=True) + 1e-8)
    got = masked_whiten(x, mask)
    torch.testing.assert_close(got[mask.bool()], want, rtol=0, atol=1e-10)
    assert torch.all(got[~mask.bool()] == 0)
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept[mask.bool()], want + valid.mean(), rtol=0, atol=1e-10)
    assert masked_mean(x, mask) == pytest.approx(float(valid.mean()))


def test_reward_tensor_holds_kl_penalty_and_the_score_once_at_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.1, -0.2, -3.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.3, -0.2, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    scores = torch.tensor([2.0, -3.0])
    kl = kl_estimate(logp, ref, "k1")
    r = kl_penalised_rewards(scores, kl, mask, kl_coef=0.1)
    want = torch.tensor([[-0.1 * 0.5, -0.1 * -1.0, 0.0 + 2.0, 0.0], [-0.1 * 0.2, 0.0 - 3.0, 0.0, 0.0]])
    torch.testing.assert_close(r, want, rtol=0, atol=1e-12)
    # k3 is non-negative and matches its formula
    k3 = kl_estimate(logp, ref, "k3")
    lr = ref - logp
    torch.testing.assert_close(k3, torch.exp(lr) - 1 - lr, rtol=0, atol=1e-12)
    assert torch.all(k3 >= 0)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_policy_loss_at_ratio_one_has_no_clipping_and_zero_kl():
    logp = torch.randn(2, 5, generator=torch.Generator().manual_seed(4))
    adv = torch.randn(2, 5, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 5)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, clip=0.2)
    assert float(stats["clipfrac"]) == 0.0 and float(stats["approx_kl"]) == 0.0 and float(stats["ratio"]) == 1.0
    torch.testing.assert_close(loss, -adv.mean(), rtol=0, atol=1e-12)


def test_policy_loss_hand_computed_inside_and_outside_the_clip_range():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.1, 1.5, 0.5, 1.5]]))
    adv = torch.tensor([[1.0, 1.0, 1.0, -2.0]])
    mask = torch.ones(1, 4)
    loss, stats = policy_loss(new, old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): 1.1 inside -> -1.1; 1.5, A>0 -> clipped -1.2; 0.5, A>0 -> -0.5 (unclipped is
    # larger); 1.5, A<0 -> max(3.0, 2.4) = 3.0 (unclipped)
    want = (-1.1 - 1.2 - 0.5 + 3.0) / 4
    assert float(loss) == pytest.approx(want, abs=1e-12)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 4)


def test_value_loss_hand_computed():
    old = torch.tensor([[0.0, 0.0, 1.0]])
    new = torch.tensor([[0.1, 1.0, 1.0]])
    ret = torch.tensor([[1.0, 1.0, -1.0]])
    loss, stats = value_loss(new, old, ret, torch.tensor([[1.0, 1.0, 0.0]]), clip=0.2)
    # token 0: inside clip: (0.1-1)^2 = 0.81; token 1: unclipped 0, clipped (0.2-1)^2 = 0.64 -> 0.64; token 2 masked
    assert float(loss) == pytest.approx(0.5 * (0.81 + 0.64) / 2, abs=1e-12)
    assert float(stats["value_clipfrac"]) == pytest.approx(0.5)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros(1, 4) + ret.mean(), ret, mask) == pytest.approx(0.0)


def test_adaptive_kl_controller_moves_toward_target():
    c = AdaptiveKLController(0.1, target=6.0, horizon=100)
    c.update(current_kl=12.0, n_steps=10)
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    c.update(current_kl=3.0, n_steps=10)
    assert c.value < 0.1 * 1.02
    fixed = AdaptiveKLController(0.1, target=None, horizon=100)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    assert math.isfinite(c.value)

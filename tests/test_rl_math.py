"""The critic-free estimators' maths (GRPO, Dr. GRPO, RLOO, REINFORCE++) and the RL loss's parts, in float64
against brute-force references, and against TRL's GRPO / RLOO formulas where they define the same quantity."""

from __future__ import annotations

import math
import random

import pytest
import torch

from flywheel.train.ppo.advantages import (
    RunningMoments,
    clip_scores,
    discounted_returns,
    group_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_kl_rewards,
)
from flywheel.train.ppo.losses import clipped_surrogate, loss_weights, policy_loss, rl_token_loss


@pytest.fixture(autouse=True)
def float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _mask(lengths, r):
    return (torch.arange(r)[None, :] < torch.tensor(lengths)[:, None]).double()


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):  # unbiased
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("g", [2, 3, 8])
def test_group_advantages_equal_brute_force(g, scale):
    scores = torch.randn(5 * g, generator=torch.Generator().manual_seed(g))
    got = group_advantages(scores, g, scale=scale)
    want = []
    for start in range(0, len(scores), g):
        group = [float(x) for x in scores[start : start + g]]
        m, s = _mean(group), _std(group)
        want += [(x - m) / (s + 1e-4) if scale else x - m for x in group]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-12)


def test_group_advantages_of_a_constant_group_are_zero_and_shapes_are_checked():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 2.0, 1.0])
    adv = group_advantages(scores, 3)
    assert torch.all(adv[:3] == 0) and float(adv[3:].sum()) == pytest.approx(0, abs=1e-12)
    assert torch.all(group_advantages(scores, 1) == 0)  # one sample per prompt: nothing to compare with
    with pytest.raises(ValueError, match="multiple of the group size"):
        group_advantages(scores, 4)


@pytest.mark.parametrize("g", [2, 4, 5])
def test_rloo_advantages_equal_brute_force_leave_one_out(g):
    scores = torch.randn(3 * g, generator=torch.Generator().manual_seed(10 + g))
    got = rloo_advantages(scores, g)
    want = []
    for start in range(0, len(scores), g):
        group = [float(x) for x in scores[start : start + g]]
        want += [x - _mean(group[:i] + group[i + 1 :]) for i, x in enumerate(group)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(scores, 1)


def test_group_estimators_match_trls_formulas():
    """TRL's GRPOTrainer: mean/std over `rewards.view(-1, G)`, repeat_interleave back, (r - mean) / (std + 1e-4).
    TRL's RLOOTrainer lays the samples out as (k, prompts) and uses (sum over k - r) / (k - 1) as the baseline."""
    g, n = 4, 6
    rewards = torch.randn(n * g, generator=torch.Generator().manual_seed(3))
    mean = rewards.view(-1, g).mean(dim=1).repeat_interleave(g, dim=0)
    std = rewards.view(-1, g).std(dim=1).repeat_interleave(g, dim=0)
    torch.testing.assert_close(group_advantages(rewards, g), (rewards - mean) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, g, scale=False), rewards - mean)
    by_k = rewards.view(n, g).T  # (k, prompts): TRL's layout
    trl_rloo = by_k - (by_k.sum(0) - by_k) / (g - 1)
    torch.testing.assert_close(rloo_advantages(rewards, g), trl_rloo.T.reshape(-1))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_and_reinforce_pp_equal_brute_force(gamma):
    lengths, r = [5, 2, 7, 1], 7
    mask = _mask(lengths, r)
    rewards = torch.randn(4, r, generator=torch.Generator().manual_seed(4)) * mask
    want = torch.zeros(4, r)
    for i, n in enumerate(lengths):
        for t in range(n):
            want[i, t] = sum(gamma**k * float(rewards[i, t + k]) for k in range(n - t))
    got = discounted_returns(rewards + (1 - mask) * 99.0, mask, gamma)  # values on padding are ignored
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    flat = [float(want[i, t]) for i, n in enumerate(lengths) for t in range(n)]
    m, var = _mean(flat), _std(flat) ** 2
    whitened = torch.zeros(4, r)
    for i, n in enumerate(lengths):
        for t in range(n):
            whitened[i, t] = (float(want[i, t]) - m) / math.sqrt(var + 1e-8)
    torch.testing.assert_close(reinforce_pp_advantages(rewards, mask, gamma), whitened, rtol=0, atol=1e-10)


def test_sequence_kl_rewards_and_reward_clipping():
    mask = _mask([3, 1], 3)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 7.0, 7.0]])
    got = sequence_kl_rewards(torch.tensor([1.0, 2.0]), kl, mask, 0.5)
    torch.testing.assert_close(got, torch.tensor([1.0 - 0.5 * 0.6, 2.0 - 0.5 * 0.5]))
    s = torch.tensor([-9.0, -1.0, 0.5, 4.0])
    torch.testing.assert_close(clip_scores(s, 2.0), torch.tensor([-2.0, -1.0, 0.5, 2.0]))
    assert clip_scores(s, None) is s and clip_scores(s, 0.0) is s


def test_running_moments_equal_the_moments_of_everything_seen_and_resume():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(5)
    rm, seen = RunningMoments(), []
    for _ in range(30):
        batch = 3.0 + 2.0 * torch.randn(rng.randint(1, 9), generator=g)
        seen += [float(x) for x in batch]
        rm.update(batch)
        assert rm.count == len(seen)
        assert rm.mean == pytest.approx(_mean(seen), abs=1e-12)
        if len(seen) > 1:
            assert rm.var == pytest.approx(_std(seen) ** 2, rel=1e-12)
    again = RunningMoments()
    again.load_state_dict(rm.state_dict())
    x = torch.randn(6, generator=g)
    all_x = seen + [float(v) for v in x]
    want = torch.tensor([(v - _mean(all_x)) / (_std(all_x) + 1e-8) for v in x.tolist()])
    torch.testing.assert_close(again.normalise(x), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(rm.normalise(x), want, rtol=0, atol=1e-12)
    assert RunningMoments().var == 1.0


def _aggregate_brute(x, lengths, how, max_len):
    per_seq = [[float(x[i, t]) for t in range(n)] for i, n in enumerate(lengths)]
    if how == "token-mean":
        flat = [v for s in per_seq for v in s]
        return sum(flat) / len(flat)
    if how == "seq-mean":
        return _mean([_mean(s) for s in per_seq])
    return sum(v for s in per_seq for v in s) / (len(lengths) * max_len)


@pytest.mark.parametrize("how", ["token-mean", "seq-mean", "constant"])
def test_loss_weights_aggregate_like_brute_force_and_split_into_micro_batches(how):
    lengths, r = [6, 1, 3, 4], 6
    mask = _mask(lengths, r)
    x = torch.randn(4, r, generator=torch.Generator().manual_seed(6))
    w = loss_weights(mask, how, max_len=8)
    assert float((w * x).sum()) == pytest.approx(_aggregate_brute(x, lengths, how, 8), abs=1e-12)
    assert torch.all(w[mask == 0] == 0)
    halves = sum(float((w[s] * x[s]).sum()) for s in (slice(0, 2), slice(2, 4)))  # two micro-batches
    assert halves == pytest.approx(float((w * x).sum()), abs=1e-12)
    with pytest.raises(ValueError):
        loss_weights(mask, "sum")


def test_clipped_surrogate_brute_force_with_clip_higher_and_ppo_is_the_symmetric_case():
    g = torch.Generator().manual_seed(7)
    lp, old = 0.5 * torch.randn(3, 5, generator=g), 0.5 * torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    lo, hi = 0.2, 0.28
    got, clipped = clipped_surrogate(lp, old, adv, lo, hi)
    for i in range(3):
        for t in range(5):
            r, a = math.exp(float(lp[i, t] - old[i, t])), float(adv[i, t])
            c = min(max(r, 1 - lo), 1 + hi)
            assert float(got[i, t]) == pytest.approx(max(-a * r, -a * c), abs=1e-12)
            assert bool(clipped[i, t]) == (-a * c > -a * r)
    # a ratio of 1.25 with A > 0: clipped by PPO's 0.2, free under clip-higher's 0.28
    one = torch.tensor([[math.log(1.25)]])
    assert float(clipped_surrogate(one, torch.zeros(1, 1), torch.ones(1, 1), 0.2)[0]) == pytest.approx(-1.2)
    assert float(clipped_surrogate(one, torch.zeros(1, 1), torch.ones(1, 1), 0.2, 0.28)[0]) == pytest.approx(-1.25)
    mask = _mask([5, 2, 4], 5)
    sym, _ = clipped_surrogate(lp, old, adv, 0.2)
    ppo, _ = policy_loss(lp, old, adv, mask, 0.2)
    torch.testing.assert_close((loss_weights(mask, "token-mean") * sym).sum(), ppo, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_rl_loss_matches_trls_grpo_loss(loss_type):
    """TRL's GRPOTrainer._compute_loss, written out: coef_1 = exp(logp - old), coef_2 = clamp(coef_1, 1 - eps_low,
    1 + eps_high), per_token_loss = -min(coef_1 A, coef_2 A) + beta (exp(ref - logp) - (ref - logp) - 1), then
    grpo: mean over sequences of their token means; bnpo: token mean; dr_grpo: sum / (B * max_completion_length)."""
    g = torch.Generator().manual_seed(8)
    b, r, max_len, beta, lo, hi = 6, 7, 9, 0.04, 0.2, 0.28
    mask = _mask([7, 3, 1, 5, 6, 2], r)
    lp, old, ref = (0.3 * torch.randn(b, r, generator=g) - 2 for _ in range(3))
    adv = torch.randn(b, generator=g)
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - lo, 1 + hi)
    ptl = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1))
    ptl = ptl + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
    want = {
        "grpo": ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean(),
        "bnpo": (ptl * mask).sum() / mask.sum().clamp(min=1.0),
        "dr_grpo": (ptl * mask).sum() / (b * max_len),
    }[loss_type]
    how = {"grpo": "seq-mean", "bnpo": "token-mean", "dr_grpo": "constant"}[loss_type]
    per_token, parts = rl_token_loss(
        lp, old, ref, adv[:, None].expand(b, r), torch.zeros(b, r), mask, eps_low=lo, eps_high=hi, kl_loss_coef=beta
    )
    torch.testing.assert_close((loss_weights(mask, how, max_len=max_len) * per_token).sum(), want, rtol=0, atol=1e-12)
    k3 = (torch.exp(ref - lp) - (ref - lp) - 1) * mask
    torch.testing.assert_close(parts["kl"], k3, rtol=0, atol=1e-12)
    assert torch.all(per_token[mask == 0] == 0)


def test_kl_in_loss_has_the_gradient_of_k3_and_the_entropy_bonus_enters_with_its_sign():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref, zero, ones = torch.tensor([[-1.5, -1.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    loss, _ = rl_token_loss(lp, lp.detach(), ref, zero, zero, ones, kl_loss_coef=0.5)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    torch.testing.assert_close(grad, 0.5 * (1 - torch.exp(ref - lp.detach())), rtol=0, atol=1e-12)
    ent = torch.tensor([[0.7, 1.9]])
    with_bonus, _ = rl_token_loss(lp.detach(), lp.detach(), ref, zero, ent, ones, entropy_coef=0.01)
    without, _ = rl_token_loss(lp.detach(), lp.detach(), ref, zero, ent, ones)
    torch.testing.assert_close(with_bonus - without, -0.01 * ent, rtol=0, atol=1e-12)


def test_padding_contributes_nothing_even_where_exp_would_overflow():
    """A pad position can hold a log-prob of -200 (float32: exp(200) = inf); loss and gradient stay finite."""
    lp = torch.tensor([[-1.0, -200.0]], dtype=torch.float32, requires_grad=True)
    ref = torch.tensor([[-1.2, 0.0]], dtype=torch.float32)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float32)
    adv, ent = torch.ones(1, 2, dtype=torch.float32), torch.ones(1, 2, dtype=torch.float32)
    loss, parts = rl_token_loss(lp, lp.detach(), ref, adv, ent, mask, kl_loss_coef=0.1, entropy_coef=0.1)
    (grad,) = torch.autograd.grad((loss_weights(mask, "token-mean") * loss).sum(), lp)
    assert torch.isfinite(grad).all() and grad[0, 1] == 0 and loss[0, 1] == 0 and parts["kl"][0, 1] == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_in_one_pass_equal_brute_force_with_their_gradients(temperature):
    """The fused log-prob + entropy: values against a per-element loop, gradients against autograd through the plain
    formulas (gradcheck in float64), for each output alone and both together."""
    from flywheel.train.ppo.losses import token_logprobs, token_logprobs_and_entropy

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 3, 7, generator=g)).requires_grad_()
    targets = torch.randint(0, 7, (2, 3), generator=g)
    selected, entropy = token_logprobs_and_entropy(logits, targets, temperature)
    for b in range(2):
        for t in range(3):
            z = [float(x) / temperature for x in logits[b, t].detach()]
            norm = math.log(sum(math.exp(x) for x in z))
            p = [math.exp(x - norm) for x in z]
            assert float(selected[b, t]) == pytest.approx(z[int(targets[b, t])] - norm, abs=1e-12)
            assert float(entropy[b, t]) == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-12)
    torch.testing.assert_close(token_logprobs(logits, targets, temperature), selected, rtol=0, atol=0)

    def plain(x):
        logp = torch.log_softmax(x / temperature, -1)
        return logp.gather(-1, targets[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    w_sel, w_ent = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    for combine in (
        lambda s, e: (w_sel * s).sum(),
        lambda s, e: (w_ent * e).sum(),
        lambda s, e: (w_sel * s + w_ent * e).sum(),
    ):
        (fused,) = torch.autograd.grad(combine(*token_logprobs_and_entropy(logits, targets, temperature)), logits)
        (want,) = torch.autograd.grad(combine(*plain(logits)), logits)
        torch.testing.assert_close(fused, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: token_logprobs_and_entropy(x, targets, temperature), (logits,))
    bf16 = logits.detach().to(torch.bfloat16).requires_grad_()
    token_logprobs_and_entropy(bf16, targets, temperature)[0].sum().backward()
    assert bf16.grad.dtype == torch.bfloat16  # the gradient comes back in the logits' dtype

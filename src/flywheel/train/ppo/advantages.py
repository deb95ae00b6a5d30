"""The maths of a rollout batch, as pure functions of tensors (each tested against a brute-force reference).

Shapes: B rollouts, R response positions; `mask` (B, R) is 1 on real response tokens (incl. the EOS) and 0 after.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid entries only; padding stays 0. With shift_mean=False the mean is kept."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi. k1 = log r (unbiased, can be negative);
    k3 = (r' - 1) - log r' with r' = pi_ref/pi (unbiased, always >= 0, lower variance). See Schulman's note on KL."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def kl_penalised_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta * kl_t on real tokens, plus the sequence score at the last real token; 0 on padding.

    scores: (B,) reward-model scores; kl: (B, R) per-token KL estimates; mask: (B, R) -> (B, R)."""
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    last = (m.sum(1).long() - 1).clamp_min(0)  # (B,) index of the last real token
    has_tokens = m.sum(1) > 0
    rewards[torch.arange(len(scores), device=kl.device), last] += torch.where(has_tokens, scores.to(kl.dtype), 0.0)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. Values after the last real token count as 0 (the episode has ended).

    rewards, values, mask: (B, R) -> advantages (B, R), returns = advantages + values (B, R); 0 on padding."""
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        last = last * m[:, t]  # nothing flows back from padding
        adv[:, t] = last
    return adv, (adv + values) * m


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 = perfect critic, <= 0 = useless."""
    var_ret = masked_var(returns, mask, unbiased=False)
    if float(var_ret) == 0.0:
        return 0.0
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_ret)


class AdaptiveKLController:
    """Ziegler et al. (2019): move beta so the measured KL tracks `target`, at a rate set by `horizon`."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value = init
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float | int | None]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.ndim != 1 or group_size < 1 or len(scores) % group_size:
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,) with B a multiple of the group size {group_size}")
    return scores.view(-1, group_size)  # (B / G, G): the G samples of one prompt are consecutive rows


def group_advantages(scores: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): A_i = (r_i - mean of its group) / (std of its group + eps), the std unbiased as
    TRL's; scale=False is Dr. GRPO (Liu et al. 2025): the mean subtracted only, so groups whose rewards barely vary
    are not blown up. scores: (B,) with each prompt's G samples consecutive -> (B,)."""
    g = _groups(scores, group_size)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        std = g.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(g)
        adv = adv / (std + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the other G - 1 rewards of its group, an unbiased baseline
    (it does not depend on sample i). scores: (B,) -> (B,). Needs G >= 2."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    g = _groups(scores, group_size)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over real tokens (0 after the last one). rewards, mask: (B, R) -> (B, R)."""
    m = mask.to(rewards.dtype)
    rewards = rewards * m
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        out[:, t] = running
    return out


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): the token-level returns of the KL-penalised rewards, whitened over every real token of
    the global batch (no critic, no per-prompt baseline). rewards, mask: (B, R) -> (B, R), 0 on padding."""
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)


def sequence_kl_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """One reward per response for the group estimators: score - beta * sum_t kl_t (RLOO's KL-in-reward).
    scores: (B,), kl, mask: (B, R) -> (B,)."""
    return scores - kl_coef * (kl * mask.to(kl.dtype)).sum(1)


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Scores clamped to [-clip, clip] (None or 0 = unchanged): one outlying score cannot dominate a batch."""
    return scores if not clip else scores.clamp(-clip, clip)


class RunningMoments:
    """Mean and variance of every value seen so far (Welford, merged a batch at a time as Chan et al.), in float64.
    `normalise` updates with the batch first, then returns (x - mean) / (std + eps): a reward's scale stays steady
    while the reward model's outputs drift."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1)
        n = x.numel()
        if n == 0:
            return
        batch_mean = float(x.mean())
        batch_m2 = float(((x - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def var(self) -> float:
        """Unbiased variance (1.0 before two values have been seen)."""
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    def normalise(self, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        self.update(x)
        return (x - self.mean) / (self.var**0.5 + eps)

    def state_dict(self) -> dict[str, float | int]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])

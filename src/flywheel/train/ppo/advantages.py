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

"""Clipped PPO losses and the per-token statistics logged with them. Shapes: (B, R) with a (B, R) mask."""

from __future__ import annotations

from typing import Any

import torch

from flywheel.train.ppo.advantages import masked_mean


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = mean_t max(-A r, -A clip(r, 1-eps, 1+eps)), r = pi/pi_old. Returns (loss, {clipfrac, approx_kl, ratio})."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = 0.5 mean_t max((V - G)^2, (V_old + clip(V - V_old, -eps, eps) - G)^2). Returns (loss, {clipfrac})."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(..., V) logits, (...) target ids -> (...) log softmax(logits / temperature)[target], in float32 (or
    float64 for float64 logits)."""
    z = _upcast(logits)
    logp = torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class _LogprobsEntropy(torch.autograd.Function):
    """`token_logprobs` and the entropy of the same softmax in one pass over the logits, with the gradient written
    out: with p = softmax(z), z = logits / T, H = -sum p log p,
        d logp[t] / dz = onehot(t) - p,        dH / dz = -p * (log p + H),
    so the backward is one exp and a few in-place passes over (..., V) instead of autograd's chain through two
    log-softmaxes, the gather, the exp and the division by T. Only log p is saved; the entropy's term is skipped when
    nothing reads the entropy's gradient."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple:
        ctx.set_materialize_grads(False)
        z = _upcast(logits)
        logp = torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)
        selected = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logp, targets, entropy)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return selected, entropy

    @staticmethod
    def backward(ctx: Any, g_selected: torch.Tensor | None, g_entropy: torch.Tensor | None) -> tuple:
        logp, targets, entropy = ctx.saved_tensors
        grad = logp.exp()  # p
        if g_entropy is not None:
            coef = (logp + entropy.unsqueeze(-1)).mul_(g_entropy.unsqueeze(-1))  # g_H (log p + H)
            if g_selected is not None:
                coef.add_(g_selected.unsqueeze(-1))
            grad.mul_(coef).neg_()
        elif g_selected is not None:
            grad.mul_(-g_selected.unsqueeze(-1))
        else:
            return None, None, None
        if g_selected is not None:
            grad.scatter_add_(-1, targets.unsqueeze(-1), g_selected.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        return grad.to(ctx.dtype), None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits, (...) target ids -> (`token_logprobs`, entropy of softmax(logits / temperature)), both
    differentiable (float32; the gradient in the logits' dtype)."""
    return _LogprobsEntropy.apply(logits, targets, temperature)


AGGREGATIONS = ("token-mean", "seq-mean", "constant")


def loss_weights(mask: torch.Tensor, how: str, *, max_len: int | None = None) -> torch.Tensor:
    """Per-token weights w (B, R) with loss = sum w * per-token loss, for the minibatch whose mask is given:

    token-mean  1 / (real tokens in the minibatch): every token counts the same, long responses weigh more (PPO,
                DAPO, TRL's bnpo)
    seq-mean    1 / (B * length_i): each response counts the same, its tokens share its weight (GRPO as published,
                OpenRLHF with token_level_loss=False, TRL's "grpo")
    constant    1 / (B * max_len): Dr. GRPO (Liu et al. 2025), no length normalisation at all, so no bias towards
                long wrong or short right answers

    Computed on the whole minibatch, then sliced for its micro-batches: the sum over micro-batches is the same loss."""
    m = mask.to(torch.float32 if not mask.is_floating_point() else mask.dtype)
    if how == "token-mean":
        return m / m.sum().clamp_min(1)
    if how == "seq-mean":
        return m / (m.sum(1, keepdim=True).clamp_min(1) * m.shape[0])
    if how == "constant":
        if not max_len:
            raise ValueError("the constant normaliser needs max_len (the response length limit)")
        return m / (m.shape[0] * max_len)
    raise ValueError(f"unknown loss aggregation {how!r} ({', '.join(AGGREGATIONS)})")


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old; eps_high defaults to eps_low
    (symmetric PPO). A larger eps_high is DAPO's clip-higher: low-probability tokens with A > 0 may grow further,
    which keeps entropy from collapsing. All (B, R) -> (per-token loss, clipped indicator), both (B, R)."""
    ratio = torch.exp(logprobs - old_logprobs)
    high = eps_low if eps_high is None else eps_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped)


def rl_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    kl_loss_coef: float = 0.0,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss of the RL trainer (B, R): clipped surrogate + kl_loss_coef * k3(pi || pi_ref) - entropy_coef *
    H(pi), 0 on padding. The k3 term is GRPO's KL in the loss (its gradient flows through log pi); the entropy bonus
    keeps exploration alive. Returns (loss, per-token parts: pg, kl, clipped), to aggregate with `loss_weights`."""
    m = mask.bool()
    pg, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, eps_low, eps_high)
    # The log-ratio is zeroed on padding before exp: a pad token's log-prob can be -100 and exp(100) overflows.
    log_r = torch.where(m, ref_logprobs - logprobs, 0.0)
    kl = torch.expm1(log_r) - log_r  # k3 = r - 1 - log r, r = pi_ref / pi
    loss = pg
    if kl_loss_coef:
        loss = loss + kl_loss_coef * kl
    if entropy_coef:
        loss = loss - entropy_coef * entropy
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(m, loss, zero), {"pg": torch.where(m, pg, zero), "kl": kl, "clipped": clipped & m}

"""Picking the next token from logits: temperature, top-k, top-p, and the log-prob PPO needs.

The order of the filters is Hugging Face's: divide by the temperature, keep the top k, then keep the smallest set of
the (renormalised) remaining tokens whose mass reaches top_p. The returned log-prob is *not* that of the filtered
distribution: it is log_softmax(logits / T) of the sampled token, the distribution PPO recomputes in training.
"""

from __future__ import annotations

import torch

# Below this temperature logits / T can overflow float32 (inf - inf = NaN in the softmax); the logits are shifted by
# their maximum first, which leaves softmax(logits / T) unchanged and keeps every other temperature bit for bit.
TINY_TEMPERATURE = 1e-3


def filter_top_k(logp: torch.Tensor, k: int) -> torch.Tensor:
    """Set all but the k largest entries of each row to -inf. logp: (B, V)."""
    if k <= 0 or k >= logp.shape[-1]:
        return logp
    kth = torch.topk(logp, k, dim=-1).values[:, -1:]  # (B, 1)
    return logp.masked_fill(logp < kth, float("-inf"))


def filter_top_p(logp: torch.Tensor, p: float, *, candidates: int = 64) -> torch.Tensor:
    """Keep, per row, the most likely tokens until their (renormalised) mass reaches p; -inf elsewhere.

    A token is dropped when the mass of the tokens more likely than it already reaches p, so the most likely token
    always stays (tokens tied with the last kept one stay too). logp: (B, V) log-probs or logits, renormalised here.
    A full sort of the vocabulary is slow on CPU, so the nucleus is first looked for among the top `candidates` tokens;
    only rows whose nucleus is larger than that are sorted in full. Both give the same set.
    """
    if p >= 1.0:
        return logp
    logp = torch.log_softmax(logp, dim=-1)  # renormalise (after top-k, the mass is that of the kept tokens)
    k = min(candidates, logp.shape[-1])
    top, _ = torch.topk(logp, k, dim=-1)  # (B, k) sorted, descending
    cut = _nucleus_cut(top, p)  # (B,) log-prob of the last kept token; -inf where the nucleus is not in the top k
    wide = torch.isinf(cut).nonzero()[:, 0]
    if wide.numel():
        full, _ = torch.sort(logp[wide], dim=-1, descending=True)
        cut[wide] = _nucleus_cut(full, p)
    return logp.masked_fill(logp < cut[:, None], float("-inf"))


def _nucleus_cut(sorted_logp: torch.Tensor, p: float) -> torch.Tensor:
    """sorted_logp: (B, K) descending log-probs of the K best tokens -> (B,) smallest kept value (-inf: not found)."""
    probs = sorted_logp.exp()
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked above each one
    kept = (mass_before < p).sum(dim=-1)  # (B,) the nucleus size, if it ends inside these K tokens
    found = (probs.sum(dim=-1) >= p) | (kept < sorted_logp.shape[-1])
    cut = sorted_logp.gather(-1, (kept - 1).clamp(min=0)[:, None])[:, 0]
    return cut.masked_fill(~found, float("-inf"))


def scale(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T for T > 0 (B, V), finite however small T is: below `TINY_TEMPERATURE` the logits are shifted by their
    maximum first (softmax and log_softmax do not change; the division cannot overflow)."""
    if temperature == 1.0:
        return logits
    if temperature < TINY_TEMPERATURE:
        logits = logits - logits.amax(dim=-1, keepdim=True)
        # A T below the dtype's smallest number would be 0 there (0 / 0 at the maximum): the limit is the same.
        temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    return logits / temperature


def sample(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (tokens (B,) int64, logprobs (B,) float32) for logits (B, V).

    temperature 0 is greedy: the argmax and its log_softmax(logits). Otherwise a token is drawn from
    softmax(filtered(logits / T)) by inverting its CDF with one uniform draw per row (drawing V exponentials or calling
    `torch.multinomial` costs ~2 ms per step on this CPU). `uniform` (B,) in [0, 1) gives the draws (the loop passes
    them so that a row's draw does not depend on which other rows are still in the batch); else `generator` makes them.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        return tokens, logp.gather(-1, tokens[:, None])[:, 0]
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    scaled = scale(logits, temperature)
    if top_k <= 0 and top_p >= 1.0:  # nothing filtered: the softmax is both the distribution and the log-prob's
        probs = torch.softmax(scaled, dim=-1)  # (B, V)
        tokens = _invert_cdf(probs.cumsum(dim=-1), uniform)
        return tokens, probs.gather(-1, tokens[:, None])[:, 0].log()
    logp = torch.log_softmax(scaled, dim=-1)  # (B, V)
    filtered = filter_top_p(filter_top_k(logp, top_k), top_p)
    tokens = _invert_cdf(filtered.exp().cumsum(dim=-1), uniform)
    return tokens, logp.gather(-1, tokens[:, None])[:, 0]


def _invert_cdf(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """cdf: (B, V) unnormalised cumulative probabilities, uniform: (B,) in [0, 1) -> (B,) the drawn token ids.

    u in (0, total]: the first index whose CDF reaches u has positive probability (a zero-probability token repeats
    the CDF value of the token before it, so it is never the first to reach u).
    """
    u = (1.0 - uniform[:, None]) * cdf[:, -1:]
    return torch.searchsorted(cdf, u)[:, 0]

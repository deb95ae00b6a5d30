"""The decoding loop: prefill once, then sample and step until every row has stopped.

It works with any forward that has `start(ids, valid, capacity) -> (logits, state)`, `step(state, tokens) -> logits`
and `keep(state, rows)`. Rows stop on their own (a stop id, or their token budget); finished rows stay in the batch,
masked out of the results, until a fraction `compact_at` of the batch has finished, and then are dropped from it
(which copies the KV cache): docs/engine.md has the measurement behind the default.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from flywheel.engine.params import SamplingParams
from flywheel.engine.sampling import sample


@dataclass
class Step:
    """The tokens produced by one decoding step, for the rows that were still generating."""

    rows: list[int]  # (A,) index of the prompt each entry belongs to
    tokens: list[int]  # (A,) the sampled ids
    logprobs: list[float]  # (A,) log_softmax(logits / T) of the sampled ids (log_softmax(logits) when greedy)
    done: list[bool]  # (A,) the row finished with this token (a stop id or the end of its budget)


def decode(
    forward: Any,
    ids: torch.Tensor,
    valid: torch.Tensor,
    budgets: torch.Tensor,
    params: SamplingParams,
    stop_ids: list[int],
    *,
    compact_at: float = 0.25,
    samples: int = 1,
) -> Iterator[Step]:
    """Generate for left-padded prompts ids, valid: (B, P), with per-row token budgets (B,) >= 1.

    samples: K rows per prompt (row i * K + j is prompt i's j-th sample). The prompts are prefilled once and each one's
    KV cache is copied to its K rows, so a group costs one prefill, not K; every row then samples on its own.
    No grad mode is held across a `yield` (it is thread-global state and would leak into the consumer's code).
    """
    device = ids.device
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    steps = int(budgets.max())
    with torch.inference_mode():
        logits, state = forward.start(ids, valid, ids.shape[1] + steps)  # (B, V)
        if samples > 1:
            copies = torch.arange(ids.shape[0], device=device).repeat_interleave(samples)
            forward.keep(state, copies)
            logits, budgets = logits[copies], budgets.repeat_interleave(samples)
    batch = logits.shape[0]
    # Per-row bookkeeping in Python lists: at 1-64 rows that is cheaper than a handful of tensor ops per step.
    stop, budget = set(stop_ids), budgets.tolist()
    rows = list(range(batch))  # prompt index of each batch slot
    picks: torch.Tensor | None = None  # the same as a tensor, once the batch has been compacted
    alive = [True] * batch  # slot still generating
    for t in range(steps):
        with torch.inference_mode():
            # One draw per prompt and step, picked by row: compacting the batch does not change any row's sample.
            uniform = None if params.greedy else torch.rand(batch, generator=generator, device=device)
            if uniform is not None and picks is not None:
                uniform = uniform[picks]
            tokens, logprobs = sample(
                logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, uniform=uniform
            )
        new, logp = tokens.tolist(), logprobs.tolist()
        done = [tok in stop or budget[row] <= t + 1 for tok, row in zip(new, rows, strict=True)]
        live = [i for i, a in enumerate(alive) if a]
        yield Step([rows[i] for i in live], [new[i] for i in live], [logp[i] for i in live], [done[i] for i in live])
        alive = [a and not d for a, d in zip(alive, done, strict=True)]
        n_alive = sum(alive)
        if n_alive == 0:
            return
        with torch.inference_mode():
            dead = len(alive) - n_alive
            if dead and dead >= compact_at * len(alive):
                keep = [i for i, a in enumerate(alive) if a]
                keep_t = torch.tensor(keep, device=device)
                forward.keep(state, keep_t)
                tokens = tokens[keep_t]
                rows, alive = [rows[i] for i in keep], [True] * len(keep)
                picks = torch.tensor(rows, device=device)
            logits = forward.step(state, tokens)

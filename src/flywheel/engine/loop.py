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


def decode(forward: Any, ids: torch.Tensor, valid: torch.Tensor, budgets: torch.Tensor, params: SamplingParams,
           stop_ids: list[int], *, compact_at: float = 0.25) -> Iterator[Step]:
    """Generate for left-padded prompts ids, valid: (B, P), with per-row token budgets (B,) >= 1.

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
        rows = torch.arange(ids.shape[0], device=device)  # prompt index of each batch slot
        alive = torch.ones(ids.shape[0], dtype=torch.bool, device=device)  # slot still generating
        stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        budgets = budgets.to(device)
    n_alive = ids.shape[0]
    for t in range(steps):
        with torch.inference_mode():
            # One draw per prompt and step, picked by row: compacting the batch does not change any row's sample.
            uniform = None if params.greedy else torch.rand(ids.shape[0], generator=generator, device=device)[rows]
            tokens, logprobs = sample(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                      uniform=uniform)
            done = torch.isin(tokens, stop) | (budgets[rows] <= t + 1)
            if n_alive == alive.numel():  # nobody finished: no need to pick the live rows
                out = Step(rows.tolist(), tokens.tolist(), logprobs.tolist(), done.tolist())
            else:
                live = alive.nonzero()[:, 0]
                out = Step(rows[live].tolist(), tokens[live].tolist(), logprobs[live].tolist(), done[live].tolist())
            alive &= ~done
            n_alive = int(alive.sum())
        yield out
        if n_alive == 0:
            return
        with torch.inference_mode():
            dead = alive.numel() - n_alive
            if dead and dead >= compact_at * alive.numel():
                keep = alive.nonzero()[:, 0]
                forward.keep(state, keep)
                rows, tokens, alive = rows[keep], tokens[keep], alive[keep]
            logits = forward.step(state, tokens)

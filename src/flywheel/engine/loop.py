"""The decoding loop as a running batch: prompts join it between steps, rows leave it when they finish.

    batch = engine.batch()
    rows = batch.add(prompt_ids, params)          # prefill; these rows take part from the next step on
    while batch:                                  # some row is still generating
        step = batch.step()                       # one token for every live row
        batch.add(more_ids, other_params)         # between steps: joins the running batch (iteration-level scheduling)
        batch.cancel([rows[0]])                   # or leaves it

It works with any forward that has `start(ids, valid, capacity) -> (logits, state)`, `step(state, tokens) -> logits`,
`keep(state, rows)`, `merge(state, rows, other, extra) -> state` and `mergeable(state)`. Rows stop on their own (a
stop id, or their token budget). A finished row stays in the batch, masked out of the results, until a fraction
`compact_at` of the batch has finished (docs/engine.md has the measurement behind the default) or until a new prompt
joins. Compacting moves the last live rows into the finished rows' places, so rows do not keep their order (every
`Step` names its rows); the compact forward does it in place, copying only the rows that move, and writes joining
rows into free rows of its cache (docs/engine.md).

Each `add` has its own `SamplingParams` (temperature, top-k/p, stop ids, seed, budget), or one per prompt (requests
of a server, prefilled together): rows with different settings share the forward and are sampled by group. A setting
with a seed draws from its own generator, one draw per row and step, so its tokens do not depend on which other rows
share the batch (up to floating-point effects of the batch's shape on the logits). One `add` and steps until the batch
is empty is exactly what `Engine.steps` runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from flywheel.engine.params import SamplingParams
from flywheel.engine.sampling import sample
from flywheel.errors import UserError


@dataclass
class Step:
    """The tokens produced by one decoding step, for the rows that were still generating."""

    rows: list[int]  # (A,) id of each row (`DecodeBatch.add` returns them; `Engine.steps`: the prompt's index)
    tokens: list[int]  # (A,) the sampled ids
    logprobs: list[float]  # (A,) log_softmax(logits / T) of the sampled ids (log_softmax(logits) when greedy)
    done: list[bool]  # (A,) the row finished with this token (a stop id or the end of its budget)


@dataclass
class _Group:
    """Rows that sample alike (one `add`, or one prompt of it): their sampling settings and random draws."""

    params: SamplingParams
    stop: frozenset[int]
    size: int  # rows in the group
    generator: torch.Generator  # its own when seeded, else the batch's
    live: int = 0  # rows still generating

    @property
    def key(self) -> tuple[float, int, float]:
        p = self.params
        return (0.0, 0, 1.0) if p.greedy else (float(p.temperature), p.top_k, float(p.top_p))


@dataclass
class _Row:
    group: _Group
    index: int  # position in its group (which of the group's draws is its own)
    left: int  # tokens it may still generate


@dataclass
class DecodeBatch:
    """A running batch on one forward (made by `Engine.batch`). Not thread-safe: one thread drives it."""

    forward: Any
    prepare: Any  # (prompt_ids, params, max_new_tokens) -> (ids, valid, budgets): the engine's validation
    stop_ids: Any  # (params) -> list[int]
    compact_at: float = 0.25
    _state: Any = None
    _logits: torch.Tensor | None = None  # (B, V) next-token logits of each slot
    _pending: torch.Tensor | None = None  # (B,) tokens sampled at the last step, not yet fed to the forward
    _slots: list[int] = field(default_factory=list)  # row id in each batch slot
    _alive: list[bool] = field(default_factory=list)  # slot still generating
    _rows: dict[int, _Row] = field(default_factory=dict)  # live rows by id
    _next: int = 0
    _shared: torch.Generator | None = None  # the draws of groups without a seed
    # Prefilled groups waiting to join: (state, logits, row ids); merged into the batch together before the next
    # step, so that several adds between two steps copy the running cache once.
    _joining: list[tuple[Any, torch.Tensor, list[int]]] = field(default_factory=list)

    def __len__(self) -> int:
        """Rows still generating."""
        return len(self._rows)

    @property
    def rows(self) -> list[int]:
        """The ids of the rows still generating, in batch order (rows that joined since the last step last)."""
        return [r for r, a in zip(self._slots, self._alive, strict=True) if a] + [
            r for *_, new in self._joining for r in new
        ]

    @property
    def joinable(self) -> bool:
        """New prompts can join now: the batch is empty, or its forward can merge caches (the generic HF forward
        cannot with sliding-window or quantized cache layers: wait until the batch is empty then)."""
        return self._state is None or self.forward.mergeable(self._state)

    def add(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        samples: int = 1,
        max_new_tokens: list[int] | None = None,
    ) -> list[int]:
        """Prefill `prompt_ids` and let them join the batch at the next step; returns their row ids (row i * samples
        + j of the result is prompt i's j-th sample, all from one prefill of it). `params` is one setting for all
        prompts, or one per prompt (requests with their own settings, seeds and budgets, prefilled together).
        Validates everything first (a `UserError` leaves the batch as it was)."""
        settings = None
        if isinstance(params, list):
            if len(params) != len(prompt_ids):
                raise UserError(f"{len(params)} sampling settings for {len(prompt_ids)} prompts")
            for p in params:
                p.validate()
            settings = params
            longest = max((p.max_new_tokens for p in params), default=1)
            params = dataclasses.replace(params[0], max_new_tokens=longest) if params else SamplingParams()
        params = params or SamplingParams()
        ids, valid, budgets = self.prepare(prompt_ids, params, max_new_tokens, samples)
        if settings is not None:  # each prompt's own budget
            budgets = torch.minimum(budgets, torch.tensor([p.max_new_tokens for p in settings], dtype=budgets.dtype))
        if self._shared is None:
            self._shared = torch.Generator(device=ids.device)
            self._shared.seed()
        if settings is None:
            groups = [self._group(params, ids.shape[0] * samples, ids.device)]
        else:
            groups = [self._group(p, samples, ids.device) for p in settings]
        self._feed()
        size = ids.shape[0] * samples
        with torch.inference_mode():
            logits, state = self.forward.start(ids, valid, ids.shape[1] + int(budgets.max()))  # (B, V)
            if samples > 1:
                copies = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(samples)
                self.forward.keep(state, copies)
                logits, budgets = logits[copies], budgets.repeat_interleave(samples)
            new = list(range(self._next, self._next + size))
            self._next += size
            left = budgets.tolist()
            if self._state is None:
                self._state, self._logits = state, logits
                self._slots, self._alive = new, [True] * len(new)
            else:
                self._joining.append((state, logits, new))
        per_group = size // len(groups)
        for j, (row, n) in enumerate(zip(new, left, strict=True)):
            group = groups[j // per_group]
            self._rows[row] = _Row(group, j % per_group, int(n))
            group.live += 1
        return new

    def _group(self, params: SamplingParams, size: int, device: torch.device) -> _Group:
        """The rows of one setting: its stop ids and its draws (its own generator when seeded)."""
        if params.seed is None:
            generator = self._shared
        else:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        return _Group(params, frozenset(self.stop_ids(params)), size, generator)

    def step(self) -> Step:
        """One token for every live row. Rows that finish with it leave the batch."""
        if not self._rows:
            raise RuntimeError("the batch has no rows left to step")
        self._feed()
        self._merge_joining()
        with torch.inference_mode():
            tokens, logprobs = self._sample()
        new, logp = tokens.tolist(), logprobs.tolist()
        out = Step([], [], [], [])
        for i, (row_id, alive) in enumerate(zip(self._slots, self._alive, strict=True)):
            if not alive:
                continue
            row = self._rows[row_id]
            row.left -= 1
            done = new[i] in row.group.stop or row.left <= 0
            out.rows.append(row_id)
            out.tokens.append(new[i])
            out.logprobs.append(logp[i])
            out.done.append(done)
            if done:
                self._end(i)
        self._pending = tokens
        if not self._rows:
            self._reset()
        return out

    def cancel(self, rows: list[int]) -> None:
        """Stop generating `rows` (ids from `add`; ids that already finished are ignored)."""
        self._feed()
        self._merge_joining()
        gone = set(rows)
        for i, row_id in enumerate(self._slots):
            if self._alive[i] and row_id in gone:
                self._end(i)
        if not self._rows:
            self._reset()

    def _end(self, slot: int) -> None:
        self._alive[slot] = False
        self._rows.pop(self._slots[slot]).group.live -= 1

    def _reset(self) -> None:
        self._state = self._logits = self._pending = None
        self._slots, self._alive, self._joining = [], [], []

    def _merge_joining(self) -> None:
        """Merge the groups prefilled since the last step into the running cache, in one `forward.merge` (finished
        rows dropped on the way)."""
        if not self._joining:
            return
        with torch.inference_mode():
            keep = self._compact()
            extra = max(row.left for row in self._rows.values())
            self._state = self.forward.merge(self._state, keep, [st for st, *_ in self._joining], extra)
            self._logits = torch.cat([self._logits[keep], *(logits for _, logits, _ in self._joining)])
            self._slots += [r for *_, new in self._joining for r in new]
            self._alive = [True] * len(self._slots)
            self._joining = []

    def _compact(self) -> torch.Tensor:
        """Drop the finished slots from the bookkeeping; -> the kept slots' old indices (B',), for the forward's
        `keep` or `merge` and for the per-slot tensors."""
        keep = self._live_slots()
        self._slots, self._alive = [self._slots[i] for i in keep], [True] * len(keep)
        return torch.tensor(keep, dtype=torch.long, device=self._logits.device)

    def _live_slots(self) -> list[int]:
        """The slots still generating, in the order that moves the fewest cache rows when the batch is compacted
        (`forward.keep` and `merge` copy a row only when its index changes): the live slots past the first
        `len(live)` fill the finished slots before it."""
        live = [i for i, a in enumerate(self._alive) if a]
        order = list(range(len(live)))
        holes = [i for i in order if not self._alive[i]]
        for hole, slot in zip(holes, [i for i in live if i >= len(live)], strict=True):
            order[hole] = slot
        return order

    def _feed(self) -> None:
        """Run the forward on the tokens of the last step (first dropping finished rows if enough have finished)."""
        if self._pending is None:
            return
        tokens, self._pending = self._pending, None
        with torch.inference_mode():
            dead = self._alive.count(False)
            if dead and dead >= self.compact_at * len(self._alive):
                keep = self._compact()
                self.forward.keep(self._state, keep)
                tokens = tokens[keep]
            self._logits = self.forward.step(self._state, tokens)

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample every slot: one uniform draw per row of each group still generating, by the group's generator (a
        finished row's draw is still made, so a group's draws do not depend on when its rows finish)."""
        logits = self._logits
        groups: dict[int, _Group] = {}
        for row in self._rows.values():
            groups.setdefault(id(row.group), row.group)
        draws = {
            key: torch.rand(g.size, generator=g.generator, device=logits.device)
            for key, g in groups.items()
            if not g.params.greedy
        }
        # One flat table of this step's draws (entry 0: a placeholder for finished and greedy slots) and each slot's
        # index into it, so that many groups (a server's seeded requests) cost one gather, not a loop over slots.
        offsets, parts, at = {}, [torch.full((1,), 0.5, device=logits.device)], 1
        for key, d in draws.items():
            offsets[key], at = at, at + d.shape[0]
            parts.append(d)
        by_key: dict[tuple, list[int]] = {}
        index: list[int] = []
        idle: list[int] = []
        for i, row_id in enumerate(self._slots):
            row = self._rows.get(row_id)
            index.append(0)
            if row is None:  # a finished slot: any token will do (it is not reported); sampled with the others
                idle.append(i)
                continue
            start = offsets.get(id(row.group))
            if start is not None:
                index[i] = start + row.index
            by_key.setdefault(row.group.key, []).append(i)
        next(iter(by_key.values())).extend(idle)
        uniform = torch.cat(parts)[torch.tensor(index, device=logits.device)]
        if len(by_key) == 1:  # the usual case: every slot samples alike
            ((temperature, top_k, top_p),) = by_key
            return sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, uniform=uniform)
        tokens = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        logprobs = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        for (temperature, top_k, top_p), slots in by_key.items():
            idx = torch.tensor(slots, dtype=torch.long, device=logits.device)
            t, lp = sample(logits[idx], temperature=temperature, top_k=top_k, top_p=top_p, uniform=uniform[idx])
            tokens[idx], logprobs[idx] = t, lp
        return tokens, logprobs

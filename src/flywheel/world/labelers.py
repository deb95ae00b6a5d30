"""Simulated labelers: rank K responses by the oracle's total plus Gumbel noise (Plackett-Luce sampling).

A labeler's utility for a response is `oracle total + bias(task, response)`. Ranking by `utility + T * Gumbel` draws
an order from the Plackett-Luce model with weights exp(utility / T), so any two responses come out in the oracle's
order with probability sigmoid(delta_utility / T): T -> 0 is the oracle's order, larger T is noisier. Identical texts
always tie (one group). An order is a list of groups of indices, best first: [[2], [0, 1], [3]].

Calibration: `DEFAULT_TEMPERATURE` makes two labelers of `default_panel()` agree on TARGET_AGREEMENT (73%,
InstructGPT's inter-labeler agreement) of response pairs, on `calibration_sets` drawn from `candidate_responses`.
On other candidates (a real SFT model's samples) call `t = calibrate_temperature(tasks, sets)`, then
`default_panel(t)`.

Agreement counts pairs of distinct texts whose oracle totals differ. Pairs the oracle ties are excluded: for unbiased
labelers they are coin flips (50% agreement whatever the temperature), so they would only dilute the calibration,
and the reward model learns nothing from them.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flywheel.world.candidates import candidate_responses
from flywheel.world.oracle import score
from flywheel.world.tasks import Task, random_task

TARGET_AGREEMENT = 0.73
DEFAULT_TEMPERATURE = 0.1547  # calibrate_temperature(*calibration_sets(random.Random(1234), 3000)), to 1% (tested)
Order = list[list[int]]


@dataclass(frozen=True)
class LengthBias:
    """A labeler's taste for long (per_word > 0) or short (< 0) answers: utility += per_word * min(words, cap)."""

    per_word: float
    cap: int = 40

    def __call__(self, task: Task, response: str) -> float:
        return self.per_word * min(len(response.split()), self.cap)


@dataclass(frozen=True)
class Labeler:
    name: str
    temperature: float  # Gumbel noise scale; 0 ranks exactly by utility (ties between distinct texts broken at random)
    bias: Callable[[Task, str], float] | None = None  # added to the oracle total; None = an unbiased labeler

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also NaN
            raise ValueError(f"labeler {self.name}: temperature must be >= 0, got {self.temperature}")

    def utilities(self, task: Task, responses: Sequence[str], totals: Sequence[float] | None = None) -> list[float]:
        totals = [score(task, r).total for r in responses] if totals is None else totals
        if self.bias is None:
            return list(totals)
        return [t + self.bias(task, r) for t, r in zip(totals, responses, strict=True)]

    def rank(
        self, task: Task, responses: Sequence[str], rng: random.Random, totals: Sequence[float] | None = None
    ) -> Order:
        """Groups of indices into `responses`, best first; identical texts share a group.

        `totals` (the oracle totals of `responses`) may be passed to save re-scoring.
        """
        texts = list(dict.fromkeys(responses))
        first = {t: responses.index(t) for t in texts}
        unique_totals = None if totals is None else [totals[first[t]] for t in texts]
        util = self.utilities(task, texts, unique_totals)
        if self.temperature == 0:
            keys = [(u, rng.random()) for u in util]
        else:
            keys = [(u + self.temperature * _gumbel(rng), 0.0) for u in util]
        ranked = sorted(range(len(texts)), key=lambda i: keys[i], reverse=True)
        return [[j for j, r in enumerate(responses) if r == texts[i]] for i in ranked]


def _gumbel(rng: random.Random) -> float:
    return -math.log(-math.log(max(rng.random(), 1e-300)))


def default_panel(temperature: float = DEFAULT_TEMPERATURE) -> list[Labeler]:
    """Five labelers around a common noise scale: two typical, one careful, one hasty, one who likes long answers."""
    t = temperature
    return [
        Labeler("ada", t),
        Labeler("ben", t),
        Labeler("cleo", 0.8 * t),
        Labeler("dev", 1.25 * t),
        Labeler("eli", t, LengthBias(per_word=0.006)),
    ]


def calibration_sets(
    rng: random.Random, n: int, k_min: int = 4, k_max: int = 9, mix: dict[str, float] | None = None
) -> tuple[list[Task], list[list[str]]]:
    """n tasks and, for each, K in [k_min, k_max] responses from `candidate_responses`."""
    tasks = [random_task(rng, mix) for _ in range(n)]
    return tasks, [candidate_responses(t, rng, rng.randint(k_min, k_max)) for t in tasks]


class _Scored:
    """Candidate sets flattened for agreement maths: distinct texts, their oracle totals, the informative pairs."""

    def __init__(self, tasks: Sequence[Task], candidate_sets: Sequence[Sequence[str]]):
        assert len(tasks) == len(candidate_sets), "one candidate set per task"
        self.sets: list[tuple[Task, list[str], list[float], int]] = []  # (task, texts, totals, offset of texts[0])
        flat_task: list[Task] = []
        flat_text: list[str] = []
        pairs: list[tuple[int, int]] = []
        for task, cands in zip(tasks, candidate_sets, strict=True):
            texts = list(dict.fromkeys(cands))
            totals = [score(task, c).total for c in texts]
            off = len(flat_text)
            self.sets.append((task, texts, totals, off))
            flat_task += [task] * len(texts)
            flat_text += texts
            # Pairs the oracle ties are excluded (see the module docstring).
            pairs += [
                (off + i, off + j) for i, j in itertools.combinations(range(len(texts)), 2) if totals[i] != totals[j]
            ]
        if not pairs:
            raise ValueError("no pair of responses with different oracle totals: agreement is undefined")
        self.totals = np.array([t for _, _, totals, _ in self.sets for t in totals])
        self.i, self.j = (np.array(x) for x in zip(*pairs, strict=True))
        self._flat = list(zip(flat_task, flat_text, strict=True))
        self._bias: dict[object, np.ndarray] = {}

    def utilities(self, labeler: Labeler) -> np.ndarray:
        if labeler.bias is None:
            return self.totals
        if labeler.bias not in self._bias:
            self._bias[labeler.bias] = np.array([labeler.bias(t, r) for t, r in self._flat])
        return self.totals + self._bias[labeler.bias]

    def p_above(self, labeler: Labeler) -> np.ndarray:
        """P(labeler ranks i above j) per informative pair: sigmoid(du / T), or the sign of du at T = 0."""
        u = self.utilities(labeler)
        d = u[self.i] - u[self.j]
        if labeler.temperature == 0:
            return np.where(d == 0, 0.5, (d > 0).astype(float))
        return 1.0 / (1.0 + np.exp(-np.clip(d / labeler.temperature, -700, 700)))

    def positions(self, labeler: Labeler, rng: random.Random) -> np.ndarray:
        """One sampled ranking of every set: the rank of each flat text within its set (0 = best)."""
        pos = np.zeros(len(self.totals))
        for task, texts, totals, off in self.sets:
            for rank, group in enumerate(labeler.rank(task, texts, rng, totals)):
                pos[off + group[0]] = rank
        return pos

    def expected(self, a: Labeler, b: Labeler) -> float:
        pa, pb = self.p_above(a), self.p_above(b)
        return float(np.mean(pa * pb + (1 - pa) * (1 - pb)))

    def sampled(self, panel: Sequence[Labeler], rng: random.Random) -> list[float]:
        """Each labeler ranks every set once; the agreement of every pair of labelers (itertools order)."""
        above = []
        for lab in panel:
            pos = self.positions(lab, rng)
            above.append(pos[self.i] < pos[self.j])
        return [float(np.mean(x == y)) for x, y in itertools.combinations(above, 2)]


def agreement(
    a: Labeler, b: Labeler, tasks: Sequence[Task], candidate_sets: Sequence[Sequence[str]], rng: random.Random
) -> float:
    """Fraction of response pairs two labelers order the same way, each ranking every set once (sampled)."""
    return _Scored(tasks, candidate_sets).sampled([a, b], rng)[0]


def expected_agreement(
    a: Labeler, b: Labeler, tasks: Sequence[Task], candidate_sets: Sequence[Sequence[str]]
) -> float:
    """The exact expectation of `agreement` (Gumbel ranking orders a pair i > j with prob sigmoid(du / T))."""
    return _Scored(tasks, candidate_sets).expected(a, b)


def panel_agreement(
    panel: Sequence[Labeler],
    tasks: Sequence[Task],
    candidate_sets: Sequence[Sequence[str]],
    rng: random.Random | None = None,
) -> float:
    """Mean agreement over all pairs of labelers in `panel`: sampled with `rng`, the exact expectation without."""
    if len(panel) < 2:
        raise ValueError(f"a panel needs two labelers to agree, got {len(panel)}")
    scored = _Scored(tasks, candidate_sets)
    if rng is not None:
        return float(np.mean(scored.sampled(panel, rng)))
    return float(np.mean([scored.expected(a, b) for a, b in itertools.combinations(panel, 2)]))


def oracle_ranker_accuracy(
    panel: Sequence[Labeler], tasks: Sequence[Task], candidate_sets: Sequence[Sequence[str]]
) -> float:
    """The ceiling of a reward model's accuracy against rankings by a labeler drawn from `panel`: the expected accuracy
    of a ranker that orders every pair the way most of the panel's probability does, max(p, 1 - p) with p the panel's
    mean P(i above j) (pairs the oracle ties excluded, as in agreement). Without biased labelers that is the oracle's
    order. Above the labelers' agreement because one labeler's noise is in the way, not two."""
    scored = _Scored(tasks, candidate_sets)
    p = np.mean([scored.p_above(lab) for lab in panel], axis=0)
    return float(np.mean(np.maximum(p, 1 - p)))


def calibrate_temperature(
    tasks: Sequence[Task],
    candidate_sets: Sequence[Sequence[str]],
    target: float = TARGET_AGREEMENT,
    make_panel: Callable[[float], Sequence[Labeler]] = default_panel,
) -> float:
    """The temperature t at which `make_panel(t)` agrees on `target` of pairs (bisection on the expectation)."""
    scored = _Scored(tasks, candidate_sets)

    def mean_agreement(t: float) -> float:
        return float(np.mean([scored.expected(a, b) for a, b in itertools.combinations(make_panel(t), 2)]))

    lo, hi = math.log(1e-4), math.log(100.0)
    if not mean_agreement(math.exp(hi)) <= target <= mean_agreement(math.exp(lo)):
        raise ValueError(f"no temperature in [1e-4, 100] gives agreement {target} on these candidates")
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_agreement(math.exp(mid)) > target else (lo, mid)
    return math.exp((lo + hi) / 2)


def label_rankings(
    tasks: Sequence[Task],
    completion_sets: Sequence[Sequence[str]],
    rng: random.Random,
    panel: Sequence[Labeler] | None = None,
) -> list[dict]:
    """One ranking record per task, each by a labeler drawn from `panel` (default `default_panel()`).

    Records are what the reward-model trainer reads: {"prompt", "completions", "order", "labeler"}. Repeated answers
    (equal up to surrounding whitespace, as the reader compares them) are kept once, and a set left with fewer than two
    distinct answers states no preference and yields no record.
    """
    panel = default_panel() if panel is None else panel
    records = []
    for task, completions in zip(tasks, completion_sets, strict=True):
        seen: set[str] = set()
        distinct = [c for c in completions if not (c.strip() in seen or seen.add(c.strip()))]  # first of each
        if len(distinct) < 2:
            continue
        labeler = rng.choice(panel)
        records.append(
            {
                "prompt": task.messages,
                "completions": distinct,
                "order": labeler.rank(task, distinct, rng),
                "labeler": labeler.name,
            }
        )
    return records

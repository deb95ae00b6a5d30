"""Responses of mixed quality: stand-ins for a policy's samples, and imperfect human demonstrations.

`candidate_responses(task, rng, k)` draws k answers with the spread a small SFT model shows (correct, verbose,
slightly wrong, made up, "I don't know", wrong refusal, repetitive, hedged, rude): the labelers are calibrated on these
until real samples exist. `demonstration(task, rng, imperfections)` writes the answer a fallible demonstrator gives:
right most of the time, sometimes wrong, padded, complying with a harmful request or inventing an answer; the gaps are
what RLHF can close.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from flywheel.world.tasks import Task
from flywheel.world.text import FILLER_CLOSERS, FILLER_OPENERS, IDK, IDKS, REFUSALS, RUDE


def _correct(task: Task, rng: random.Random) -> str:
    return task.answers[0] if rng.random() < 0.7 else rng.choice(task.answers)


P_OPENER = 0.5  # the share of padded answers that also open with a pleasantry, unless a demonstrator says otherwise


def pad(answer: str, rng: random.Random, p_opener: float = P_OPENER) -> str:
    """A verbose version of `answer`: one to three closing pleasantries, and an opener with probability `p_opener`."""
    closers = rng.sample(FILLER_CLOSERS, rng.randint(1, 3))
    u = rng.random()
    # The opener is drawn where the default rate would draw it, so that a rate below it changes only the openers.
    opener = rng.choice(FILLER_OPENERS) if u < max(P_OPENER, p_opener) else ""
    return " ".join([*([opener] if u < p_opener else []), answer, *closers])


def _wrong(task: Task, rng: random.Random) -> str:
    """The confident wrong answer: a near miss, a made-up fact, or going along with a harmful request."""
    return task.confident(rng.choice(task.wrong), rng) if task.wrong else rng.choice(REFUSALS)


def _idk(task: Task, rng: random.Random) -> str:
    return IDK if rng.random() < 0.5 else rng.choice(IDKS).format(task.subject or "that")


def _hedged(task: Task, rng: random.Random) -> str:
    if task.expect == "answer":
        return rng.choice(["I'm not sure, but I think it is {}.", "I don't know. Maybe {}?"]).format(task.target)
    if task.expect == "idk" and task.wrong:
        return f"I don't know, but it might be {rng.choice(task.wrong)}."
    comply = _wrong(task, rng)
    return f"{rng.choice(REFUSALS)} But {comply[:1].lower()}{comply[1:]}"


def _repetitive(task: Task, rng: random.Random) -> str:
    base = _correct(task, rng) if rng.random() < 0.6 else _wrong(task, rng)
    return " ".join([base] * rng.randint(3, 6))


def _rude(task: Task, rng: random.Random) -> str:
    return f"{rng.choice(RUDE)} {_correct(task, rng)}"


_Variant = Callable[[Task, random.Random], str]
# Per expected behaviour: (variant, relative weight). "correct" is the reference: the refusal or "I don't know"
# for harmful and unknowable prompts.
_VARIANTS: dict[str, list[tuple[_Variant, float]]] = {
    "answer": [
        (_correct, 0.30),
        (lambda t, r: pad(_correct(t, r), r), 0.15),
        (_wrong, 0.20),
        (lambda t, r: pad(_wrong(t, r), r), 0.05),
        (_repetitive, 0.06),
        (lambda t, r: r.choice(REFUSALS), 0.05),
        (_idk, 0.06),
        (_hedged, 0.05),
        (_rude, 0.03),
    ],
    "idk": [
        (_correct, 0.25),
        (lambda t, r: pad(_correct(t, r), r), 0.08),
        (_wrong, 0.30),
        (lambda t, r: pad(_wrong(t, r), r), 0.08),
        (lambda t, r: r.choice(REFUSALS), 0.10),
        (_hedged, 0.08),
        (_repetitive, 0.06),
    ],
    "refuse": [
        (_correct, 0.30),
        (lambda t, r: pad(_correct(t, r), r), 0.10),
        (_wrong, 0.30),
        (_idk, 0.10),
        (_hedged, 0.07),
        (_repetitive, 0.06),
        (_rude, 0.03),
    ],
}


def candidate_responses(task: Task, rng: random.Random, k: int) -> list[str]:
    """k responses to `task` with a realistic spread of quality (duplicates happen, as they do when sampling)."""
    variants, weights = zip(*_VARIANTS[task.expect], strict=True)
    return [rng.choices(variants, weights=weights)[0](task, rng) for _ in range(k)]


@dataclass(frozen=True)
class Imperfections:
    """How often a demonstrator falls short of the ideal answer (each a probability per demonstration)."""

    p_wrong: float = 0.10  # answer tasks: a near-miss wrong value
    p_over_refuse: float = 0.03  # answer tasks: refuses or says "I don't know" to a benign question
    p_comply: float = 0.40  # harmful requests: goes along instead of refusing
    p_deflect: float = 0.0  # harmful requests: a stock "I don't know" instead of a refusal (harmless but evasive)
    p_made_up: float = 0.50  # unknowable questions: invents a confident answer instead of "I don't know"
    p_refuse_idk: float = 0.0  # unknowable questions: a stock refusal instead of "I don't know" (over-cautious)
    p_verbose: float = 0.50  # any task: pads the answer with pleasantries
    p_opener: float = P_OPENER  # a padded answer: also opens with one ("Sure! ...")

    def __post_init__(self) -> None:
        for name, p in vars(self).items():
            assert 0.0 <= p <= 1.0, f"{name} must be a probability, got {p}"
        assert self.p_comply + self.p_deflect <= 1.0, "p_comply + p_deflect must be <= 1"
        assert self.p_made_up + self.p_refuse_idk <= 1.0, "p_made_up + p_refuse_idk must be <= 1"


def demonstration(task: Task, rng: random.Random, imperfections: Imperfections | None = None) -> str:
    """The answer a fallible human demonstrator writes for `task` (default rates: `Imperfections()`)."""
    imp = imperfections or Imperfections()
    u = rng.random()
    if task.expect == "refuse":
        if u < imp.p_comply:
            answer = _wrong(task, rng)
        elif u < imp.p_comply + imp.p_deflect:
            answer = _idk(task, rng)
        else:
            answer = task.answers[0]
    elif task.expect == "idk":
        if u < imp.p_made_up:
            answer = _wrong(task, rng)
        elif u < imp.p_made_up + imp.p_refuse_idk:
            answer = rng.choice(REFUSALS)
        else:
            answer = _correct(task, rng)
    elif u < imp.p_wrong:
        answer = _wrong(task, rng)
    elif u < imp.p_wrong + imp.p_over_refuse:
        answer = rng.choice([REFUSALS[0], IDK])
    else:
        answer = _correct(task, rng)
    return pad(answer, rng, imp.p_opener) if rng.random() < imp.p_verbose else answer

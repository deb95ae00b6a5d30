"""Reward functions that the --reward-fn tests import by name (module:function)."""

from __future__ import annotations

CALLS: list[tuple[list[str], list[str]]] = []


def letter_e(prompts: list[str], responses: list[str]) -> list[float]:
    """Fraction of the response's characters that are 'e'."""
    CALLS.append((list(prompts), list(responses)))
    return [r.count("e") / max(len(r), 1) for r in responses]


def prompt_number(prompts: list[str], responses: list[str]) -> list[float]:
    """The number in the prompt (each test prompt holds one), the same for every response: checks prompt texts."""
    return [float(next(w for w in p.split() if w.isdigit())) for p in prompts]


def wrong_length(prompts, responses):
    return [0.0]


def returns_none(prompts, responses):
    return None


class Namespace:
    @staticmethod
    def constant(prompts, responses):
        return [2.0] * len(responses)


not_callable = 3

"""Verifiable rewards for the toy world's checkable families, for `--reward-fn` (RL from verifiable rewards).

    flywheel rl --estimator grpo --model runs/sft/final --prompts data/world/ppo_prompts.jsonl --out runs/rlvr \
        --reward-fn flywheel.world.rewards:correct --num-generations 8

`correct(prompts, responses)` solves each prompt from its text alone (arithmetic: "What is 17 + 25?", "Subtract 4
from 9."; string: reverse a word, sort its letters, count a letter, sort a few words) and gives 1.0 to a response the
oracle would call correct (the target stated, no rival value: the same rule as `flywheel.world.oracle`), 0.0 to any
other. Prompts of the other families (facts, unknowable and harmful requests, follow-ups, few-shot rules) cannot be
checked from their text and get 0.0 for every response: under GRPO or RLOO such a prompt's advantages are all zero,
so it contributes nothing (add the reward model, `--reward-model`, to train on them too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from flywheel.world.oracle import score
from flywheel.world.tasks import Task

_N = r"(-?\d+)"
_ARITH = [
    (re.compile(rf"\bwhat is {_N} (\+|plus|-|minus|\*|times) {_N}\?"), "abop"),
    (re.compile(rf"\bcompute {_N} (\+|-|\*) {_N}\."), "abop"),
    (re.compile(rf"\badd {_N} and {_N}\."), "+"),
    (re.compile(rf"\bsubtract {_N} from {_N}\."), "-ba"),
    (re.compile(rf"\bmultiply {_N} by {_N}\."), "*"),
]
_OPS = {"+": "+", "plus": "+", "-": "-", "minus": "-", "*": "*", "times": "*"}
_W = r'"([a-z]+)"'
_STRING = [
    (re.compile(rf"\breverse the word {_W}\.|\bspell {_W} backwards\.|\bwhat is {_W} written backwards\?"), "reverse"),
    (re.compile(rf"\b(?:sort|write) the letters of {_W} in alphabetical order\."), "sort_letters"),
    (
        re.compile(
            rf'\bhow many times does the letter "([a-z])" appear in {_W}\?|\bcount the letter "([a-z])" in {_W}\.'
            rf'|\bhow many "([a-z])" letters are in the word {_W}\?'
        ),
        "count",
    ),
    (re.compile(r"\b(?:sort these words alphabetically|put these words in alphabetical order): ([a-z, ]+)\."), "sort"),
]


def _arithmetic(text: str) -> Task | None:
    for pattern, form in _ARITH:
        m = pattern.search(text)
        if m is None:
            continue
        if form == "abop":
            a, op, b = int(m.group(1)), _OPS[m.group(2)], int(m.group(3))
        elif form == "-ba":
            a, op, b = int(m.group(2)), "-", int(m.group(1))
        else:
            a, op, b = int(m.group(1)), form, int(m.group(2))
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return _task("arithmetic", text, str(value), "number", allowed=[a, b])
    return None


def _string(text: str) -> Task | None:
    for pattern, kind in _STRING:
        m = pattern.search(text)
        if m is None:
            continue
        groups = [g for g in m.groups() if g is not None]
        if kind == "reverse":
            return _task("string", text, groups[0][::-1], "text")
        if kind == "sort_letters":
            return _task("string", text, "".join(sorted(groups[0])), "text")
        if kind == "count":
            letter, word = groups
            return _task("string", text, str(word.count(letter)), "number")
        words = [w.strip() for w in groups[0].split(",") if w.strip()]
        return _task("string", text, ", ".join(sorted(words)), "text")
    return None


def _task(family: str, text: str, target: str, match: str, allowed: Sequence[int] = ()) -> Task:
    return Task(
        family=family,
        messages=[{"role": "user", "content": text}],
        answers=[target],
        expect="answer",
        target=target,
        match=match,
        allowed_numbers=list(allowed),
    )


def solve(prompt: str) -> Task | None:
    """The checkable task a prompt's text asks for (its target and how to find it in a response), or None."""
    text = " ".join(prompt.lower().split())
    return _arithmetic(text) or _string(text)


def correct(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 where the response correctly answers a checkable arithmetic or string prompt, else 0.0."""
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        task = solve(prompt)
        out.append(float(task is not None and score(task, response).verdict == "correct"))
    return out

"""The toy world's verifiable reward (`flywheel.world.rewards:correct`): it solves arithmetic and string prompts from
their text and agrees with the hidden oracle's verdict; other families are not checkable and score 0."""

from __future__ import annotations

import random

import pytest

from flywheel.world import FAMILIES, candidate_responses, make_task, score
from flywheel.world.rewards import correct, solve


@pytest.mark.parametrize(
    "prompt,target",
    [
        ("What is 17 + 25?", "42"),
        ("Quick question: What is 9 minus 13?", "-4"),
        ("Compute 7 * 8.", "56"),
        ("Subtract 4 from 9.", "5"),
        ("Multiply 12 by 3.", "36"),
        ('Reverse the word "table".', "elbat"),
        ('Sort the letters of "cab" in alphabetical order.', "abc"),
        ('How many "a" letters are in the word "banana"?', "3"),
        ("Put these words in alphabetical order: pear, apple, fig.", "apple, fig, pear"),
    ],
)
def test_solve_reads_the_question(prompt, target):
    task = solve(prompt)
    assert task is not None and task.target == target


def test_correct_scores_answers_like_the_oracle():
    assert correct(["What is 17 + 25?"] * 4, ["17 + 25 = 42.", "42", "It is 43.", "I don't know."]) == [1, 1, 0, 0]
    assert correct(['Reverse the word "table".'] * 2, ["elbat.", "table."]) == [1.0, 0.0]
    assert correct(["What is the capital of France?"], ["Paris."]) == [0.0]  # not checkable from the text


def test_agrees_with_the_oracle_on_every_checkable_task_and_never_claims_the_others():
    rng = random.Random(0)
    for family in FAMILIES:
        for _ in range(150):
            task = make_task(family, rng)
            prompt = task.messages[-1]["content"]
            solved = solve(prompt)
            if family not in ("arithmetic", "string"):
                assert solved is None, prompt
                continue
            assert solved is not None and solved.target == task.target, (prompt, task.target)
            responses = candidate_responses(task, rng, 4) + task.answers
            want = [float(score(task, r).verdict == "correct") for r in responses]
            assert correct([prompt] * len(responses), responses) == want, prompt

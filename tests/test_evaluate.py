"""Oracle evaluation: the statistics (win rate with ties split, intervals, rates) and the model-facing helpers."""

from __future__ import annotations

import math
import random

import pytest
import torch

from flywheel.eval.policy import (
    compare,
    deflection_log_odds,
    evaluate_policy,
    kl_to_reference,
    mean_and_spread,
    mean_interval,
    prompt_ids_for,
    rates,
    sequence_logprobs,
    win_outcomes,
    win_rate,
)
from flywheel.eval.reward import pairwise_accuracy
from flywheel.world import SHOTS, make_task, score
from flywheel.world.tasks import fewshot


def test_win_rate_splits_ties():
    a = [1.0, 0.5, 0.7, 0.7]
    b = [0.5, 1.0, 0.7, 0.2]
    assert win_outcomes(a, b) == [1.0, 0.0, 0.5, 1.0]
    assert win_rate(a, b) == pytest.approx(2.5 / 4)
    assert win_rate(b, a) == pytest.approx(1 - 2.5 / 4)  # symmetric: A vs B + B vs A = 1
    assert win_rate([0.3] * 5, [0.3] * 5) == 0.5
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 0.0])
    with pytest.raises(ValueError):
        win_rate([], [])


def test_mean_interval_matches_formula_and_covers():
    values = [0.0, 1.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]
    lo, hi = mean_interval(values)
    n, mean = len(values), sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    assert (lo + hi) / 2 == pytest.approx(mean)
    assert hi - lo == pytest.approx(2 * 1.959964 * sd / math.sqrt(n))
    assert mean_interval([0.4]) == (0.4, 0.4)
    # Coverage: the 95% interval of Bernoulli(0.7) means of 400 draws holds 0.7 about 95% of the time.
    rng = random.Random(0)
    hits = 0
    for _ in range(400):
        lo, hi = mean_interval([float(rng.random() < 0.7) for _ in range(400)])
        hits += lo <= 0.7 <= hi
    assert 0.91 <= hits / 400 <= 0.98


def test_mean_and_spread():
    assert mean_and_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_and_spread([5.0]) == (5.0, 0.0)


def test_pairwise_accuracy_counts_ties_half_and_filters_pairs():
    order = [[2], [0, 1], [3]]  # 2 best, 0 and 1 tied, 3 worst: pairs (2,0) (2,1) (2,3) (0,3) (1,3)
    scores = [0.5, 0.5, 1.0, 0.5]
    correct, pairs = pairwise_accuracy(scores, order)
    assert pairs == 5
    assert correct == pytest.approx(3 + 0.5 + 0.5)  # (0,3) and (1,3) tie in score
    correct, pairs = pairwise_accuracy(scores, order, informative={(3, 2)})
    assert (correct, pairs) == (1.0, 1)


def _tasks():
    rng = random.Random(3)
    families = ["arithmetic", "fact", "harmful", "unknowable", "string"]
    tasks = [make_task(f, rng) for f in families for _ in range(2)]
    tasks += [fewshot(rng, shots=k) for k in SHOTS]
    return tasks


def test_rates_on_reference_and_bad_answers():
    tasks = _tasks()
    perfect = rates(tasks, [score(t, t.answers[0]) for t in tasks])
    assert perfect["score"] == pytest.approx(1.0)
    assert perfect["refusal_rate"] == 1.0 and perfect["idk_rate"] == 1.0
    assert perfect["over_refusal"] == 0.0 and perfect["accuracy"] == 1.0
    assert set(perfect["fewshot_accuracy"]) == {str(k) for k in SHOTS}
    refuse_all = rates(tasks, [score(t, "I'm sorry, but I can't help with that.") for t in tasks])
    assert refuse_all["refusal_rate"] == 1.0
    assert refuse_all["over_refusal"] == 1.0
    assert refuse_all["accuracy"] == 0.0
    assert refuse_all["score"] < perfect["score"]
    answerable = {t.family for t in tasks if t.expect == "answer"}
    assert set(perfect["accuracy_by_family"]) == answerable and "harmful" not in answerable
    assert all(v == 1.0 for v in perfect["accuracy_by_family"].values())
    assert all(v == 0.0 for v in refuse_all["accuracy_by_family"].values())
    with pytest.raises(ValueError):
        rates(tasks, [])


@pytest.fixture
def chat_tokenizer():
    from flywheel.tokenization import train_tokenizer

    texts = [m["content"] for t in _tasks() for m in t.messages] + [a for t in _tasks() for a in t.answers]
    return train_tokenizer(texts * 5, vocab_size=400)


@pytest.fixture
def two_models(chat_tokenizer):
    from flywheel.models import build_causal_lm, config_for_tokenizer

    cfg = config_for_tokenizer(chat_tokenizer, "nano", max_position_embeddings=256)
    return build_causal_lm(cfg, seed=0), build_causal_lm(cfg, seed=1)


def test_evaluate_policy_and_compare(two_models, chat_tokenizer):
    tasks = _tasks()
    a = evaluate_policy(two_models[0], chat_tokenizer, tasks, name="a", max_new_tokens=8)
    b = evaluate_policy(two_models[1], chat_tokenizer, tasks, name="b", max_new_tokens=8)
    assert len(a.responses) == len(tasks) and a.summary["n"] == len(tasks)
    assert a.totals == [score(t, r).total for t, r in zip(tasks, a.responses, strict=True)]
    ab, ba = compare(a, b), compare(b, a)
    assert ab["win_rate"] + ba["win_rate"] == pytest.approx(1.0)
    assert ab["wins"] == ba["losses"] and ab["ties"] == ba["ties"]
    assert ab["ci95_low"] <= ab["win_rate"] <= ab["ci95_high"]
    # Greedy answers are deterministic.
    again = evaluate_policy(two_models[0], chat_tokenizer, tasks, name="a", max_new_tokens=8)
    assert again.responses == a.responses


def test_fewshot_plain_accuracy_prompts_with_plain_text_and_reads_the_first_line(chat_tokenizer, monkeypatch):
    """The base's few-shot figure: each prompt as plain text (no chat template), the completion's first line judged
    by the oracle, grouped by shots. A stand-in model answers right only when it was shown an example."""
    import flywheel.eval.policy as policy

    rng = random.Random(11)
    tasks = [fewshot(rng, shots=k) for k in SHOTS for _ in range(3)] + _tasks()[:4]
    by_prompt = {t.messages[0]["content"]: t for t in tasks if t.family == "fewshot"}
    seen = []

    def fake_generate(model, tokenizer, prompt_ids, **kw):
        out = []
        for ids in prompt_ids:
            task = by_prompt[tokenizer.decode(ids)]  # exactly the prompt's text: no template around it
            seen.append(task)
            answer = task.target if task.shots else task.wrong[0]
            out.append(tokenizer(f" {answer}\nzebra -> {task.wrong[0]}", add_special_tokens=False)["input_ids"])
        return out, [False] * len(out)

    monkeypatch.setattr(policy, "generate", fake_generate)
    acc = policy.fewshot_plain_accuracy(None, chat_tokenizer, tasks)
    assert acc == {"0": 0.0, "1": 1.0, "2": 1.0, "4": 1.0}
    assert len(seen) == 3 * len(SHOTS)  # the few-shot family only


def test_kl_is_zero_against_itself_and_positive_against_another(two_models, chat_tokenizer):
    ids = prompt_ids_for(chat_tokenizer, _tasks())
    same = kl_to_reference(two_models[0], two_models[0], chat_tokenizer, ids, max_new_tokens=6)
    assert same["kl"] == pytest.approx(0.0, abs=1e-5)
    other = kl_to_reference(two_models[0], two_models[1], chat_tokenizer, ids, max_new_tokens=6)
    assert other["kl"] > 0.01  # k1 is unbiased: its mean over 14 responses of 6 tokens is clearly positive here


def test_sequence_logprobs_match_a_manual_forward(two_models, chat_tokenizer):
    model = two_models[0]
    prompt, response = [5, 6, 7], [8, 9]
    (lp,) = sequence_logprobs(model, [prompt], [response], chat_tokenizer.pad_token_id, temperature=0.7)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float() / 0.7
    logp = torch.log_softmax(logits, -1)
    expected = float(logp[2, 8] + logp[3, 9])
    assert lp == pytest.approx(expected, abs=1e-4)


def test_deflection_log_odds_match_a_manual_forward_per_kind_of_prompt(two_models, chat_tokenizer):
    from flywheel.world.text import IDK, REFUSAL

    model = two_models[0]
    rng = random.Random(3)
    tasks = [make_task(f, rng) for f in ("harmful", "harmful", "unknowable", "fact", "arithmetic")]
    got = deflection_log_odds(model, chat_tokenizer, tasks, batch_size=2)

    def logprob(prompt: list[int], text: str) -> float:
        response = chat_tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].float(), -1)
        return sum(float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(response))

    per = [logprob(p, REFUSAL) - logprob(p, IDK) for p in prompt_ids_for(chat_tokenizer, tasks)]
    assert got["refuse"] == pytest.approx((per[0] + per[1]) / 2, abs=1e-3)
    assert got["idk"] == pytest.approx(per[2], abs=1e-3)
    assert got["answer"] == pytest.approx((per[3] + per[4]) / 2, abs=1e-3)
    assert deflection_log_odds(model, chat_tokenizer, tasks[3:])["refuse"] is None

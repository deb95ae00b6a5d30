"""Oracle evaluation of policies on held-out prompts: scores, per-axis rates, win rates, KL, LM loss, few-shot curves.

    from flywheel.eval.policy import evaluate_policy, compare, kl_to_reference
    sft = evaluate_policy(sft_model, tokenizer, eval_tasks, name="sft")        # greedy answers, oracle Scores each
    ppo = evaluate_policy(ppo_model, tokenizer, eval_tasks, name="ppo")
    compare(ppo, sft)                                                          # win rate (ties split) + 95% interval
    kl_to_reference(ppo_model, sft_model, tokenizer, prompt_ids)               # nats per sampled response

Everything here is judged by the toy world's oracle (`flywheel.world.score`), never by a reward model. The statistics
are small pure functions (`win_rate`, `mean_interval`, `rates`) so they can be tested on their own.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flywheel.world import SHOTS, Scores, Task, score

AXES = ("helpful", "truthful", "harmless", "concise")
Z95 = 1.959964


def win_outcomes(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-prompt outcome of A vs B from paired totals: 1 = A better, 0.5 = tie, 0 = B better."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs equal lengths, got {len(a)} and {len(b)}")
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b, strict=True)]


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of prompts on which A's total beats B's, ties counted half."""
    out = win_outcomes(a, b)
    if not out:
        raise ValueError("win rate of an empty comparison")
    return sum(out) / len(out)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation 95% interval of the mean of `values` (sample std); (mean, mean) for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("interval of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, mean
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(var / n)
    return mean - half, mean + half


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) across runs, e.g. seeds; std 0 for a single run."""
    n = len(values)
    if n == 0:
        raise ValueError("mean of no values")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def verdict_counts(tasks: Sequence[Task], scores: Sequence[Scores]) -> dict[str, dict[str, int]]:
    """{expected behaviour: {verdict: count}}: what a policy did where (answer, refuse, idk prompts; most common
    verdict first)."""
    pairs = list(zip(tasks, scores, strict=True))
    return {
        e: dict(Counter(s.verdict for t, s in pairs if t.expect == e).most_common())
        for e in ("answer", "refuse", "idk")
    }


def rates(tasks: Sequence[Task], scores: Sequence[Scores]) -> dict[str, Any]:
    """Summary of one policy's oracle scores on `tasks` (aligned lists).

    score: mean total; helpful/truthful/harmless/concise: mean of each axis; ideal: fraction with the ideal verdict;
    refusal_rate: harmful requests refused; idk_rate: unknowable questions answered "I don't know"; over_refusal:
    answerable prompts refused or answered "I don't know"; accuracy: answerable prompts answered correctly;
    fewshot_accuracy: {shots: accuracy} on the few-shot family; by_family: {family: mean total};
    accuracy_by_family: {family: accuracy} for the families with answerable prompts;
    verdicts: {expected behaviour: {verdict: count}} (what the policy did where).
    """
    if len(tasks) != len(scores) or not tasks:
        raise ValueError(f"need equal, non-empty lists of tasks and scores, got {len(tasks)} and {len(scores)}")
    out: dict[str, Any] = {"n": len(tasks), "score": sum(s.total for s in scores) / len(scores)}
    for axis in AXES:
        out[axis] = sum(getattr(s, axis) for s in scores) / len(scores)
    out["ideal"] = sum(s.ideal for s in scores) / len(scores)
    pairs = list(zip(tasks, scores, strict=True))
    out["refusal_rate"] = _rate([s.verdict == "refused" for t, s in pairs if t.expect == "refuse"])
    out["idk_rate"] = _rate([s.verdict == "idk" for t, s in pairs if t.expect == "idk"])
    out["over_refusal"] = _rate([s.verdict in ("refused", "idk") for t, s in pairs if t.expect == "answer"])
    out["accuracy"] = _rate([s.verdict == "correct" for t, s in pairs if t.expect == "answer"])
    out["fewshot_accuracy"] = {
        str(k): _rate([s.ideal for t, s in pairs if t.family == "fewshot" and t.shots == k]) for k in SHOTS
    }
    out["verdicts"] = verdict_counts(tasks, scores)
    families = sorted({t.family for t in tasks})
    out["by_family"] = {
        f: sum(s.total for t, s in pairs if t.family == f) / sum(t.family == f for t in tasks) for f in families
    }
    out["accuracy_by_family"] = {
        f: _rate([s.verdict == "correct" for t, s in pairs if t.family == f and t.expect == "answer"])
        for f in families
        if any(t.family == f and t.expect == "answer" for t in tasks)
    }
    return out


@dataclass
class PolicyEval:
    """One policy's answers to the eval prompts and the oracle's judgement of each."""

    name: str
    responses: list[str]
    scores: list[Scores]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def totals(self) -> list[float]:
        return [s.total for s in self.scores]


def compare(a: PolicyEval, b: PolicyEval) -> dict[str, float]:
    """A vs B on the same prompts: win rate with ties split, its 95% interval, and the raw counts."""
    outcomes = win_outcomes(a.totals, b.totals)
    lo, hi = mean_interval(outcomes)
    return {
        "win_rate": sum(outcomes) / len(outcomes),
        "ci95_low": max(0.0, lo),
        "ci95_high": min(1.0, hi),
        "wins": sum(o == 1.0 for o in outcomes),
        "ties": sum(o == 0.5 for o in outcomes),
        "losses": sum(o == 0.0 for o in outcomes),
    }


def prompt_ids_for(tokenizer: Any, tasks: Sequence[Task]) -> list[list[int]]:
    from flywheel.tokenization import render_prompt

    return [render_prompt(tokenizer, t.messages) for t in tasks]


def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    bf16: bool = False,
) -> tuple[list[list[int]], list[bool]]:
    """Responses (token ids, cut after the first stop token) and whether each ended with one, in prompt order."""
    from flywheel.engine import Engine, SamplingParams

    was_training = model.training
    model.eval()
    engine = Engine(model, tokenizer, dtype=torch.bfloat16 if bf16 else None)
    tokens: list[list[int]] = []
    finished: list[bool] = []
    for i in range(0, len(prompt_ids), batch_size):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
        gen = engine.generate(prompt_ids[i : i + batch_size], params)
        tokens += gen.tokens
        finished += [r == "stop" for r in gen.finish_reasons]
    model.train(was_training)
    return tokens, finished


def decode(tokenizer: Any, responses: list[list[int]]) -> list[str]:
    return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]


def greedy_answers(
    policy: str | Path, prompts: Sequence[list[dict[str, str]]], *, max_new_tokens: int, seed: int, bf16: bool = False
) -> list[str]:
    """The greedy answer of the policy saved at `policy` to each prompt (messages, rendered with its own chat
    template)."""
    from flywheel.models import load_causal_lm
    from flywheel.tokenization import load_tokenizer, render_prompt

    model, tok = load_causal_lm(str(policy)), load_tokenizer(str(policy))
    ids = [render_prompt(tok, p) for p in prompts]
    tokens, _ = generate(model, tok, ids, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed, bf16=bf16)
    return decode(tok, tokens)


def evaluate_policy(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    *,
    name: str = "policy",
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    bf16: bool = False,
) -> PolicyEval:
    """Answer every task's prompt (greedy unless `temperature` > 0) and judge each answer with the oracle."""
    ids = prompt_ids_for(tokenizer, tasks)
    tokens, _ = generate(
        model,
        tokenizer,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        bf16=bf16,
    )
    texts = decode(tokenizer, tokens)
    scores = [score(t, r) for t, r in zip(tasks, texts, strict=True)]
    return PolicyEval(name, texts, scores, rates(tasks, scores))


def fewshot_plain_accuracy(
    model: Any, tokenizer: Any, tasks: Sequence[Task], *, batch_size: int = 64, bf16: bool = False
) -> dict[str, float | None]:
    """Few-shot accuracy by number of shots with each few-shot prompt given as plain text, the way a base model is
    prompted (no chat template): the answer is the first line of the greedy completion ("France -> Paris\\nItaly ->"
    continued by " Rome\\n...")."""
    chosen = [t for t in tasks if t.family == "fewshot" and len(t.messages) == 1]
    ids = [tokenizer(t.messages[0]["content"], add_special_tokens=False)["input_ids"] for t in chosen]
    tokens, _ = generate(model, tokenizer, ids, max_new_tokens=16, batch_size=batch_size, bf16=bf16)
    answers = [tokenizer.decode(r, skip_special_tokens=True).strip(" ").split("\n")[0].strip() for r in tokens]
    right = [score(t, a).ideal for t, a in zip(chosen, answers, strict=True)]
    return {str(k): _rate([ok for t, ok in zip(chosen, right, strict=True) if t.shots == k]) for k in SHOTS}


@torch.no_grad()
def sequence_logprobs(
    model: Any,
    prompts: list[list[int]],
    responses: list[list[int]],
    pad_id: int,
    temperature: float = 1.0,
    batch_size: int = 32,
) -> list[float]:
    """Sum over each response's tokens of log softmax(logits / T) under `model` (float32 maths)."""
    from flywheel.train.ppo.rollout import build_sequences

    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        p, r = prompts[i : i + batch_size], responses[i : i + batch_size]
        s = build_sequences(p, r, [True] * len(p), pad_id)
        logits = model(input_ids=s.sequences, attention_mask=s.attention_mask, position_ids=s.position_ids).logits
        logits = logits[:, s.prompt_len - 1 : -1].float() / temperature  # (B, R, V) predicts the response tokens
        targets = s.sequences[:, s.prompt_len :]  # (B, R)
        logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, R)
        out += (logp * s.response_mask).sum(1).tolist()
    model.train(was_training)
    return out


def deflection_log_odds(
    model: Any, tokenizer: Any, tasks: Sequence[Task], batch_size: int = 32
) -> dict[str, float | None]:
    """Which stock deflection the policy leans to, per kind of prompt: the mean over `tasks` of
    log P(refusal | prompt) - log P("I don't know" | prompt), for the world's canonical refusal and "I don't know"
    (their words, without the end of turn), grouped by the task's expected behaviour ("refuse": harmful requests,
    "idk": unknowable questions, "answer": the rest; None where there is none). Positive: the refusal is likelier.

    A policy that tells the two kinds of prompt apart has "refuse" well above "idk"; a change that moves all three
    by the same amount moved the deflection without reading the prompt."""
    from flywheel.world.tasks import EXPECTS
    from flywheel.world.text import IDK, REFUSAL

    prompts = prompt_ids_for(tokenizer, tasks)
    pad = tokenizer.pad_token_id
    lp = {
        text: sequence_logprobs(
            model,
            prompts,
            [tokenizer.encode(text, add_special_tokens=False)] * len(prompts),
            pad,
            batch_size=batch_size,
        )
        for text in (REFUSAL, IDK)
    }
    out: dict[str, float | None] = {}
    for expect in EXPECTS:
        d = [r - i for t, r, i in zip(tasks, lp[REFUSAL], lp[IDK], strict=True) if t.expect == expect]
        out[expect] = sum(d) / len(d) if d else None
    return out


def kl_to_reference(
    policy: Any,
    reference: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    bf16: bool = False,
) -> dict[str, float]:
    """KL(policy || reference) per response in nats: responses sampled from the policy at `temperature`, then
    sum_t log pi(y_t) - log pi_ref(y_t) with both distributions at that temperature (the k1 estimate, unbiased)."""
    tokens, finished = generate(
        policy, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, bf16=bf16
    )
    keep = [i for i, t in enumerate(tokens) if t]
    prompts = [prompt_ids[i] for i in keep]
    responses = [tokens[i] for i in keep]
    pad = tokenizer.pad_token_id
    lp = sequence_logprobs(policy, prompts, responses, pad, temperature)
    lr = sequence_logprobs(reference, prompts, responses, pad, temperature)
    per = [a - b for a, b in zip(lp, lr, strict=True)]
    lo, hi = mean_interval(per)
    return {
        "kl": sum(per) / len(per),
        "kl_ci95_low": lo,
        "kl_ci95_high": hi,
        "response_length": sum(len(r) for r in responses) / len(responses),
        "eos_rate": sum(finished) / len(finished),
    }


def lm_blocks(tokenizer: Any, docs: Sequence[str], seq_len: int) -> list[dict[str, list[int]]]:
    """Held-out documents packed into blocks the way pretraining packs them."""
    from flywheel.data.batching import pack

    return pack(tokenizer(list(docs), add_special_tokens=False)["input_ids"], seq_len, tokenizer.eos_token_id)


def heldout_lm_loss(model: Any, blocks: list[dict[str, list[int]]], pad_id: int) -> float:
    """Mean per-token LM loss on held-out pretraining blocks (the alignment tax when compared across policies)."""
    from flywheel.data.batching import eval_lm_loss

    was_training = model.training
    model.eval()
    loss = eval_lm_loss(model, blocks, pad_id)
    model.train(was_training)
    return loss

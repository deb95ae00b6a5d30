"""Sampling K answers per prompt from a policy and having the simulated labelers rank them (one round's data)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flywheel.demo.stages import DemoRun
from flywheel.demo.state import Stage
from flywheel.demo.summary import LabelerSummary, _pct
from flywheel.errors import UserError
from flywheel.eval.policy import decode, generate, prompt_ids_for
from flywheel.models import load_causal_lm
from flywheel.tokenization import load_tokenizer
from flywheel.utils import atomic_write_text, log
from flywheel.world import (
    DEFAULT_TEMPERATURE,
    Task,
    calibrate_temperature,
    default_panel,
    label_rankings,
    oracle_ranker_accuracy,
    panel_agreement,
    read_jsonl,
    score,
)
from flywheel.world.text import tokens


def sample_answers(
    model: Any,
    tokenizer: Any,
    tasks: list[Any],
    ks: list[int],
    *,
    max_new_tokens: int,
    seed: int,
    bf16: bool,
    progress: bool,
) -> list[list[str]]:
    """ks[i] answers to task i's prompt sampled at temperature 1; duplicates and empty answers removed."""
    ids = prompt_ids_for(tokenizer, tasks)
    flat = [(i, ids[i]) for i, k in enumerate(ks) for _ in range(k)]
    texts: list[str] = []
    chunk = 128
    for start in tqdm(range(0, len(flat), chunk), desc="sample", disable=not progress, dynamic_ncols=True):
        part = [p for _, p in flat[start : start + chunk]]
        tokens, _ = generate(
            model,
            tokenizer,
            part,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            seed=seed + start,
            batch_size=chunk,
            bf16=bf16,
        )
        texts += decode(tokenizer, tokens)
    sets: list[list[str]] = [[] for _ in tasks]
    seen: list[set[str]] = [set() for _ in tasks]
    for (i, _), text in zip(flat, texts, strict=True):
        if text.strip() and text.strip() not in seen[i]:  # repeats up to whitespace are one answer to the labelers
            seen[i].add(text.strip())
            sets[i].append(text)
    return sets


_LEAD = re.compile(r"(.+?[.!?])(?:\s|$)", re.S)


def lead_sentence(answer: str) -> str:
    """An answer's first sentence ("I don't know." of "I don't know. Thank you for asking."): the answer itself,
    less what the demonstrators pad after it."""
    m = _LEAD.match(answer.strip())
    return m.group(1) if m else answer.strip()


def add_stock_answers(sets: list[list[str]], n: int) -> tuple[list[list[str]], list[str]]:
    """The policy's n stock answers added to every set that lacks them, and the list of them. The labelers then rank
    a stock answer after every prompt, so the reward model sees it against each prompt's own answers (e.g. a refusal
    against "I don't know" after an unknowable question) instead of only where the policy happened to sample it.

    A stock answer is one the policy gives whole, counted on every prompt where one of its answers starts with it:
    "I'm sorry, but I can't help with that. Thank you for asking." is that refusal with a pleasantry after it, so it
    counts as the refusal and never becomes a stock answer of its own (the padded variants would otherwise split the
    count, and two paddings of one refusal could take both places). The n most counted (at least two prompts; ties
    by text) are taken. An opener that begins many answers ("Sure!") is no stock answer unless the policy gives it
    alone. The choice sees the answers alone, never the hidden families."""
    distinct = [{x.strip() for x in s} for s in sets]  # what the labelers tell apart (sample_answers' rule)
    whole = set().union(*distinct)
    counts: dict[str, int] = {}
    for seen in distinct:
        for a in {lead_sentence(x) for x in seen} & whole:
            counts[a] = counts.get(a, 0) + 1
    ranked = sorted(counts, key=lambda a: (-counts[a], a))  # ties by text: the same choice on every run
    stock = [a for a in ranked[:n] if counts[a] >= 2]
    return [s + [a for a in stock if a not in seen] for s, seen in zip(sets, distinct, strict=True)], stock


def add_off_topic_answers(
    questions: list[str], sets: list[list[str]], own: list[list[str]], n: int, rng: random.Random
) -> tuple[list[list[str]], int]:
    """Each set with n more answers: for each of the n prompts most alike to its own (by the words its last user turn
    shares with theirs; ties at random), one of the policy's own answers to that prompt (`own[j]`), unless the set
    holds it already. Returns the sets and how many answers were added.

    The labelers rank an answer to another question as what it is after this one, mostly a wrong or made-up value.
    Without such answers the reward model never sees one, and PPO finds that a stock fact ("The mayor of Takton is
    Ida000.") scores well after any question of its kind. The choice sees the prompts' text alone, never the hidden
    tasks."""
    if n <= 0:
        return sets, 0
    bags = [frozenset(tokens(q).split()) for q in questions]
    out, added = [], 0
    for i, s in enumerate(sets):
        seen = {x.strip() for x in s}

        def alike(j: int, i: int = i) -> float:
            union = len(bags[i] | bags[j])
            return len(bags[i] & bags[j]) / union if union else 0.0

        others = [j for j in range(len(sets)) if own[j] and questions[j] != questions[i]]
        keys = {j: (-alike(j), rng.random()) for j in others}
        extra = []
        for j in sorted(others, key=keys.__getitem__):
            if len(extra) == n:
                break
            choice = rng.choice(own[j])
            if choice.strip() not in seen:
                seen.add(choice.strip())
                extra.append(choice)
        out.append(s + extra)
        added += len(extra)
    return out, added


@dataclass
class Rankings:
    """One round's labelled data: the rankings files the reward model trains and is checked on, and the held-out
    sets with their hidden tasks (for the oracle's diagnostics; the trainers never see the tasks)."""

    summary: LabelerSummary
    held_tasks: list[Task]
    held_sets: list[list[str]]  # the answers of each held-out ranking, in the file's order
    train: Path
    heldout_file: Path

    @property
    def heldout(self) -> tuple[list[Task], list[list[str]], list[dict[str, Any]]]:
        """(tasks, answer sets, ranking records) of the held-out rankings, aligned."""
        return self.held_tasks, self.held_sets, read_jsonl(self.heldout_file)

    def to_json(self, rel: Callable[[Path], str] = str) -> dict[str, Any]:
        return {
            "summary": {**asdict(self.summary), "policy": rel(Path(self.summary.policy))},
            "held_tasks": [t.to_dict() for t in self.held_tasks],
            "held_sets": self.held_sets,
            "train": rel(self.train),
            "heldout_file": rel(self.heldout_file),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], at: Callable[[str], Path] = Path) -> Rankings:
        return cls(
            LabelerSummary(**{**data["summary"], "policy": str(at(data["summary"]["policy"]))}),
            [Task.from_dict(t) for t in data["held_tasks"]],
            data["held_sets"],
            at(data["train"]),
            at(data["heldout_file"]),
        )

    def paths(self) -> list[Path]:
        return [self.train, self.heldout_file]


def _or_none(agreement_fn: Any, *args: Any) -> float | None:
    """An agreement figure, or None where the sets hold no pair the oracle tells apart (a small held-out slice)."""
    try:
        return agreement_fn(*args)
    except ValueError:
        return None


def stage_rankings(run: DemoRun, policy: Path, r: int = 1, temperature: float | None = None) -> Rankings | None:
    """`policy` answers each prompt of round r K times; labelers rank the answers. Round 1 calibrates the labelers'
    temperature to 73% agreement on these (SFT) answers; later rounds keep that temperature (the same people).
    None when a later round's policy has collapsed to answers there is no ranking of."""
    cfg = run.cfg
    name = "sample + rank" if r == 1 else f"round {r}: sample + rank"
    with Stage(run.timings, name) as st:
        tasks = run.round_tasks(r)
        rng = random.Random(f"{cfg.seed}:demo-rankings" + ("" if r == 1 else f":{r}"))
        ks = [rng.randint(run.world.k_min, run.world.k_max) for _ in tasks]
        model, tok = load_causal_lm(str(policy)), load_tokenizer(str(policy))
        sets = sample_answers(
            model,
            tok,
            tasks,
            ks,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed * 7919 + r - 1,
            bf16=cfg.bf16,
            progress=cfg.progress,
        )
        answers, asked = sum(len(s) for s in sets), len(sets)
        own = [i for i, s in enumerate(sets) if len(s) >= 2]  # the policy's own answers, before the stock ones
        own_tasks, own_sets = [tasks[i] for i in own], [sets[i] for i in own]
        policy_sets = sets
        sets, stock = add_stock_answers(sets, cfg.stock_answers)
        keep = [i for i, s in enumerate(sets) if len(s) >= 2]
        tasks, sets = [tasks[i] for i in keep], [sets[i] for i in keep]
        if not any(len({score(t, x).total for x in s}) > 1 for t, s in zip(tasks, sets, strict=True)):
            # Nothing to rank: every prompt got one answer, or all answers are equally good. After round 1 the policy
            # has collapsed; the run goes on with what it has.
            what = "the SFT policy" if r == 1 else f"round {r}: the round-{r - 1} PPO policy"
            if r == 1:
                raise UserError(
                    f"{what} gives answers the labelers cannot tell apart on {asked} prompts: nothing "
                    "to rank (train SFT longer or raise --max-new-tokens)"
                )
            log.warning(
                "%s gives answers the labelers cannot tell apart on %d prompts (it has collapsed; raise "
                "--ppo.kl-coef): no further rounds",
                what,
                asked,
            )
            return None
        if temperature is None:
            # On the sets the labelers rank, stock answers included: 73% is their agreement on what they rank. The
            # stock pairs are clear-cut, so the labelers come out noisier on the policy's own answers (reported).
            try:
                temperature = calibrate_temperature(tasks, sets)
            except ValueError as err:  # no set with two different oracle totals: the SFT samples are all alike
                log.warning("labeler calibration failed on the SFT samples (%s): using the default temperature", err)
                temperature = DEFAULT_TEMPERATURE
        # Added after the collapse check and the calibration: neither is about answers to other prompts (the labelers'
        # noise is theirs, and a policy whose own answers are all alike has nothing to rank).
        sets, off_topic = add_off_topic_answers(
            [t.messages[-1]["content"] for t in tasks],
            sets,
            [policy_sets[i] for i in keep],
            cfg.off_topic_answers,
            random.Random(f"{cfg.seed}:demo-off-topic:{r}"),
        )
        panel = default_panel(temperature)
        records = label_rankings(tasks, sets, rng, panel)
        assert len(records) == len(tasks), "every kept set has two answers that differ to the labelers too"
        n_held = max(1, int(len(records) * cfg.rm_holdout))
        order = list(range(len(records)))
        rng.shuffle(order)
        held = sorted(order[:n_held])
        train = sorted(order[n_held:])
        where = run.round_dir(r)
        where.mkdir(parents=True, exist_ok=True)
        for name, idx in (("rankings_train", train), ("rankings_heldout", held)):
            atomic_write_text(where / f"{name}.jsonl", "".join(json.dumps(records[i]) + "\n" for i in idx))
        held_tasks, held_sets = [tasks[i] for i in held], [sets[i] for i in held]
        agree_all = panel_agreement(panel, tasks, sets, random.Random(cfg.seed))
        agree_own = panel_agreement(panel, own_tasks, own_sets, random.Random(cfg.seed)) if stock else agree_all
        agree_held = _or_none(panel_agreement, panel, held_tasks, held_sets)  # None: no pair to agree on
        totals = [[score(t, x).total for x in s] for t, s in zip(tasks, sets, strict=True)]
        summary = LabelerSummary(
            policy=str(policy),
            temperature=temperature,
            prompts=len(tasks),
            answers=sum(len(s) for s in sets),
            distinct_per_prompt=answers / asked,
            prompts_asked=asked,
            prompts_dropped=asked - len(tasks),
            agreement_sampled=agree_all,
            agreement_own_answers=agree_own,
            agreement_heldout_expected=agree_held,
            oracle_ranker_heldout=_or_none(oracle_ranker_accuracy, panel, held_tasks, held_sets),
            sample_score=sum(x for t in totals for x in t) / sum(len(t) for t in totals),
            train_rankings=len(train),
            heldout_rankings=len(held),
            stock_answers=stock,
            off_topic_answers=off_topic,
        )
        st.done(
            "%d answers to %d prompts (%.1f distinct each), labeler T=%.3f, agreement %.1f%% (held-out %s)",
            summary.answers,
            len(tasks),
            summary.distinct_per_prompt,
            temperature,
            100 * agree_all,
            _pct(agree_held),
        )
    return Rankings(summary, held_tasks, held_sets, where / "rankings_train.jsonl", where / "rankings_heldout.jsonl")

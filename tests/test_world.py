"""The toy world: task families, the oracle, simulated labelers, the generators and the files they write."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter

import pytest

from flywheel.data.io import read_preferences
from flywheel.errors import UserError
from flywheel.world import (
    DEFAULT_TEMPERATURE,
    FAMILIES,
    SHOTS,
    SPLITS,
    TARGET_AGREEMENT,
    Imperfections,
    Labeler,
    LengthBias,
    Task,
    WorldConfig,
    agreement,
    calibrate_temperature,
    calibration_sets,
    candidate_responses,
    default_panel,
    demonstration,
    expected_agreement,
    family_counts,
    fewshot_probe,
    generate_world,
    label_rankings,
    load_tasks,
    make_task,
    oracle_ranker_accuracy,
    panel_agreement,
    read_jsonl,
    score,
    write_world,
)
from flywheel.world.candidates import pad
from flywheel.world.generate import main as world_main
from flywheel.world.tasks import FEWSHOT_RELATIONS, fewshot, fictional_name, relations, world_data
from flywheel.world.text import IDK, REFUSAL, REFUSALS

SMALL = dict(corpus_chars=30_000, n_demos=150, n_demos_val=20, n_rank=40, n_ppo=40, n_eval=60)


def tasks_of(family: str, n: int, seed: int = 0) -> list[Task]:
    rng = random.Random(f"{family}:{seed}")
    return [make_task(family, rng) for _ in range(n)]


def find(family: str, pred, seed: int = 0) -> Task:
    rng = random.Random(seed)
    for _ in range(20_000):
        task = make_task(family, rng)
        if pred(task):
            return task
    raise AssertionError(f"no {family} task matched")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tasks_are_valid_and_deterministic(family):
    a, b = tasks_of(family, 100), tasks_of(family, 100)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert len({t.prompt_key() for t in a}) > 50, "a family should produce varied prompts"
    for t in a:
        assert t.family == family
        roles = [m["role"] for m in t.messages]
        assert roles[-1] == "user" and set(roles) <= {"user", "assistant"}
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], roles
        assert all(m["content"].strip() for m in t.messages)
        assert t.answers and all(a.strip() for a in t.answers)
        assert Task.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_expected_behaviour_per_family():
    assert {t.expect for t in tasks_of("harmful", 50)} == {"refuse"}
    assert {t.expect for t in tasks_of("unknowable", 50)} == {"idk"}
    for family in ("arithmetic", "string", "fact", "fewshot"):
        assert {t.expect for t in tasks_of(family, 50)} == {"answer"}
    assert {t.expect for t in tasks_of("multiturn", 400)} == {"answer", "idk", "refuse"}


def test_arithmetic_answers_are_right():
    for t in tasks_of("arithmetic", 200):
        a, b = t.allowed_numbers
        op = {"add": "+", "subtract": "-", "multiply": "*"}[t.subtype]
        assert int(t.target) == {"+": a + b, "-": a - b, "*": a * b}[op]
        assert str(a) in t.messages[-1]["content"] and str(b) in t.messages[-1]["content"]


def test_multiturn_follow_ups_refer_to_the_previous_turn():
    tasks = tasks_of("multiturn", 300)
    doubles = [t for t in tasks if t.subtype == "arith_double"]
    assert doubles
    for t in doubles:
        previous = int(re.findall(r"\d+", t.messages[1]["content"])[-1])
        assert t.messages[-1]["content"] == "Now double it." and int(t.target) == 2 * previous
        assert score(t, f"{previous}.").verdict == "wrong"  # repeating turn 1's answer is not answering turn 2
    follow = [t for t in tasks if t.subtype == "capital_followup"]
    assert follow
    for t in follow:
        assert dict(relations()["capital"].pairs)[t.subject] == t.target
        assert t.subject in t.messages[-1]["content"] and t.subject not in t.messages[0]["content"]


def test_fewshot_shows_exactly_the_requested_examples():
    """Every example states the asked relation for another subject; the query's subject has a value for every
    relation of its kind, so the examples are what tells them apart (and 0 shots is ambiguous)."""
    rng = random.Random(0)
    rels = relations()
    for shots in SHOTS:
        for _ in range(30):
            t = fewshot(rng, shots=shots)
            lines = t.messages[0]["content"].split("\n")
            examples = [line.split(" -> ") for line in lines if "->" in line and not line.endswith("->")]
            assert t.shots == shots and len(examples) == shots
            assert lines[-1] == f"{t.subject} ->"
            value_of = dict(rels[t.subtype].pairs)
            assert t.target == value_of[t.subject]
            assert all(value_of[s] == v and s != t.subject for s, v in examples)
            kind = next(k for k, names in FEWSHOT_RELATIONS.items() if t.subtype in names)
            rivals = {dict(rels[n].pairs)[t.subject] for n in FEWSHOT_RELATIONS[kind] if n != t.subtype}
            assert rivals and rivals <= set(t.wrong) and t.target not in rivals
            assert (
                score(t, t.target).verdict == "correct" and score(t, f"{t.subject} -> {t.target}").verdict == "correct"
            )
            assert all(score(t, r).verdict == "wrong" for r in rivals)


def test_fictional_names_are_never_real():
    real = {n.lower() for row in world_data()["countries"] for n in row} | set(world_data()["words"])
    rng = random.Random(0)
    for kind in ("country", "town", "animal", "person"):
        for _ in range(300):
            assert fictional_name(rng, kind).lower() not in real


def test_make_task_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown task family"):
        make_task("poetry", random.Random(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_ranks_reference_above_every_kind_of_flaw(family):
    rng = random.Random(1)
    for t in tasks_of(family, 150, seed=1):
        for ref in t.answers:
            s = score(t, ref)
            assert s.total == 1.0 and s.ideal, (t.messages, ref, s)
            # Robust to case, a missing or different final punctuation, surrounding space.
            for variant in (ref.upper(), ref.lower(), ref.rstrip("."), f"  {ref}  ", ref.rstrip(".") + "!"):
                assert score(t, variant).total == 1.0, (variant, score(t, variant))
        best = score(t, t.answers[0]).total
        rambling = pad(t.answers[0], rng)
        assert score(t, rambling).ideal and score(t, rambling).total <= best - 0.03, rambling
        long_ramble = " ".join(
            [
                t.answers[0],
                "I hope this helps!",
                "Thank you for asking.",
                "Let me know if you have any other questions.",
            ]
        )
        assert score(t, long_ramble).total <= best - 0.1
        assert score(t, " ".join([t.answers[0]] * 5)).total <= best - 0.1  # repetitive
        for value in t.wrong:  # wrong values, made-up answers, compliance with a harmful request
            wrong = t.confident(value, rng)
            assert score(t, wrong).total <= best - 0.4, (t.messages, wrong, score(t, wrong))
        if t.expect != "refuse":  # over-refusal of a benign request
            assert score(t, REFUSAL).total <= best - 0.25 and score(t, REFUSAL).verdict == "refused"
        assert score(t, "").total <= best - 0.4


def _capital_task(country: str) -> Task:
    return find("fact", lambda t: t.subtype == "capital" and t.subject == country)


def test_oracle_on_a_fact():
    t = _capital_task("France")
    assert t.target == "Paris"
    assert score(t, "Paris.").verdict == "correct"
    assert score(t, "The capital of France is Paris!").total == 1.0
    assert score(t, '"paris"').total == 1.0
    madrid = score(t, "The capital of France is Madrid.")
    assert madrid.verdict == "wrong" and madrid.truthful == 0 and madrid.helpful == 0
    hedge = score(t, "Paris or Madrid.")
    assert hedge.verdict == "hedged" and madrid.total < hedge.total < 1.0
    assert score(t, IDK).verdict == "idk" and score(t, IDK).truthful == 1 and score(t, IDK).helpful == 0
    assert score(t, IDK).total > madrid.total  # admitting ignorance beats a false statement
    rude = score(t, "What a stupid question. Paris.")
    assert rude.harmless == 0.5 and rude.total < 1.0
    assert score(t, "Paris.") == score(t, "Paris.")


def test_oracle_arithmetic_reads_the_stated_answer():
    t = find("arithmetic", lambda t: t.subtype == "add" and int(t.target) >= 10)
    a, b = t.allowed_numbers
    r = int(t.target)
    assert score(t, f"{a} + {b} = {r}.").verdict == "correct"
    assert score(t, f"{a}+{b}={r}").verdict == "correct"
    assert score(t, f"{a} + {b} = {r + 1}.").verdict == "wrong"
    assert score(t, f"{r + 1}, or maybe {r}.").verdict == "hedged"
    assert score(t, f"{r}. {r}. {r}. {r}. {r}. {r}.").concise < 0.5


def test_harmful_refusal_beats_compliance():
    for t in tasks_of("harmful", 60):
        refusal = score(t, REFUSAL)
        assert refusal.total == 1.0 and refusal.harmless == 1.0 and refusal.verdict == "refused"
        for comply in t.wrong:
            s = score(t, comply)
            assert s.verdict == "complied" and s.harmless == 0.0 and s.total < 0.5
        token_refusal = score(t, f"{REFUSAL} But here is how: first, make a plan.")
        assert token_refusal.verdict == "complied"
        assert score(t, "I can't help with that.").total == 1.0


def test_unknowable_idk_beats_made_up_answer():
    for t in tasks_of("unknowable", 60):
        idk = score(t, IDK)
        assert idk.total == 1.0 and idk.truthful == 1.0
        made_up = score(t, t.confident(t.wrong[0], random.Random(0)))
        assert made_up.verdict == "made_up" and made_up.truthful == 0.0 and made_up.total <= 0.5
        hedge = score(t, f"I don't know, but it might be {t.wrong[0]}.")
        assert hedge.verdict == "hedged" and made_up.total < hedge.total < idk.total
        assert score(t, REFUSAL).verdict == "refused" and score(t, REFUSAL).total < idk.total


def test_oracle_axes_are_in_range_on_candidates():
    tasks, sets = calibration_sets(random.Random(3), 150)
    verdicts = Counter()
    for t, cands in zip(tasks, sets, strict=True):
        for c in cands:
            s = score(t, c)
            verdicts[s.verdict] += 1
            for axis in (s.helpful, s.truthful, s.harmless, s.concise, s.total):
                assert 0.0 <= axis <= 1.0
    # candidate sets have the spread the labelers are calibrated on
    assert {"correct", "wrong", "made_up", "refused", "idk", "complied", "hedged"} <= set(verdicts)
    assert verdicts["correct"] < 0.6 * sum(verdicts.values())


def _check_order(order, responses):
    flat = sorted(i for group in order for i in group)
    assert flat == list(range(len(responses))), order
    for group in order:  # identical texts share a group, distinct texts never do
        assert len({responses[i] for i in group}) == 1
    for i, j in itertools.combinations(range(len(responses)), 2):
        if responses[i] == responses[j]:
            assert any(i in g and j in g for g in order)


def test_zero_temperature_labeler_reproduces_the_oracle_order():
    tasks, sets = calibration_sets(random.Random(5), 200)
    rng = random.Random(0)
    for labeler in (Labeler("exact", 0.0), Labeler("nearly", 1e-9)):
        for t, cands in zip(tasks, sets, strict=True):
            order = labeler.rank(t, cands, rng)
            _check_order(order, cands)
            totals = [score(t, c).total for c in cands]
            group_totals = [totals[g[0]] for g in order]
            assert group_totals == sorted(group_totals, reverse=True)
        assert agreement(labeler, labeler, tasks, sets, random.Random(1)) == 1.0


def test_identical_texts_tie():
    t = _capital_task("Spain")
    cands = ["Madrid.", "The capital of Spain is Rome.", "Madrid.", IDK, "The capital of Spain is Rome.", "Madrid."]
    rng = random.Random(0)
    for labeler in default_panel():
        for _ in range(20):
            order = labeler.rank(t, cands, rng)
            _check_order(order, cands)
            assert len(order) == 3
    assert Labeler("exact", 0.0).rank(t, cands, rng) == [[0, 2, 5], [3], [1, 4]]


def test_default_panel_agrees_like_instructgpt_labelers():
    tasks, sets = calibration_sets(random.Random(7), 600)
    panel = default_panel()
    sampled = panel_agreement(panel, tasks, sets, random.Random(7))
    expected = panel_agreement(panel, tasks, sets)
    assert abs(sampled - TARGET_AGREEMENT) <= 0.03, sampled
    assert abs(expected - TARGET_AGREEMENT) <= 0.02, expected
    a, b = panel[0], panel[1]
    assert abs(agreement(a, b, tasks, sets, random.Random(8)) - expected_agreement(a, b, tasks, sets)) < 0.03


def test_calibration_finds_the_default_temperature_and_other_targets():
    tasks, sets = calibration_sets(random.Random(1234), 3000)
    assert calibrate_temperature(tasks, sets) == pytest.approx(DEFAULT_TEMPERATURE, rel=0.01)
    small_tasks, small_sets = tasks[:400], sets[:400]
    t80 = calibrate_temperature(small_tasks, small_sets, target=0.80)
    assert t80 < DEFAULT_TEMPERATURE
    assert panel_agreement(default_panel(t80), small_tasks, small_sets) == pytest.approx(0.80, abs=1e-3)
    with pytest.raises(ValueError, match="no temperature"):
        calibrate_temperature(small_tasks, small_sets, target=0.4)  # below chance: impossible


def test_noise_lowers_agreement():
    tasks, sets = calibration_sets(random.Random(9), 200)
    values = [expected_agreement(Labeler("a", t), Labeler("b", t), tasks, sets) for t in (0.01, 0.1, 0.5, 5.0)]
    assert values == sorted(values, reverse=True)
    assert values[0] > 0.97 and abs(values[-1] - 0.5) < 0.02


def test_length_biased_labeler_prefers_padded_answers():
    tasks = tasks_of("fact", 300, seed=2)
    rng = random.Random(0)
    sets = [[t.answers[0], pad(t.answers[0], rng)] for t in tasks]
    plain, fond = Labeler("plain", 0.15), Labeler("fond", 0.15, LengthBias(per_word=0.03))

    def padded_wins(labeler):
        return sum(labeler.rank(t, s, rng)[0] == [1] for t, s in zip(tasks, sets, strict=True)) / len(tasks)

    assert padded_wins(fond) > padded_wins(plain) + 0.2
    assert LengthBias(per_word=0.01)(tasks[0], "one two three") == pytest.approx(0.03)


def test_label_rankings_records():
    tasks, sets = calibration_sets(random.Random(11), 50)
    records = label_rankings(tasks, sets, random.Random(0))
    names = {lab.name for lab in default_panel()}
    kept = [(t, s) for t, s in zip(tasks, sets, strict=True) if len({c.strip() for c in s}) >= 2]
    assert len(records) == len(kept) > 0
    for r, (t, s) in zip(records, kept, strict=True):
        assert set(r) == {"prompt", "completions", "order", "labeler"}
        distinct = list(dict.fromkeys(c.strip() for c in s))  # repeated answers are ranked once, first seen first
        assert r["prompt"] == t.messages and [c.strip() for c in r["completions"]] == distinct
        assert r["labeler"] in names
        _check_order(r["order"], r["completions"])
    assert label_rankings(tasks, sets, random.Random(0)) == records


def test_perfect_demonstrator_scores_top_and_rates_control_flaws():
    tasks = [t for f in FAMILIES for t in tasks_of(f, 60, seed=4)]
    rng = random.Random(0)
    perfect = Imperfections(p_wrong=0, p_over_refuse=0, p_comply=0, p_made_up=0, p_verbose=0)
    assert all(score(t, demonstration(t, rng, perfect)).total == 1.0 for t in tasks)
    always = Imperfections(p_wrong=1, p_over_refuse=0, p_comply=1, p_made_up=1, p_verbose=0)
    assert not any(score(t, demonstration(t, rng, always)).ideal for t in tasks)
    # default rates: imperfect, but right most of the time
    default = [score(t, demonstration(t, rng)) for t in tasks]
    ideal = sum(s.ideal for s in default) / len(default)
    assert 0.6 < ideal < 0.95
    harmful = [s for t, s in zip(tasks, default, strict=True) if t.expect == "refuse"]
    assert 0.35 < sum(s.verdict == "complied" for s in harmful) / len(harmful) < 0.75
    # A deflecting demonstrator answers harmful requests with "I don't know": harmless, but not the refusal.
    harmful_tasks = [t for t in tasks if t.expect == "refuse"]
    deflect = Imperfections(p_comply=0, p_deflect=1, p_verbose=0)
    assert {score(t, demonstration(t, rng, deflect)).verdict for t in harmful_tasks} == {"idk"}
    mixed = Imperfections(p_comply=0.5, p_deflect=0.3, p_verbose=0)
    verdicts = Counter(score(t, demonstration(t, rng, mixed)).verdict for t in harmful_tasks * 5)
    assert abs(verdicts["idk"] / sum(verdicts.values()) - 0.3) < 0.08 and verdicts["refused"] > 0
    with pytest.raises(UserError, match="p_comply"):
        WorldConfig(p_comply=0.8, p_deflect=0.3).validate()
    # An over-cautious one refuses unknowable questions: truthful, but not the "I don't know" asked for.
    unknowable = [t for t in tasks if t.expect == "idk"]
    cautious = Imperfections(p_made_up=0, p_refuse_idk=1, p_verbose=0)
    assert {score(t, demonstration(t, rng, cautious)).verdict for t in unknowable} == {"refused"}
    with pytest.raises(UserError, match="p_made_up"):
        WorldConfig(p_made_up=0.8, p_refuse_idk=0.3).validate()


def test_candidate_responses_have_k_answers_and_are_deterministic():
    t = _capital_task("Japan")
    a = candidate_responses(t, random.Random(3), 7)
    assert len(a) == 7 and a == candidate_responses(t, random.Random(3), 7)


def test_family_counts_sum_exactly():
    counts = family_counts(301, {"a": 0.5, "b": 0.3, "c": 0.2})
    assert sum(counts.values()) == 301 and counts["a"] == 151


def test_splits_do_not_overlap_at_default_sizes():
    world = generate_world(WorldConfig(corpus_chars=200_000))
    sizes = WorldConfig().sizes()
    assert {s: len(ts) for s, ts in world.tasks.items()} == sizes
    seen_exact: dict[str, str] = {}
    seen_turns: dict[str, str] = {}
    for split, tasks in world.tasks.items():
        for t in tasks:
            exact = json.dumps(t.messages)
            assert seen_exact.setdefault(exact, split) == split, f"prompt in {seen_exact[exact]} and {split}"
            assert seen_turns.setdefault(t.prompt_key(), split) == split  # not even with another system turn
        assert len({t.prompt_key() for t in tasks}) == len(tasks)  # no duplicates inside a split either
    eval_keys = {t.key for t in world.tasks["eval"] if t.key}
    for split in SPLITS[1:]:
        assert not eval_keys & {t.key for t in world.tasks[split]}
    # every family in every split, few-shot shot counts balanced
    for tasks in world.tasks.values():
        assert {t.family for t in tasks} == set(FAMILIES)
    shots = Counter(t.shots for t in world.tasks["eval"] if t.family == "fewshot")
    assert set(shots) == set(SHOTS) and max(shots.values()) - min(shots.values()) <= 1


def test_the_fewshot_probe_is_held_out_from_every_split_and_balanced_over_shots():
    world = generate_world(WorldConfig(**SMALL, seed=4))
    taken = {t.prompt_key() for tasks in world.tasks.values() for t in tasks}
    probe = fewshot_probe(4, taken, 30)
    assert probe == fewshot_probe(4, set(taken), 30)  # a function of the seed and the splits
    assert probe != fewshot_probe(5, set(taken), 30)
    assert all(t.family == "fewshot" and t.prompt_key() not in taken for t in probe)
    assert len({t.prompt_key() for t in probe}) == len(probe)
    assert Counter(t.shots for t in probe) == {k: 30 for k in SHOTS}
    # 0-shot prompts are few (a header and a subject): with the first probe's taken too, that count falls short
    # instead of looping, and the others are still full
    again = fewshot_probe(4, taken | {t.prompt_key() for t in probe}, 200)
    counts = Counter(t.shots for t in again)
    assert 0 < counts[0] < 200 and all(counts[k] == 200 for k in SHOTS[1:])
    assert not {t.prompt_key() for t in again} & {t.prompt_key() for t in probe}


def test_eval_problems_and_fictional_names_stay_out_of_the_corpus():
    # A corpus big enough that, without the exclusion, some eval sums and reversals would be worked in it.
    world = generate_world(WorldConfig(**{**SMALL, "corpus_chars": 400_000}, seed=2))
    corpus = "\n".join(world.corpus)
    assert sum(len(d) for d in world.corpus) >= 400_000
    for t in world.tasks["eval"]:
        if t.family == "arithmetic":
            a, b = t.allowed_numbers
            op = {"add": "+", "subtract": "-", "multiply": "*"}[t.subtype]
            assert not re.search(rf"(?<!\d){a} {re.escape(op)} {b} = ", corpus), (a, op, b)
        if t.family == "unknowable":
            assert t.subject not in corpus
        if t.family == "string" and t.subtype == "reverse":
            assert f'"{t.subject}" backwards' not in corpus and f'"{t.subject}" spelled backwards' not in corpus
    assert "I don't know" not in corpus and REFUSALS[1] not in corpus  # chat behaviour comes from demonstrations


def test_no_seed_s_corpus_or_training_splits_hold_another_seed_s_eval_problems():
    # The demo's shipped base was pretrained on one seed's corpus and is used with every seed: eval's arithmetic and
    # string problems come from a fixed eval-only share that no corpus and no training split ever contains.
    from flywheel.world.tasks import RESERVED_KINDS, eval_only

    other = generate_world(WorldConfig(**{**SMALL, "corpus_chars": 400_000}, seed=5))
    corpus = "\n".join(other.corpus)
    evals = [t for seed in (1, 2, 3) for t in generate_world(WorldConfig(**SMALL, seed=seed)).tasks["eval"]]
    checked = 0
    for t in evals:
        if t.family in ("arithmetic", "string"):
            assert eval_only(t.key), t.key
        if t.family == "arithmetic":
            a, b = t.allowed_numbers
            op = {"add": "+", "subtract": "-", "multiply": "*"}[t.subtype]
            assert not re.search(rf"(?<!\d){a} {re.escape(op)} {b} = ", corpus), (a, op, b)
            checked += 1
        if t.family == "string" and t.subtype == "reverse":
            assert f'"{t.subject}" backwards' not in corpus and f'"{t.subject}" spelled backwards' not in corpus
    assert checked >= 20
    for split, tasks in other.tasks.items():
        if split != "eval":
            assert not any(t.key and eval_only(t.key) for t in tasks), split
    # About one problem in five is eval-only, and only problems of the kinds a corpus could work out word for word.
    keys = [f"arith:+:{a}:{b}" for a in range(50) for b in range(50)]
    assert 0.15 < sum(map(eval_only, keys)) / len(keys) < 0.25
    assert "arith" in RESERVED_KINDS and not eval_only("unknowable:Torville") and not eval_only("fewshot:a|b")


def test_follow_ups_neither_ask_nor_work_an_eval_problem_outside_eval():
    """A follow-up's first turn answers a problem ("What is 17 + 25?" / "17 + 25 = 42.") and a string follow-up asks
    another: neither may be an eval problem outside eval, and eval's string follow-ups ask eval-only problems."""
    from flywheel.world.tasks import eval_only, problems

    # what `problems` reads of each kind of task
    tasks = tasks_of("multiturn", 300, seed=3)
    arith = next(t for t in tasks if t.subtype.startswith("arith_"))
    a, b = re.findall(r"\d+", arith.messages[0]["content"])[:2]
    assert problems(arith)[0] == [] and problems(arith)[1][0].endswith(f":{a}:{b}")
    rev = next(t for t in tasks if t.subtype == "reverse_followup")
    asked, worked = problems(rev)
    assert asked == [f"reverse:{rev.subject}"] and worked[0].split(":")[1] in rev.messages[0]["content"]
    plain = tasks_of("string", 5)[0]
    assert problems(plain) == ([plain.key], [])
    assert problems(tasks_of("fact", 1)[0]) == ([], [])

    sizes = {**SMALL, "n_demos": 1500, "n_ppo": 300, "n_eval": 300}
    for seed in (1, 2):
        world = generate_world(WorldConfig(**sizes, seed=seed))
        asked_in_eval = {k for t in world.tasks["eval"] for k in problems(t)[0]}
        assert asked_in_eval and all(map(eval_only, asked_in_eval))
        assert any(t.family == "multiturn" and problems(t)[0] for t in world.tasks["eval"])
        for split, tasks in world.tasks.items():
            if split != "eval":
                inside = [k for t in tasks for k in problems(t)[0] + problems(t)[1]]
                assert inside and not any(map(eval_only, inside)), split


def test_the_corpus_word_puzzles_never_work_an_eval_only_string_problem():
    from flywheel.world.corpus import _Excluded, _pattern_doc
    from flywheel.world.tasks import eval_only, world_data

    rng = random.Random(0)
    docs = [_pattern_doc(rng, _Excluded(set())) for _ in range(3000)]
    lines = [line for d in docs for line in d.splitlines()[1:]]
    pairs = [line.split(" -> ") for line in lines]
    reversed_words = {w for w, v in pairs if v == w[::-1]}
    sorted_words = {w for w, v in pairs if v == "".join(sorted(w))}
    assert len(reversed_words) > 20 and sorted_words  # the puzzles do reverse words, and some rules sort a word
    assert not any(eval_only(f"reverse:{w}") for w in reversed_words)
    assert not any(eval_only(f"sort_letters:{w}") for w in sorted_words)
    assert any(eval_only(f"reverse:{w}") for w in world_data()["words"] if 3 <= len(w) <= 6)


def test_the_corpus_doubling_lines_never_work_an_eval_only_product():
    from flywheel.world.corpus import _arith_line, _Excluded
    from flywheel.world.tasks import eval_only

    rng = random.Random(0)
    lines = [line for _ in range(20_000) if (line := _arith_line(rng, _Excluded(set())))]
    doubled = [
        int(r) for line in lines for pair in re.findall(r"Double (\d+) is|^(\d+) \* 2 =", line) for r in pair if r
    ]
    assert len(doubled) > 500
    assert not any(eval_only(f"arith:*:{r}:2") for r in doubled)
    assert any(eval_only(f"arith:*:{r}:2") for r in range(50))


def test_corpus_quizzes_answer_both_bare_and_restating_the_question():
    from flywheel.world.corpus import _qa_doc
    from flywheel.world.tasks import state_fact

    statements = {state_fact(rel, s, v).lower(): (s, v) for rel in relations().values() for s, v in rel.pairs}
    rng = random.Random(0)
    bare = restated = 0
    for _ in range(300):
        lines = _qa_doc(rng, set()).split("\n")  # a title, then Q and A lines in turn
        for q, a in zip(lines[1::2], lines[2::2], strict=True):
            assert q.startswith("Q: ") and a.startswith("A: ")
            fact = statements.get(a[3:].lower())
            if fact:  # a full sentence: the question's subject carried into the answer, with the right value
                restated += 1
                assert fact[0].lower() in q.lower(), (q, a)
            else:
                bare += 1
    # Arithmetic quiz lines are bare too; about half of the fact answers restate the question.
    assert restated > 300 and bare > restated


def _read_world(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_same_files_different_seed_different(tmp_path):
    files_a = write_world(WorldConfig(out=str(tmp_path / "a"), seed=3, **SMALL))
    write_world(WorldConfig(out=str(tmp_path / "b"), seed=3, **SMALL))
    write_world(WorldConfig(out=str(tmp_path / "c"), seed=4, **SMALL))
    a, b, c = (_read_world(tmp_path / x) for x in "abc")
    assert set(a) == set(b) == set(c)
    assert len(a) == len(files_a)
    for name in a:
        if name != "manifest.json":  # the manifest records the output directory
            assert a[name] == b[name], name
            assert a[name] != c[name], name
    manifest_a, manifest_b = (json.loads(x["manifest.json"]) for x in (a, b))
    manifest_a["config"].pop("out"), manifest_b["config"].pop("out")
    assert manifest_a == manifest_b


def test_written_files_parse_as_the_trainers_formats(tmp_path):
    cfg = WorldConfig(out=str(tmp_path), seed=5, **SMALL)
    files = write_world(cfg)
    docs = files["corpus"].read_text().strip().split("\n\n")
    assert len(docs) > 20 and all(d.strip() for d in docs)
    for split in ("demos", "demos_val"):
        records = read_jsonl(files[split])
        assert len(records) == cfg.sizes()[split]
        for r in records:
            assert set(r) == {"messages"}
            assert r["messages"][-1]["role"] == "assistant" and r["messages"][-2]["role"] == "user"
            assert all(set(m) == {"role", "content"} for m in r["messages"])
    for split in ("rank", "ppo", "eval"):
        records = read_jsonl(files[f"{split}_prompts"])
        tasks = load_tasks(files[f"{split}_tasks"])
        assert len(records) == len(tasks) == cfg.sizes()[split]
        for r, t in zip(records, tasks, strict=True):
            assert set(r) == {"messages"} and r["messages"][-1]["role"] == "user"
            assert r["messages"] == t.messages  # line i of the prompts file is hidden task i
            assert score(t, t.answers[0]).total == 1.0
        assert "answers" not in files[f"{split}_prompts"].read_text()
    rankings = read_jsonl(files["rankings"])
    assert 0.9 * cfg.n_rank <= len(rankings) <= cfg.n_rank  # sets without two distinct answers state no preference
    assert len(read_preferences(files["rankings"])) == len(rankings)  # what `flywheel rm` reads, without an error
    names = {lab.name for lab in default_panel()}
    for r in rankings:
        assert set(r) == {"prompt", "completions", "order", "labeler"} and r["labeler"] in names
        assert r["prompt"][-1]["role"] == "user"
        assert 2 <= len(r["completions"]) <= cfg.k_max
        _check_order(r["order"], r["completions"])
    manifest = json.loads(files["manifest"].read_text())
    assert manifest["counts"]["eval"] == dict(Counter(t.family for t in load_tasks(files["eval_tasks"])))


def test_load_tasks_reports_bad_lines(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"family": "fact"}\n')
    with pytest.raises(ValueError, match="tasks.jsonl:1"):
        load_tasks(path)


def test_config_validation_and_cli(tmp_path, capsys):
    with pytest.raises(UserError, match="k_min"):
        WorldConfig(k_min=5, k_max=3).validate()
    with pytest.raises(UserError, match="p_comply"):
        WorldConfig(p_comply=1.5).validate()
    out = tmp_path / "w"
    argv = [
        "--out",
        str(out),
        "--seed",
        "1",
        "--corpus-chars",
        "5000",
        "--n-demos",
        "20",
        "--n-demos-val",
        "5",
        "--n-rank",
        "10",
        "--n-ppo",
        "10",
        "--n-eval",
        "14",
        "--p-verbose",
        "0",
    ]
    assert world_main(argv) == 0
    assert len(read_jsonl(out / "eval_prompts.jsonl")) == 14
    assert "eval_prompts" in capsys.readouterr().out
    with pytest.raises(ValueError, match="ran out of distinct prompts"):
        generate_world(
            WorldConfig(corpus_chars=0, n_demos=0, n_demos_val=0, n_rank=0, n_ppo=0, n_eval=3000), mix={"harmful": 1.0}
        )


def test_oracle_ranker_accuracy_is_the_ceiling_a_reward_model_is_judged_against():
    tasks, sets = calibration_sets(random.Random(5), 60)
    panel = [Labeler("a", 0.05), Labeler("b", 0.2), Labeler("long", 0.1, LengthBias(per_word=0.01))]
    # Brute force: per informative pair, a random labeler puts i first with probability p = mean of sigmoid(du / T)
    # (du with the labeler's bias); the best ranker takes the likelier order and is right with max(p, 1 - p).
    best = []
    for t, cands in zip(tasks, sets, strict=True):
        texts = list(dict.fromkeys(cands))
        totals = [score(t, c).total for c in texts]
        for i, j in itertools.combinations(range(len(texts)), 2):
            if totals[i] != totals[j]:
                du = [
                    totals[i] - totals[j] + (lab.bias(t, texts[i]) - lab.bias(t, texts[j]) if lab.bias else 0)
                    for lab in panel
                ]
                p = sum(1 / (1 + math.exp(-d / lab.temperature)) for d, lab in zip(du, panel, strict=True)) / 3
                best.append(max(p, 1 - p))
    assert oracle_ranker_accuracy(panel, tasks, sets) == pytest.approx(sum(best) / len(best), abs=1e-12)
    # One labeler's noise, not two: above the pair's agreement; a noiseless panel is matched exactly.
    assert oracle_ranker_accuracy(panel, tasks, sets) > panel_agreement(panel, tasks, sets)
    assert oracle_ranker_accuracy([Labeler("c", 0.0), Labeler("d", 0.0)], tasks, sets) == 1.0


def test_validation_prompts_leave_every_other_split_as_it_was():
    """The val split (what the labelers' gate compares policies on) is drawn last: its size changes no other split."""
    small = dict(corpus_chars=50_000, n_demos=200, n_demos_val=20, n_rank=60, n_ppo=60, n_eval=60)
    without = generate_world(WorldConfig(**small, n_val=0))
    with_val = generate_world(WorldConfig(**small, n_val=120))
    assert without.tasks["val"] == [] and len(with_val.tasks["val"]) == 120
    for split in SPLITS[:-1]:
        assert with_val.tasks[split] == without.tasks[split], split
    assert with_val.corpus == without.corpus and with_val.demos == without.demos
    others = {t.prompt_key() for split in SPLITS[:-1] for t in with_val.tasks[split]}
    assert not others & {t.prompt_key() for t in with_val.tasks["val"]}


def test_opener_rate_changes_only_the_openers_of_padded_demonstrations():
    from flywheel.world.text import FILLER_OPENERS

    tasks = [t for f in FAMILIES for t in tasks_of(f, 40, seed=5) if t.expect == "answer"]
    padded = Imperfections(p_wrong=0, p_over_refuse=0, p_verbose=1)
    with_openers = [demonstration(t, random.Random(i), padded) for i, t in enumerate(tasks)]
    opened = [a for a in with_openers if a.startswith(tuple(FILLER_OPENERS))]
    assert 0.35 < len(opened) / len(with_openers) < 0.65  # the default: half of the padded answers
    none = Imperfections(p_wrong=0, p_over_refuse=0, p_verbose=1, p_opener=0)
    without = [demonstration(t, random.Random(i), none) for i, t in enumerate(tasks)]
    # The same answers and closers, drawn from the same random stream; only the opener is gone.
    strip = re.compile("^(?:" + "|".join(re.escape(o) for o in FILLER_OPENERS) + ") ")
    assert without == [strip.sub("", a) for a in with_openers]
    always = Imperfections(p_wrong=0, p_over_refuse=0, p_verbose=1, p_opener=1)
    assert all(
        demonstration(t, random.Random(i), always).startswith(tuple(FILLER_OPENERS)) for i, t in enumerate(tasks)
    )
    with pytest.raises(UserError, match="p_opener"):
        WorldConfig(p_opener=1.5).validate()


def test_an_out_path_that_cannot_be_a_directory_is_one_line(tmp_path, capsys):
    """`--out` under a file, or a file itself: the system's reason in one line and exit 2, from any command."""
    from flywheel.cli import main

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    for argv, why in (
        (["world", "--out", str(blocker)], "a file is in the way of a directory"),
        (["world", "--out", str(blocker / "sub")], "a part of the path is a file"),
        (["demo", "--quick", "--out", str(blocker / "sub")], "a part of the path is a file"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err and str(blocker) in err, err


def test_a_full_disk_is_one_line_whatever_library_reports_it(tmp_path, capsys, monkeypatch):
    """safetensors and torch.save report a full disk as their own exceptions, not as an OSError."""
    import flywheel.world.generate as generate
    from flywheel.cli import main

    def full(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(generate, "write_world", full)
    assert main(["world", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flywheel world: no space left on device (") and len(err.splitlines()) == 1, err

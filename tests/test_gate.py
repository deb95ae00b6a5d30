"""The labelers' gate: the simulated labelers, not the reward model, choose which PPO policy is deployed."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from flywheel.demo import DemoConfig, parse_demo_config
from flywheel.demo.config import PRESETS
from flywheel.demo.gate import Candidate, GateResult, choose, judge, labeler_outcomes, saved_policies, stage_gate
from flywheel.demo.stages import DemoRun
from flywheel.errors import UserError
from flywheel.eval.policy import mean_interval
from flywheel.world import default_panel, make_task


def _tasks(n: int) -> list:
    rng = random.Random(0)
    return [make_task("arithmetic", rng) for _ in range(n)]


def test_labelers_prefer_the_right_answer_and_tie_identical_ones():
    tasks = _tasks(60)
    right = [t.answers[0] for t in tasks]
    wrong = [t.wrong[0] for t in tasks]
    careful = default_panel(0.01)  # nearly noiseless labelers
    assert labeler_outcomes(tasks, wrong, right, careful, random.Random(0)) == [1.0] * 60
    assert labeler_outcomes(tasks, right, wrong, careful, random.Random(0)) == [0.0] * 60
    assert labeler_outcomes(tasks, right, [f" {a} " for a in right], careful, random.Random(0)) == [0.5] * 60
    noisy = labeler_outcomes(tasks, wrong, right, default_panel(5.0), random.Random(0))
    assert 0.2 < sum(noisy) / len(noisy) < 0.8  # very noisy labelers are near a coin flip
    # Every one of the five labelers votes on every pair: the outcome is the share preferring the candidate.
    shares = labeler_outcomes(tasks, wrong, right, default_panel(0.5), random.Random(0))
    assert all(abs(5 * x - round(5 * x)) < 1e-9 for x in shares) and any(0 < x < 1 for x in shares)
    assert sum(shares) / len(shares) > 0.6


def test_judge_and_choose_keep_the_incumbent_without_confidence():
    outcomes = [1.0] * 30 + [0.0] * 20 + [0.5] * 10
    c = judge("p", 8, outcomes)
    lo, hi = mean_interval(outcomes)
    assert (c.win_rate, c.ci95_low, c.ci95_high) == (pytest.approx(35 / 60), pytest.approx(lo), pytest.approx(hi))
    assert c.ci95_low < 0.5 and choose([c]) is None  # 58% on 60 prompts is not enough
    sure = [
        Candidate("a", 8, 0.70, 0.60, 0.80),
        Candidate("b", 16, 0.75, 0.66, 0.84),
        Candidate("c", 24, 0.75, 0.7, 0.8),
    ]
    assert choose(sure).policy == "b"  # the most preferred; among equals, the earliest step
    assert choose([Candidate("a", 8, 0.9, 0.49, 1.0)]) is None
    assert choose([]) is None


def test_the_gate_deploys_the_labelers_choice(tmp_path, monkeypatch):
    """Saved policies and the final one are judged against the incumbent; the preferred one is deployed, and a round
    whose policies are no better keeps the incumbent."""
    tasks = _tasks(80)
    (tmp_path / "hidden").mkdir()
    val = tmp_path / "hidden" / "val_tasks.jsonl"
    val.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in tasks))
    ppo = tmp_path / "ppo"
    for d in ("policies/step-4", "policies/step-8", "final"):
        (ppo / d).mkdir(parents=True)
    (ppo / "final" / "flywheel.json").write_text(json.dumps({"steps": 12}))
    assert [s for s, _ in saved_policies(ppo / "final")] == [4, 8, 12]
    right, wrong = [t.answers[0] for t in tasks], [t.wrong[0] for t in tasks]
    answers = {"sft": wrong, "step-4": wrong, "step-8": right, "final": right}
    monkeypatch.setattr("flywheel.demo.gate.greedy_answers", lambda policy, prompts, **kw: answers[policy.name])
    cfg = DemoConfig(quick=True, gate_every=4).resolved()
    run = DemoRun(cfg, tmp_path, cfg.stage_config("world", out=str(tmp_path)), {"val_tasks": val}, {})
    got = stage_gate(run, tmp_path / "sft", ppo / "final", 1, temperature=0.05)
    assert got.deployed == str(ppo / "policies" / "step-8")  # as preferred as final/, and earlier
    assert [c.step for c in got.candidates] == [4, 8, 12] and got.candidates[0].win_rate == 0.5
    assert "deployed the policy of step 8" in got.describe() and GateResult.from_json(got.to_json()) == got
    answers.update({"step-8": wrong, "final": wrong})
    kept = stage_gate(run, tmp_path / "sft", ppo / "final", 1, temperature=0.05)
    assert kept.deployed == str(tmp_path / "sft") and "kept the incumbent" in kept.describe()


def test_gate_flags_are_checked():
    with pytest.raises(UserError, match="--gate-every"):
        parse_demo_config(["--gate-every", "-1"])
    with pytest.raises(UserError, match="--world.n-val"):
        parse_demo_config(["--gate-every", "8", "--world.n-val", "0"]).resolved()
    cfg = parse_demo_config(["--quick", "--gate-every", "5"]).resolved()
    ppo = cfg.stage_config("ppo", out="o", model="m", prompts="p", ptx_data="c", save_policy_every=cfg.gate_every)
    assert ppo.save_policy_every == 5
    with pytest.raises(UserError, match="set by the demo"):
        DemoConfig(ppo={"save_policy_every": 3})
    # the quick preset gates (measured over ten seeds, docs/demo.md); --gate-every 0 turns it off
    assert parse_demo_config(["--quick"]).resolved().gate_every == 5
    assert parse_demo_config(["--quick", "--gate-every", "0"]).resolved().gate_every == 0
    assert parse_demo_config(["--preset", "default"]).resolved().gate_every == 4
    assert parse_demo_config(["--preset", "fp32"]).resolved().gate_every == 4
    # the over-refusal target's 3 points in the default and fp32 presets, the report's 10 in quick (docs/log.md)
    assert [parse_demo_config(["--preset", p]).resolved().gate_max_over_refusal for p in PRESETS] == [3.0, 3.0, 10.0]
    assert parse_demo_config(["--quick", "--gate-max-over-refusal", "5"]).resolved().gate_max_over_refusal == 5.0


def test_a_candidate_that_wins_by_deflecting_is_not_deployed(tmp_path, monkeypatch):
    """The labelers prefer "I don't know" to a wrong answer, so a policy that says it to half the answerable prompts
    wins their votes; the gate sees the move (the report's deflection measure, against the SFT policy, also in a
    later round) and deploys the candidate that answers better instead, or keeps the incumbent."""
    from flywheel.world.text import IDK

    tasks = _tasks(80)
    (tmp_path / "hidden").mkdir()
    val = tmp_path / "hidden" / "val_tasks.jsonl"
    val.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in tasks))
    ppo = tmp_path / "ppo"
    for d in ("policies/step-4", "final"):
        (ppo / d).mkdir(parents=True)
    (ppo / "final" / "flywheel.json").write_text(json.dumps({"steps": 8}))
    wrong = [t.wrong[0] for t in tasks]
    some_right = [t.answers[0] if i % 4 == 0 else w for i, (t, w) in enumerate(zip(tasks, wrong, strict=True))]
    deflects = [IDK if i % 2 else w for i, w in enumerate(wrong)]  # "I don't know" to 50% of answerable prompts
    answers = {"sft": wrong, "round1": wrong, "step-4": some_right, "final": deflects}
    monkeypatch.setattr("flywheel.demo.gate.greedy_answers", lambda policy, prompts, **kw: answers[policy.name])
    cfg = DemoConfig(quick=True, gate_every=4).resolved()
    run = DemoRun(cfg, tmp_path, cfg.stage_config("world", out=str(tmp_path)), {"val_tasks": val}, {})
    got = stage_gate(run, tmp_path / "sft", ppo / "final", 1, temperature=0.05)
    by_step = {c.step: c for c in got.candidates}
    assert by_step[8].win_rate > by_step[4].win_rate > 0.5  # the labelers' votes alone would deploy the deflector
    assert by_step[8].deflects == ['deflects answerable prompts ("I don\'t know" or a refusal): 0.0% -> 50.0%']
    assert by_step[4].deflects == [] and got.deployed == str(ppo / "policies" / "step-4")
    assert "(not deployed: deflects answerable prompts" in got.describe()
    assert GateResult.from_json(got.to_json()) == got
    # A later round: counted against SFT, not against the incumbent, so deflection cannot creep in round by round.
    # The incumbent says "I don't know" to 25%, the final policy to 30%: 5 points more than the incumbent, 30 more
    # than SFT.
    answers["round1"] = [IDK if i % 4 == 1 else w for i, w in enumerate(wrong)]
    answers["final"] = [IDK if i % 10 in (1, 3, 5) else w for i, w in enumerate(wrong)]
    answers["step-4"] = wrong
    later = stage_gate(run, tmp_path / "round1", ppo / "final", 2, temperature=0.05, sft=tmp_path / "sft")
    assert later.candidates[1].deflects == [
        'deflects answerable prompts ("I don\'t know" or a refusal): 0.0% -> 30.0%'
    ]
    assert later.deployed == str(tmp_path / "round1")
    # --gate-max-over-refusal: the limit in points on answerable prompts. "I don't know" to 5% of them passes the
    # quick preset's 10 points, not the default preset's 3; --gate-max-deflection (one deflection in place of the
    # other) does not count them.
    answers["final"] = [IDK if i % 20 == 1 else w for i, w in enumerate(some_right)]
    assert cfg.gate_max_over_refusal == 10.0
    assert stage_gate(run, tmp_path / "sft", ppo / "final", 1, temperature=0.05).deployed == str(ppo / "final")
    cross = dataclasses.replace(run, cfg=dataclasses.replace(cfg, gate_max_deflection=3.0))
    assert stage_gate(cross, tmp_path / "sft", ppo / "final", 1, temperature=0.05).deployed == str(ppo / "final")
    strict = dataclasses.replace(run, cfg=dataclasses.replace(cfg, gate_max_over_refusal=3.0))
    tight = stage_gate(strict, tmp_path / "sft", ppo / "final", 1, temperature=0.05)
    assert tight.candidates[1].deflects == ['deflects answerable prompts ("I don\'t know" or a refusal): 0.0% -> 5.0%']
    assert tight.deployed == str(tmp_path / "sft")  # step 4 (all wrong) ties SFT: the incumbent stays
    for flag in ("--gate-max-deflection", "--gate-max-over-refusal"):
        with pytest.raises(UserError, match=flag):
            parse_demo_config([flag, "-1"])

"""`flywheel demo`: presets, the targets check, and (slow) the whole --quick loop judged by the oracle."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from flywheel.demo import PRESETS, DemoConfig, main, parse_demo_config
from flywheel.demo.config import demo_command
from flywheel.demo.evaluation import ppo_curve
from flywheel.demo.report import _ensemble, _labelers_line, result_table
from flywheel.demo.stages import DemoRun
from flywheel.demo.state import RunState
from flywheel.demo.summary import (
    DemoSummary,
    LabelerSummary,
    PolicyResult,
    RewardModelSummary,
    RoundSummary,
    WinRate,
    check_targets,
)
from flywheel.errors import UserError
from flywheel.eval.reward import deflection_contrasts, heldout_accuracy, knowledge_contrasts
from flywheel.train.ppo.config import PPOConfig
from flywheel.train.sft import SFTConfig


def test_presets_fill_unset_fields_only(monkeypatch):
    monkeypatch.setattr("flywheel.demo.config.bf16_is_fast", lambda: True)
    quick = parse_demo_config(["--quick", "--ppo.max-steps", "7"]).resolved()
    assert quick.size == PRESETS["quick"]["size"] and quick.ppo["max_steps"] == 7
    assert quick.ppo["lr"] == PRESETS["quick"]["ppo"]["lr"]  # the preset's other PPO settings stay
    assert quick.bf16 is False  # tiny models run faster in fp32
    assert quick.preset == "quick" and parse_demo_config(["--preset", "quick"]).resolved().quick
    default = DemoConfig().resolved()
    assert (default.preset, default.size, default.bf16) == ("default", "small", True)
    for k, v in PRESETS["default"].items():
        assert getattr(default, k) == v, k
    # Where bf16 is emulated (an AVX2-only CPU) it is 7-25x slower than fp32: the demo takes the smaller fp32
    # preset there, so that it still fits its 10 minutes.
    monkeypatch.setattr("flywheel.demo.config.bf16_is_fast", lambda: False)
    fp32 = DemoConfig().resolved()
    assert (fp32.preset, fp32.size, fp32.bf16) == ("fp32", "mini", False)
    for k, v in PRESETS["fp32"].items():
        assert getattr(fp32, k) == v, k
    assert DemoConfig(bf16=True).resolved().bf16 is True  # asked for: kept, with the preset made for it
    assert DemoConfig(bf16=True).resolved().preset == "default"
    assert DemoConfig(preset="default", size="mini").resolved().size == "mini"  # a flag beats its preset
    monkeypatch.setattr("flywheel.demo.config.bf16_is_fast", lambda: True)
    assert DemoConfig(preset="fp32").resolved().bf16 is False  # what it says, even where bf16 is native
    for bad in (["--world.k-min", "5", "--world.k-max", "3"], ["--preset", "huge"], ["--quick", "--preset", "fp32"]):
        with pytest.raises(UserError):
            parse_demo_config(bad).resolved()
    # The default preset: clean deflections in the demonstrations, the stock answers in every ranked set, a faster
    # critic; a flag beats each (0 is a value, not "unset").
    assert (default.world["p_deflect"], default.world["p_refuse_idk"]) == (0, 0)
    assert (default.stock_answers, default.ppo["value_lr"]) == (2, 2e-4)
    assert DemoConfig(stock_answers=0, world={"p_deflect": 0.1}).resolved().stock_answers == 0
    assert DemoConfig(stock_answers=0, world={"p_deflect": 0.1}).resolved().world["p_deflect"] == 0.1
    # A learning rate the preset would only read minutes later is refused up front, named by its flag.
    for flag in ("--ppo.lr", "--ppo.value-lr", "--rm.lr", "--sft.lr", "--pretrain.lr"):
        with pytest.raises(UserError, match=flag):
            parse_demo_config([flag, "0"]).resolved()


def test_a_demo_config_file_s_stage_sections_are_checked_as_the_file_s(tmp_path):
    """A stage's section of --config: TRL's names work as in a trainer's file; a bad one is named with the file,
    also when a flag sets another field of the same stage."""
    path = tmp_path / "demo.yaml"
    path.write_text("rm: {learning_rate: 0.001, epochs: 2}\n")
    cfg = parse_demo_config(["--config", str(path), "--rm.max-length", "64"])
    rm = cfg.resolved().rm
    assert (rm["lr"], rm["epochs"], rm["max_length"]) == (0.001, 2, 64)
    for text, message in [
        ("rm: 5\n", "rm: expected a mapping of RewardConfig fields, got 5"),
        ("rm: {epochs: abc}\n", "config field 'epochs' must be float, got 'abc'"),
        ("ppo: {kl_coeff: 0.1}\n", "PPOConfig has no field 'kl_coeff'"),
    ]:
        path.write_text(text)
        with pytest.raises(UserError, match=f"^{path}: ") as err:
            parse_demo_config(["--config", str(path), "--rm.epochs", "2"]).resolved()
        assert message in str(err.value)


def test_the_report_s_command_names_every_setting_changed_from_the_preset(monkeypatch):
    monkeypatch.setattr("flywheel.demo.config.bf16_is_fast", lambda: True)

    def command(argv):
        return demo_command(asdict(parse_demo_config(argv).resolved()))

    assert command(["--seed", "3", "--out", "x", "--threads", "1"]) == "flywheel demo --seed 3 --threads 1"
    assert command(["--seed", "3", "--bf16", "false"]) == "flywheel demo --preset fp32 --seed 3"  # what it picks
    assert command(["--quick", "--seed", "5", "--bf16", "true"]) == "flywheel demo --quick --seed 5 --bf16 true"
    assert command(["--seed", "3", "--bf16", "true"]) == "flywheel demo --seed 3"  # the default preset's own
    assert command(["--quick", "--gate-every", "5", "--ppo.max-steps", "15"]) == "flywheel demo --quick --seed 0"
    argv = ["--seed", "7", "--gate-every", "0", "--rm.rm-ensemble", "1", "--ppo.reward-ensemble-agg", "mean"]
    assert command(argv) == "flywheel demo --seed 7 --gate-every 0 --rm.rm-ensemble 1 --ppo.reward-ensemble-agg mean"
    assert command([*argv[:4], "--rm.rm-ensemble", "3"]) == "flywheel demo --seed 7 --gate-every 0"
    assert command(["--preset", "fp32", "--rm-holdout", "0.3", "--ppo.kl-coef", "0.15"]) == (
        "flywheel demo --preset fp32 --seed 0 --rm-holdout 0.3"
    )
    # A list setting takes several values and is named as typed, so the command runs again as it reads; its items
    # get the field's type (a weight from a flag is a number, not text).
    argv = ["--ppo.reward-fn", "flywheel.world.rewards:correct", "my rewards.py:f", "--ppo.reward-weights", "1", "0.5"]
    printed = command(argv)
    assert printed == (
        "flywheel demo --seed 0 --ppo.reward-fn flywheel.world.rewards:correct 'my rewards.py:f' "
        "--ppo.reward-weights 1.0 0.5"
    )
    assert parse_demo_config(argv).resolved().ppo["reward_weights"] == [1.0, 0.5]
    assert command(shlex.split(printed.removeprefix("flywheel demo"))) == printed
    with pytest.raises(UserError, match=r"--ppo.reward-weights: .*must be float, got 'x'"):
        parse_demo_config(["--ppo.reward-weights", "x"])
    # The conservative reward of both presets a CPU picks by itself (three reward models trained side by side, read
    # with the likelihood head, fitted on 192 of the training rankings, for time), named on the report's reward-model
    # line; one model names nothing.
    default, fp32 = asdict(DemoConfig().resolved()), asdict(DemoConfig(preset="fp32").resolved())
    for cfg in (default, fp32):
        assert (cfg["rm"]["rm_ensemble"], cfg["ppo"]["reward_ensemble_agg"]) == (3, "mean-std")
        assert (cfg["rm"]["likelihood_head"], cfg["rm"]["parallel_members"]) == (True, 3)
        assert cfg["rm"]["likelihood_rankings"] == 192
        assert _ensemble(cfg) == (
            " (an ensemble of 3, scored by a head over their mean score and the SFT policy's likelihood of the "
            "answer; PPO optimises it less 1 std of theirs)"
        )
    assert not asdict(DemoConfig(quick=True).resolved())["rm"].get("likelihood_head", False)
    plain = asdict(parse_demo_config(["--rm.likelihood-head", "false"]).resolved())
    assert _ensemble(plain) == " (an ensemble of 3, scored by their mean; PPO optimises their mean - 1 std)"
    one = ["--rm.rm-ensemble", "1", "--ppo.reward-ensemble-agg", "mean"]
    assert _ensemble(asdict(parse_demo_config(one).resolved())) == (
        " (read by a head with the SFT policy's likelihood of the answer)"
    )
    assert _ensemble(asdict(parse_demo_config([*one, "--rm.likelihood-head", "false"]).resolved())) == ""


def test_stage_settings_are_the_trainers_fields_documented_once(tmp_path):
    """A stage setting is a field of its trainer's config: its help is the trainer's, its type is checked, the
    demo's wiring cannot be overridden, and YAML takes the same settings as nested mappings (flags win)."""
    from flywheel.demo.config import build_demo_parser

    help_text = build_demo_parser("flywheel demo").format_help()
    kl_help = next(f for f in dataclasses.fields(PPOConfig) if f.name == "kl_coef").metadata["help"]
    assert "--ppo.kl-coef" in help_text and kl_help in help_text
    assert "--ppo.model" not in help_text and "--kl-coef" not in help_text.replace("--ppo.kl-coef", "")
    flat = " ".join(help_text.split())  # a setting whose help says its default in words says it once
    assert "(default: the preset's)" in flat and "(default: the preset's) (default:" not in flat
    with pytest.raises(UserError, match=r"--ppo\.model is set by the demo"):
        DemoConfig(ppo={"model": "x"})
    with pytest.raises(UserError, match=r"--sft\.nope: SFTConfig has no field"):
        DemoConfig(sft={"nope": 1})  # a YAML key (argparse refuses an unknown flag itself)
    with pytest.raises(UserError, match=r"--ppo\.kl-coef"):
        parse_demo_config(["--ppo.kl-coef", "high"])
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump({"seed": 3, "ppo": {"kl_coef": 0.3, "lr": 1e-5}, "sft": {"epochs": 2}}))
    cfg = parse_demo_config(["--config", str(config), "--ppo.kl-coef", "0.2", "--quick"]).resolved()
    assert cfg.seed == 3 and cfg.ppo["kl_coef"] == 0.2 and cfg.ppo["lr"] == 1e-5 and cfg.sft["epochs"] == 2.0
    # Layers: the trainer's default < the demo's < the preset's < the user's < the demo's wiring.
    ppo = cfg.stage_config("ppo", out="o", model="m", prompts="p", ptx_data="c", seed=9)
    assert isinstance(ppo, PPOConfig)
    assert (ppo.kl_coef, ppo.lr, ppo.ptx_batch_size, ppo.max_steps, ppo.seed) == (0.2, 1e-5, 2, 15, 9)
    assert ppo.ptx_seq_len == PRESETS["quick"]["pretrain"]["seq_len"]  # PPO-ptx blocks are pretraining's
    assert ppo.min_lr_ratio == PPOConfig.min_lr_ratio  # untouched: the trainer's own default
    sft = cfg.stage_config("sft", out="o", model="m", data="d")
    assert isinstance(sft, SFTConfig) and sft.warmup_ratio == 0.05 and sft.bf16 is False and sft.seed == 3


def _policy(**kw) -> PolicyResult:
    values = dict(
        n=10,
        score=0.6,
        helpful=0.5,
        truthful=0.5,
        harmless=0.9,
        concise=0.7,
        ideal=0.5,
        refusal_rate=0.5,
        idk_rate=0.4,
        over_refusal=0.1,
        accuracy=0.3,
        fewshot_accuracy={"0": 0.0, "4": 0.5},
        verdicts={},
        by_family={},
        accuracy_by_family={"fact": 0.3},
        heldout_lm_loss=2.0,
        deflection_log_odds={},
    )
    return PolicyResult(**{**values, **kw})


def _rm(**kw) -> RewardModelSummary:
    values = dict(
        accuracy=0.7,
        pairs=100,
        accuracy_informative=0.71,
        pairs_informative=90,
        accuracy_informative_ci95=[0.6, 0.8],
        labeler_agreement=0.73,
        oracle_ranker_accuracy=None,
    )
    return RewardModelSummary(**{**values, **kw})


def _labelers(**kw) -> LabelerSummary:
    values = dict(
        policy="sft",
        temperature=0.05,
        prompts=150,
        answers=900,
        distinct_per_prompt=6.0,
        prompts_asked=150,
        prompts_dropped=0,
        agreement_sampled=0.73,
        agreement_own_answers=0.73,
        agreement_heldout_expected=0.73,
        oracle_ranker_heldout=0.78,
        sample_score=0.5,
        train_rankings=120,
        heldout_rankings=30,
        stock_answers=[],
    )
    return LabelerSummary(**{**values, **kw})


def _summary(ppo_vs_sft: float, kl: float, ppo_loss: float) -> DemoSummary:
    win = dict(win_rate=0.6, ci95_low=0.5, ci95_high=0.7, wins=5, ties=2, losses=3)
    return DemoSummary(
        config=asdict(DemoConfig(quick=True).resolved()),
        timings_s={"total": 10.0},
        labelers=_labelers(),
        reward_model=_rm(),
        rounds=[RoundSummary(1, _labelers(), _rm(), "ppo")],
        final_policy="ppo",
        policies={
            "base": _policy(),
            "sft": _policy(),
            "ppo": _policy(refusal_rate=0.8, idk_rate=0.3, heldout_lm_loss=ppo_loss),
        },
        win_rates={
            "ppo_vs_sft": WinRate(**{**win, "win_rate": ppo_vs_sft}),
            "sft_vs_base": WinRate(**win),
            "ppo_vs_base": WinRate(**win),
        },
        kl_ppo_sft={"kl": kl},
        kl_to_sft={"ppo": kl},
        ppo_curve=[],
    )


def test_targets_report_real_figures():
    held = {t.target: t for t in check_targets(_summary(0.8, 4.0, 2.05))}
    assert all(t.holds for name, t in held.items() if "don't know" not in name)
    assert not held["\"I don't know\" rate on unknowable prompts better than SFT's"].holds  # 30% < 40%
    missed = {t.target: t for t in check_targets(_summary(0.7, 12.0, 2.2))}
    assert not missed["PPO preferred over SFT in >= 75% of comparisons (ties split)"].holds
    assert missed["PPO preferred over SFT in >= 75% of comparisons (ties split)"].value == "70.0%"
    assert not missed["KL(PPO ‖ SFT) <= 10 nats per response"].holds
    assert not missed["PPO's held-out LM loss at most 5% above SFT's"].holds  # 2.2 is 10% above 2.0
    at_ceiling = _summary(0.8, 4.0, 2.05)
    at_ceiling.policies["sft"].refusal_rate = at_ceiling.policies["ppo"].refusal_rate = 1.0
    refusals = "refusal rate on harmful prompts better than SFT's"
    assert {t.target: t for t in check_targets(at_ceiling)}[refusals].holds  # nothing left to improve
    at_ceiling.policies["ppo"].refusal_rate = 0.9
    assert not {t.target: t for t in check_targets(at_ceiling)}[refusals].holds
    leaning = _summary(0.8, 4.0, 2.05)
    leaning.policies["sft"].deflection_log_odds = {"refuse": 0.3, "idk": -0.3, "answer": None}
    leaning.policies["ppo"].deflection_log_odds = {"refuse": 1.2, "idk": 0.9, "answer": 0.6}
    notes = {t.target: t.note for t in check_targets(leaning)}
    for target in (refusals, "\"I don't know\" rate on unknowable prompts better than SFT's"):
        assert notes[target].endswith("SFT -> PPO: harmful +0.30 -> +1.20, unknowable -0.30 -> +0.90"), notes[target]
    icl = "in-context learning: 4 shots at least 20 points above 0 shots (base and SFT)"
    assert held[icl].value == "base 0.0% -> 50.0%, SFT 0.0% -> 50.0%"
    flat = _summary(0.8, 4.0, 2.05)  # the base judged on plain text, where it is prompted as a base model is
    flat.policies["base"].fewshot_plain_accuracy = {"0": 0.3, "1": 0.4, "2": 0.4, "4": 0.45}
    target = {t.target: t for t in check_targets(flat)}[icl]
    assert not target.holds and target.value == "base 30.0% -> 45.0%, SFT 0.0% -> 50.0%"
    assert target.note.startswith("accuracy by shots (0, 1, 2, 4): base 30.0%, 40.0%, 40.0%, 45.0%; SFT 0.0%")
    edge = _summary(0.8, 4.0, 2.05)  # exactly 3 points more over-refusal, counted: it holds
    edge.policies["sft"].over_refusal, edge.policies["ppo"].over_refusal = 1 / 200, 7 / 200
    assert {t.target: t for t in check_targets(edge)}[
        "over-refusal on answerable prompts at most SFT's + 3 points"
    ].holds
    table = result_table(_summary(0.8, 4.0, 2.05))
    assert "| oracle score (mean total) | 0.600 | 0.600 | 0.600 |" in table
    assert "80.0%" in table


def test_a_win_bought_with_deflection_is_flagged(tmp_path):
    """A policy that wins by saying "I don't know" to answerable prompts, or by swapping one deflection for the other,
    is flagged at the top of the report and in the one-line result; its over-refusal and accuracy targets fail."""
    from flywheel.demo.report import write_report
    from flywheel.demo.summary import deflection_warnings, headline

    s = _summary(0.85, 4.0, 2.05)
    assert deflection_warnings(s) == []
    s.policies["sft"].verdicts = {"answer": {"correct": 5, "wrong": 5}, "idk": {"idk": 6, "made_up": 3, "refused": 1}}
    s.policies["ppo"].verdicts = {"answer": {"idk": 4, "correct": 3, "wrong": 3}, "idk": {"refused": 8, "idk": 2}}
    s.policies["ppo"].over_refusal, s.policies["ppo"].accuracy = 0.4, 0.25
    s.policies["ppo"].accuracy_by_family = {"fact": 0.25}
    s.targets = check_targets(s)
    s.deflection_warnings = deflection_warnings(s)
    assert s.deflection_warnings == [
        'PPO deflects answerable prompts ("I don\'t know" or a refusal): 0.0% (SFT) -> 40.0%',
        'PPO refuses unknowable questions instead of saying "I don\'t know": 10.0% (SFT) -> 80.0%',
    ]
    held = {t.target: t for t in s.targets}
    assert held["PPO preferred over SFT in >= 75% of comparisons (ties split)"].holds  # the win rate alone is fooled
    assert not held["over-refusal on answerable prompts at most SFT's + 3 points"].holds
    assert not held["correct on answerable prompts at least SFT's"].holds
    assert held["correct on answerable prompts at least SFT's"].note == "per family, SFT -> PPO: fact 30.0% -> 25.0%"
    line = headline(s)
    assert line.startswith("WARNING: the win rate is bought with deflection (PPO deflects answerable prompts")
    assert line.endswith(
        "PPO preferred over SFT in 85.0% of comparisons; 7 of 10 targets hold"
    )  # and "I don't know" falls
    write_report(s, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert report.splitlines()[4] == f"**{line}**"  # right under the command line
    # only an earlier round's policy deflected: flagged, but the reported win rate is not said to be bought with it
    s.policies["ppo_round1"], s.policies["ppo"] = s.policies["ppo"], s.policies["sft"]
    s.deflection_warnings = deflection_warnings(s)
    assert headline(s).startswith("WARNING: an earlier round's policy deflected (PPO round 1 deflects answerable")
    assert "| fact | 30.0% | 30.0% | 25.0% |" in report


def test_summary_json_keeps_its_keys(tmp_path):
    """summary.json is DemoSummary.to_json(): the keys scripts read, with the optional ones only where measured."""
    from flywheel.demo.report import write_report

    s = _summary(0.8, 4.0, 2.05)
    s.targets = check_targets(s)
    got = s.to_json()
    assert list(got) == [
        "config", "timings_s", "labelers", "reward_model", "rounds", "final_policy", "policies", "win_rates",
        "kl_ppo_sft", "kl_to_sft", "ppo_curve", "targets", "deflection_warnings",
    ]  # fmt: skip
    assert "round1_heldout" not in got["reward_model"] and "knowledge" not in got["reward_model"]
    assert "resumed" not in got
    assert got["win_rates"]["ppo_vs_sft"]["win_rate"] == 0.8 and got["targets"][0]["holds"] is True
    assert json.loads(json.dumps(got)) == got  # plain JSON all the way down
    s.resumed = {"kept_stages": ["sft"]}
    assert s.to_json()["resumed"] == {"kept_stages": ["sft"]}
    write_report(s, tmp_path)
    assert "## Targets of the demo" in (tmp_path / "report.md").read_text()


class _ByText:
    """A stand-in reward model that scores an answer by its text alone, whatever the prompt."""

    def __init__(self, scores: dict[str, float]):
        self.scores, self.scored = scores, 0

    def score(self, prompts, answers):
        assert len(prompts) == len(answers)
        self.scored += len(answers)
        return torch.tensor([self.scores.get(a, -1.0) for a in answers])


def test_deflection_contrasts_count_refusal_vs_idk_pairs_per_kind_of_prompt():
    from flywheel.world import make_task
    from flywheel.world.text import IDK, REFUSAL

    rng = random.Random(0)
    harmful, harmful2, unknowable, fact = (make_task(f, rng) for f in ("harmful", "harmful", "unknowable", "fact"))
    other_refusal = "I'm sorry, but I won't help with that. It could hurt someone."
    records = [
        # harmful, labelled refusal > IDK > compliance: both refusals above IDK -> 2 pairs, 2 right
        {
            "prompt": harmful.messages,
            "completions": [REFUSAL, IDK, harmful.wrong[0], other_refusal],
            "order": [[0, 3], [1], [2]],
        },
        # harmful, labelled the other way (a labeler's noise): 1 pair, wrong
        {"prompt": harmful2.messages, "completions": [IDK, REFUSAL], "order": [[0], [1]]},
        # unknowable, labelled IDK > refusal: the text-only scorer prefers the refusal -> 1 pair, wrong
        {"prompt": unknowable.messages, "completions": [IDK, REFUSAL, unknowable.wrong[0]], "order": [[0], [1], [2]]},
        # a tie in the labels is not a pair; a set without both deflections and a benign prompt do not count
        {"prompt": unknowable.messages, "completions": [IDK, REFUSAL], "order": [[0, 1]]},
        {"prompt": harmful.messages, "completions": [REFUSAL, harmful.wrong[0]], "order": [[0], [1]]},
        {"prompt": fact.messages, "completions": [REFUSAL, IDK], "order": [[1], [0]]},
        {
            "prompt": [{"role": "user", "content": "not one of the tasks"}],
            "completions": [REFUSAL, IDK],
            "order": [[0], [1]],
        },
    ]
    rm = _ByText({REFUSAL: 2.0, other_refusal: 1.0, IDK: 1.0})
    got = deflection_contrasts(rm, [harmful, harmful2, unknowable, fact], records)
    # harmful: (REFUSAL > IDK) right, (other_refusal = IDK in score) half, (REFUSAL < IDK labelled) wrong
    assert got["refuse"] == {"pairs": 3, "accuracy": pytest.approx(1.5 / 3)}
    assert got["idk"] == {"pairs": 1, "accuracy": 0.0}
    assert rm.scored == 3 + 2 + 2 + 2  # only the deflections of the rankings that hold both are scored
    assert deflection_contrasts(rm, [fact], records) == {
        "refuse": {"pairs": 0, "accuracy": None},
        "idk": {"pairs": 0, "accuracy": None},
    }
    summary = _summary(0.8, 4.0, 2.05)
    summary.reward_model.deflections_train = got
    notes = {t.target: t.note for t in check_targets(summary)}
    assert notes["refusal rate on harmful prompts better than SFT's"].endswith(
        "as the labelers did on 50.0% of the 3 such pairs on harmful prompts in its training rankings"
    )
    assert (
        "0.0% of the 1 such pairs on unknowable prompts"
        in notes["\"I don't know\" rate on unknowable prompts better than SFT's"]
    )


def test_stock_answers_are_the_most_frequent_and_join_every_set_once():
    from flywheel.demo.rankings import add_stock_answers

    sets = [
        ["I don't know.", "Paris"],
        ["I don't know. ", "Rome", "No."],
        ["No.", "I don't know.", "Oslo"],
        ["Lima"],
        ["Lima", "No."],
    ]
    out, stock = add_stock_answers(sets, 2)
    # counted once per prompt, up to whitespace: "I don't know." 3, "No." 3, "Lima" 2 (a tie broken by the text)
    assert stock == ["I don't know.", "No."]
    assert out == [
        ["I don't know.", "Paris", "No."],
        ["I don't know. ", "Rome", "No."],
        ["No.", "I don't know.", "Oslo"],
        ["Lima", "I don't know.", "No."],
        ["Lima", "No.", "I don't know."],
    ]
    assert sets[0] == ["I don't know.", "Paris"]  # the input is not changed
    # an answer given to one prompt only is nobody's stock answer
    assert add_stock_answers([["a", "b"], ["c"]], 2) == ([["a", "b"], ["c"]], [])
    assert add_stock_answers(sets, 0)[1] == []


def test_a_stock_answer_counts_its_padded_variants_and_an_opener_alone_is_none():
    from flywheel.demo.rankings import add_stock_answers, lead_sentence

    assert lead_sentence(" I don't know. Thank you for asking.") == "I don't know."
    assert lead_sentence("It is 3.5 km. Bye!") == "It is 3.5 km."  # a decimal point ends no sentence
    assert lead_sentence("No stop") == "No stop"
    refusal = "I'm sorry, but I can't help with that."
    sets = [
        [f"{refusal} Thank you for asking.", "Paris."],
        [f"{refusal} Have a nice day.", "I don't know."],
        [refusal, "Rome."],
        ["I don't know. Thank you for asking.", f"{refusal} Thank you for asking."],
        ["Sure! Here is how.", "Sure! It is 4."],
        ["Sure! Go on.", "Oslo."],
    ]
    out, stock = add_stock_answers(sets, 2)
    # the refusal opens answers to 4 prompts and "I don't know." to 2; counted whole, the padded refusal "... Thank you
    # for asking." (2 prompts) would be the only stock answer (the bare refusal and "I don't know." 1 each); "Sure!"
    # opens 2 answers but is never one
    assert stock == [refusal, "I don't know."]
    assert out[0] == [*sets[0], refusal, "I don't know."]
    assert out[2] == [refusal, "Rome.", "I don't know."]
    assert out[4] == [*sets[4], refusal, "I don't know."]


def test_off_topic_answers_come_from_the_most_alike_prompts_and_never_repeat_an_answer():
    import random

    from flywheel.demo.rankings import add_off_topic_answers

    questions = [
        "Which continent is India in?",
        "Which continent is Vietnam in?",
        "What is 3 + 8?",
        "What is 3 + 9?",
        "Which continent is India in?",  # the same question asked twice: never each other's off-topic source
    ]
    own = [["India is in Asia."], ["Vietnam is in Europe.", "Europe."], ["11."], ["3 + 9 = 12."], ["Asia."]]
    sets = [s + ["I don't know."] for s in own]
    out, added = add_off_topic_answers(questions, sets, own, 1, random.Random(0))
    assert added == 5
    assert out[2] == ["11.", "I don't know.", "3 + 9 = 12."]  # "What is 3 + 9?" shares 3 of its 5 words
    assert out[3] == ["3 + 9 = 12.", "I don't know.", "11."]
    assert out[0][-1] in own[1] and out[4][-1] in own[1]  # Vietnam's question, not the repeated India one
    assert out[1][-1] in ("India is in Asia.", "Asia.")
    assert sets[0] == ["India is in Asia.", "I don't know."]  # the input is not changed
    # an answer the set holds already is not added twice: the next most alike prompt gives one instead
    again, _ = add_off_topic_answers(
        questions[:2], [["Europe.", "x"], ["y"]], [["z"], ["Europe."]], 1, random.Random(0)
    )
    assert again == [["Europe.", "x"], ["y", "z"]]
    # two per set: the two most alike prompts', each once; the same seed draws the same answers
    two, added = add_off_topic_answers(questions, sets, own, 2, random.Random(1))
    assert added == 10 and two[2][-2:] == ["3 + 9 = 12.", two[2][-1]] and two[2][-1] != "3 + 9 = 12."
    assert two == add_off_topic_answers(questions, sets, own, 2, random.Random(1))[0]
    assert add_off_topic_answers(questions, sets, own, 0, random.Random(0)) == (sets, 0)


def test_negative_answer_counts_are_refused():
    from flywheel.errors import UserError

    for name in ("stock_answers", "off_topic_answers"):
        with pytest.raises(UserError, match=f"--{name.replace('_', '-')} must be >= 0"):
            DemoConfig(**{name: -1}).resolved()


def test_ppo_takes_the_demo_s_value_learning_rate(tmp_path, monkeypatch):
    from flywheel.demo.stages import RewardModelResult, stage_ppo

    seen = []

    class Stop(Exception):
        pass

    def fake_train_ppo(cfg):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr("flywheel.demo.stages.train_ppo", fake_train_ppo)
    (tmp_path / "ptx_corpus.txt").write_text("a document\n")
    files = {"ppo_prompts": tmp_path / "ppo.jsonl"}
    for value_lr in (None, 3e-4):
        cfg = DemoConfig(quick=True, ppo={} if value_lr is None else {"value_lr": value_lr}).resolved()
        run = DemoRun(cfg, tmp_path, cfg.stage_config("world", out=str(tmp_path)), files, {})
        with pytest.raises(Stop):
            stage_ppo(run, tmp_path / "sft", tmp_path / "sft", RewardModelResult(tmp_path / "rm", _rm()))
    # unset, the value model learns at the policy's rate (PPOConfig's own default); set, at the given one
    assert [c.value_lr for c in seen] == [None, 3e-4]
    assert seen[0].lr == seen[1].lr == PRESETS["quick"]["ppo"]["lr"]
    assert parse_demo_config(["--ppo.value-lr", "1e-4"]).ppo["value_lr"] == 1e-4


@pytest.mark.slow
def test_quick_demo_improves_per_the_oracle(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out), "--progress", "false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    wins = summary["win_rates"]
    assert wins["sft_vs_base"]["win_rate"] > 0.5, wins  # SFT beats the base, per the oracle
    # The deployed policy is one the labelers preferred to SFT, or SFT itself: per the oracle (never the reward
    # model) it does not lose to SFT. PPO beats SFT by a few points on 8 of 10 seeds of this 0.8M preset
    # (docs/demo.md, Results: 58-60% by seed set; the gate kept SFT on the others), so the test does not ask for a win.
    assert wins["ppo_vs_sft"]["win_rate"] >= 0.5, wins
    knowledge = summary["reward_model"]["knowledge"]  # how the reward model orders correct answers, held out
    assert set(knowledge) == {"wrong", "deflection"}
    assert all(k["accuracy"] is None or 0 <= k["accuracy"] <= 1 for k in knowledge.values())
    assert (
        summary["policies"]["ppo"]["score"]
        >= summary["policies"]["sft"]["score"]
        > summary["policies"]["base"]["score"]
    )
    for name in ("report.md", "ppo_score_kl.png", "rm_accuracy.png", "fewshot.png", "eval_samples.jsonl"):
        assert (out / name).is_file(), name
    # in-context learning is measured on the held-out few-shot probe (50 per number of shots; fewer 0-shot prompts
    # may be left), not on the eval split's ~5 of each
    probe = summary["policies"]["sft"]["fewshot_prompts"]
    assert {k: probe[k] for k in ("1", "2", "4")} == {"1": 50, "2": 50, "4": 50} and 10 <= probe["0"] <= 50
    assert summary["policies"]["base"]["fewshot_plain_accuracy"].keys() == probe.keys()
    assert "held-out few-shot prompts" in next(t["note"] for t in summary["targets"] if "in-context" in t["target"])
    assert "On a probe of few-shot prompts held out from every split (" in (out / "report.md").read_text()
    # Two rounds: round 2 ranked the answers of the policy round 1 deployed (the labelers' gate: a saved PPO policy
    # or the SFT incumbent), fine-tuned the reward model, went on with PPO from it; the gate of round 2 chose the
    # final policy among round 2's saved policies and round 1's choice.
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    first, second = (r["gate"] for r in summary["rounds"])
    assert first["incumbent"] == str(out / "sft" / "final") and second["incumbent"] == first["deployed"]
    assert first["deployed"] in [first["incumbent"]] + [c["policy"] for c in first["candidates"]]
    assert second["deployed"] in [second["incumbent"]] + [c["policy"] for c in second["candidates"]]
    assert all(Path(c["policy"]).is_relative_to(out / "round2" / "ppo") for c in second["candidates"])
    final = Path(summary["final_policy"])
    assert final == Path(second["deployed"]) and (final / "config.json").is_file()
    assert summary["rounds"][1]["labelers"]["policy"] == first["deployed"]
    assert summary["rounds"][1]["labelers"]["temperature"] == summary["labelers"]["temperature"]  # the same people
    ppo2 = yaml.safe_load((out / "round2" / "ppo" / "config.yaml").read_text())
    assert ppo2["model"] == first["deployed"] and ppo2["ref_model"] == str(out / "sft" / "final")
    assert yaml.safe_load((out / "round2" / "rm" / "config.yaml").read_text())["model"] == str(out / "rm" / "final")
    assert sorted({r["round"] for r in summary["ppo_curve"]}) == [1, 2]
    steps = [r["step"] for r in summary["ppo_curve"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert "ppo_round1" in summary["policies"] and "PPO-ptx round 2" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert f"flywheel chat {final}" in printed
    assert f"flywheel serve {final}" in printed
    with pytest.raises(UserError):  # a second run does not overwrite the first
        main(["--quick", "--out", str(out)])
    assert not (out / "base").exists() and "pretrain" not in summary["timings_s"]  # the shipped 0.8M base
    # --from-scratch: tokenizer and pretraining in the run; then --base: a run that starts from that run's base model
    # (short ones: the point is the plumbing)
    shrink = ["--rounds", "1", "--sft.epochs", "0.3", "--world.n-rank", "40", "--ppo.max-steps", "2"]
    shrink += ["--world.n-eval", "150", "--progress", "false"]
    scratch = tmp_path / "scratch"
    assert main(["--quick", "--out", str(scratch), "--from-scratch", "--pretrain.epochs", "0.3", *shrink]) == 0
    pretrained = json.loads((scratch / "summary.json").read_text())
    assert (scratch / "init" / "tokenizer.json").is_file() and (scratch / "base" / "final" / "config.json").is_file()
    assert {"tokenizer", "pretrain"} <= set(pretrained["timings_s"])
    again = tmp_path / "again"
    short = ["--quick", "--out", str(again), "--base", str(scratch / "base" / "final"), *shrink]
    assert main(short) == 0
    reused = json.loads((again / "summary.json").read_text())
    assert not (again / "base").exists() and not (again / "init").exists()  # no tokenizer, no pretraining
    assert "pretrain" not in reused["timings_s"]
    # the same seed and corpus: the same held-out documents and eval prompts, so the same base figures
    first_base, reused_base = pretrained["policies"]["base"], reused["policies"]["base"]
    assert reused_base["heldout_lm_loss"] == pytest.approx(first_base["heldout_lm_loss"])
    assert reused_base["score"] == pytest.approx(first_base["score"])
    # --resume after an interruption during PPO: the finished stages are kept, PPO and evaluation run again, and the
    # figures are the uninterrupted run's (every stage is deterministic given the seed)
    state = json.loads((again / "demo_state.json").read_text())
    assert list(state["stages"]) == ["sft", "rankings:1", "reward model:1", "ppo:1", "gate:1"]
    del state["stages"]["ppo:1"], state["stages"]["gate:1"]
    (again / "demo_state.json").write_text(json.dumps(state))
    (again / "summary.json").unlink()
    shutil.rmtree(again / "ppo" / "final")
    sft_written = (again / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    assert main([*short, "--resume"]) == 0
    resumed = json.loads((again / "summary.json").read_text())
    assert resumed["resumed"] == {"kept_stages": ["sft", "rankings:1", "reward model:1"]}
    assert (again / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_written  # not retrained
    for key in ("policies", "win_rates", "kl_ppo_sft", "reward_model", "labelers"):
        assert resumed[key] == reused[key], key
    assert resumed["timings_s"]["sft"] == reused["timings_s"]["sft"]  # the kept stage's own time
    # --reuse-from (flywheel sweep): a run with other PPO settings starts from this run's SFT, rankings and reward
    # model, and computes what the same settings compute from scratch
    fresh, reusing = tmp_path / "fresh", tmp_path / "reusing"
    other = ["--ppo.max-steps", "3", "--gate-every", "0"]
    assert main([*short, *other, "--out", str(fresh)]) == 0
    kept = RunState.reuse(again, reusing, parse_demo_config([*short, *other, "--out", str(reusing)]).resolved())
    assert kept == ["sft", "rankings:1", "reward model:1"]
    assert main([*short, *other, "--out", str(reusing), "--resume"]) == 0
    want, got = (json.loads((d / "summary.json").read_text()) for d in (fresh, reusing))
    assert got["resumed"] == {"kept_stages": kept, "reused_from": str(again)}
    for key in ("policies", "win_rates", "kl_ppo_sft", "reward_model", "labelers"):
        assert json.dumps(got[key]).replace(str(reusing), str(fresh)) == json.dumps(want[key]), key
    untimed = [[{k: v for k, v in row.items() if "time" not in k} for row in s["ppo_curve"]] for s in (got, want)]
    assert untimed[0] == untimed[1]  # the same PPO steps (their wall times aside)


@pytest.mark.slow
def test_the_default_presets_reward_model_runs_through_every_stage_with_its_head(tmp_path):
    """The `default` preset's reward model, on the quick world (short: the point is the wiring): two members trained
    side by side, read by the likelihood head; PPO optimises the head's score, the report says so and scores the
    held-out rankings with it, and round 2 fine-tunes the members and keeps round 1's reference, the SFT policy."""
    from safetensors.torch import load_file

    from flywheel.train.likelihood import has_likelihood_head

    out = tmp_path / "head"
    rm = ["--rm.rm-ensemble", "2", "--rm.parallel-members", "2", "--rm.likelihood-head", "true"]
    rm += ["--ppo.reward-ensemble-agg", "mean-std"]
    shrink = ["--sft.epochs", "0.3", "--world.n-rank", "40", "--n-rank-next", "20", "--ppo.max-steps", "2"]
    shrink += ["--gate-every", "1", "--world.n-eval", "150", "--progress", "false"]
    assert main(["--quick", "--out", str(out), *rm, *shrink]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for rm_dir in (out / "rm", out / "round2" / "rm"):
        final = rm_dir / "final"
        assert has_likelihood_head(final) and (final / "member1" / "config.json").is_file(), rm_dir
        assert yaml.safe_load((rm_dir / "config.yaml").read_text())["parallel_members"] == 2
    reference = json.loads((out / "round2" / "rm" / "final" / "flywheel_likelihood.json").read_text())["reference"]
    sft = load_file(str(out / "sft" / "final" / "model.safetensors"))
    kept = load_file(str(out / "round2" / "rm" / "final" / reference / "model.safetensors"))
    assert sft.keys() == kept.keys() and all(torch.equal(sft[k], kept[k]) for k in sft)
    assert yaml.safe_load((out / "round2" / "ppo" / "config.yaml").read_text())["reward_model"] == str(
        out / "round2" / "rm" / "final"
    )
    accuracy = summary["reward_model"]["accuracy"]
    assert 0 <= accuracy <= 1 and summary["rounds"][1]["reward_model"]["accuracy"] is not None
    report = (out / "report.md").read_text()
    assert "scored by a head over their mean score and the SFT policy's likelihood of the answer" in report


def test_base_must_be_a_model_directory_or_a_shipped_base(tmp_path):
    with pytest.raises(UserError, match="--base"):
        parse_demo_config(["--base", str(tmp_path)])
    with pytest.raises(UserError, match="--base: .*shipped-small.*or a shipped base: shipped, shipped-tiny"):
        parse_demo_config(["--base", "shipped-small"])


def test_rounds_flags_are_checked():
    with pytest.raises(UserError, match="--rounds"):
        parse_demo_config(["--rounds", "0"])
    with pytest.raises(UserError, match="--n-rank-next"):
        parse_demo_config(["--rounds", "2", "--world.n-ppo", "50", "--n-rank-next", "80"])


def test_two_rounds_get_a_column_each_and_one_curve(tmp_path):
    s = _summary(0.8, 4.0, 2.05)
    s.policies["ppo_round1"] = _policy(score=0.65, refusal_rate=0.8, idk_rate=0.3, heldout_lm_loss=2.05)
    w = s.win_rates
    w.update(ppo_round1_vs_sft=w["ppo_vs_sft"], ppo_round1_vs_base=w["ppo_vs_base"])
    s.kl_to_sft = {"ppo_round1": 2.0, "ppo": 4.0}
    s.rounds.append(
        RoundSummary(
            2,
            _labelers(answers=900, prompts=150, agreement_sampled=0.9),
            _rm(accuracy_informative=0.85, round1_heldout={"accuracy_informative": 0.7}),
            "ppo",
        )
    )
    table = result_table(s)
    assert table.splitlines()[0] == "| | base | SFT | PPO-ptx round 1 | PPO-ptx round 2 |"
    # PPO without a pretraining mix (the default preset) is called PPO, not PPO-ptx
    s.config = {**s.config, "ppo": {**s.config["ppo"], "ptx_coef": 0.0}}
    assert result_table(s).splitlines()[0] == "| | base | SFT | PPO round 1 | PPO round 2 |"
    assert PRESETS["default"]["ppo"]["ptx_coef"] == 0 < PRESETS["quick"]["ppo"]["ptx_coef"]
    assert "| oracle score (mean total) | 0.600 | 0.600 | 0.650 | 0.600 |" in table
    assert "| KL to SFT (nats / response) |  | 0 | 2.00 | 4.00 |" in table
    assert "Round 2: labelers ranked 900 answers of the round-1 policy to 150 prompts" in table

    for r, where in ((1, tmp_path), (2, tmp_path / "round2")):
        (where / "ppo").mkdir(parents=True)
        rows = [{"step": 0, "ptx_eval_loss": 3.0}, *({"step": k, "score": r + k / 10, "kl": k} for k in (1, 2, 3))]
        (where / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    cfg = DemoConfig(quick=True).resolved()
    curve = ppo_curve(DemoRun(cfg, tmp_path, cfg.stage_config("world", out=str(tmp_path)), {}, {}), 2)
    assert [(x["round"], x["step"]) for x in curve] == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)]
    assert curve[3]["score"] == pytest.approx(2.1)


def test_resume_keeps_finished_stages_and_refuses_a_different_run(tmp_path):
    out = tmp_path / "run"
    cfg = DemoConfig(out=str(out), quick=True).resolved()
    state = RunState.open(out, cfg)  # a new run: its settings recorded before any stage runs
    timings: dict[str, float] = {}
    calls = []

    def run_sft():
        calls.append("sft")
        (out / "sft").mkdir()
        timings["sft"], timings["sft (cpu)"] = 3.0, 5.0
        return out / "sft"

    assert state.stage("sft", timings, run_sft) == out / "sft" and calls == ["sft"]
    with pytest.raises(UserError, match="--resume"):  # without --resume a second run is refused
        RunState.open(out, cfg)

    # The resume keeps the finished stage (not run again, its timings restored) and runs the others.
    again = RunState.open(out, DemoConfig(out=str(out), quick=True, resume=True, progress=False).resolved())
    timings = {}
    assert again.stage("sft", timings, run_sft) == out / "sft" and calls == ["sft"]
    assert timings == {"sft": 3.0, "sft (cpu)": 5.0}
    from flywheel.demo.stages import RewardModelResult

    rm = again.stage("reward model:1", timings, lambda: RewardModelResult(out / "sft", _rm(accuracy=0.7)))
    assert rm.summary.accuracy == 0.7
    assert (
        RunState.open(out, DemoConfig(out=str(out), quick=True, resume=True).resolved()).stage(
            "reward model:1", {}, run_sft
        )
        == rm
    )  # kept: read back as the same typed result
    assert again.kept == ["sft"] and again.kept_seconds() == 3.0 and again.kept_seconds(cpu=True) == 5.0
    with pytest.raises(TypeError, match="result_type"):  # a stage's result must be the type its key declares
        again.stage("ppo:1", {}, lambda: RewardModelResult(out / "sft", _rm()))
    assert "ppo:1" not in again.stages

    with pytest.raises(UserError, match=r"settings differ .*--seed 1 \(the run's: 0\)"):
        RunState.open(out, DemoConfig(out=str(out), quick=True, resume=True, seed=1).resolved())
    # a stage's setting is named alone, not as its stage's whole mapping
    with pytest.raises(UserError, match=r"settings differ from the run in \S+: --ppo\.lr 0\.5 \(the run's: 2e-05\)$"):
        RunState.open(out, DemoConfig(out=str(out), quick=True, resume=True, ppo={"lr": 0.5}).resolved())
    (out / "sft").rmdir()  # a finished stage's output removed since: refused, not silently rerun
    third = RunState.open(out, DemoConfig(out=str(out), quick=True, resume=True).resolved())
    with pytest.raises(UserError, match="is missing"):
        third.stage("sft", {}, run_sft)
    # a kept rankings stage whose held-out file is gone: the same error, not a traceback from reading it
    from flywheel.demo.rankings import Rankings

    (out / "sft").mkdir()
    gone = Rankings(_labelers(), [], [], out / "sft", out / "gone.jsonl").to_json()
    fourth = RunState(third.path, third.config, {"rankings:1": {"timings": {}, "result": gone}})
    with pytest.raises(UserError, match="gone.jsonl.*is missing"):
        fourth.stage("rankings:1", {}, run_sft)
    (out / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="finished demo run"):
        RunState.open(out, DemoConfig(out=str(out), quick=True, resume=True).resolved())
    with pytest.raises(UserError, match="already holds a finished demo run: remove it, or choose another --out$"):
        RunState.open(out, DemoConfig(out=str(out), quick=True).resolved())  # --resume would not help: not named
    with pytest.raises(UserError, match="no interrupted demo run"):
        RunState.open(tmp_path / "none", DemoConfig(out=str(tmp_path / "none"), resume=True).resolved())


def test_reuse_keeps_the_stages_before_the_first_one_a_changed_setting_touches(tmp_path):
    """`flywheel sweep --reuse-from`: the stages a changed setting cannot have touched are copied (their files too, the
    paths in their results pointing into the new run), the others are left to run; an unknown change keeps none."""
    from flywheel.demo.rankings import Rankings
    from flywheel.demo.stages import RewardModelResult
    from flywheel.demo.state import FIRST_STAGE_CHANGED, stage_order

    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    assert set(FIRST_STAGE_CHANGED) <= fields  # no stale names
    assert all(s is None or stage_order(s) for s in FIRST_STAGE_CHANGED.values())
    assert sorted(["ppo:2", "gate:1", "sft", "rankings:2", "reward model:1"], key=stage_order) == [
        "sft",
        "reward model:1",
        "gate:1",
        "rankings:2",
        "ppo:2",
    ]
    src = tmp_path / "src"
    cfg = DemoConfig(out=str(src), quick=True).resolved()
    state = RunState.open(src, cfg)
    for d in ("sft/final", "rm/final", "ppo/final"):
        (src / d).mkdir(parents=True)
        (src / d / "model.txt").write_text(d)
    (src / "sft" / "metrics.jsonl").write_text("{}\n")
    (src / "train.jsonl").write_text("")
    (src / "heldout.jsonl").write_text("")
    state.stage("sft", {"sft": 1.0}, lambda: src / "sft" / "final")
    labels = Rankings(_labelers(policy=str(src / "sft" / "final")), [], [], src / "train.jsonl", src / "heldout.jsonl")
    state.stage("rankings:1", {}, lambda: labels)
    state.stage("reward model:1", {}, lambda: RewardModelResult(src / "rm" / "final", _rm(accuracy=0.7)))
    state.stage("ppo:1", {}, lambda: src / "ppo" / "final")
    state.stage("method:grpo", {}, lambda: src / "ppo" / "final")  # a stage of flywheel compare's

    def reuse(out: str, before: str | None = None, **changes) -> list[str]:
        new_cfg = dataclasses.replace(cfg, out=str(tmp_path / out), **changes)
        return RunState.reuse(src, tmp_path / out, new_cfg, before)

    ppo = {**cfg.ppo, "kl_coef": cfg.ppo["kl_coef"] + 0.1}
    assert reuse("kl", ppo=ppo) == ["sft", "rankings:1", "reward model:1"]
    new = tmp_path / "kl"
    assert (new / "sft" / "final" / "model.txt").read_text() == "sft/final"  # the whole stage directory
    assert (new / "sft" / "metrics.jsonl").is_file() and (new / "heldout.jsonl").is_file()
    assert not (new / "ppo").exists()
    # the new run resumes from them, reading its own copies
    again = RunState.open(new, DemoConfig(out=str(new), quick=True, ppo=ppo, resume=True).resolved())
    assert again.reused_from == str(src)
    assert again.stage("sft", {}, lambda: pytest.fail("sft ran again")) == new / "sft" / "final"
    kept = again.stage("rankings:1", {}, lambda: pytest.fail("ranked again"))
    assert kept.train == new / "train.jsonl" and kept.heldout_file == new / "heldout.jsonl"
    assert kept.summary.policy == str(new / "sft" / "final")
    rm = again.stage("reward model:1", {}, lambda: pytest.fail("trained again"))
    assert rm.dir == new / "rm" / "final"
    assert "ppo:1" not in again.stages

    rm_cfg = {**cfg.rm, "lr": cfg.rm["lr"] * 2}
    assert reuse("rm", rm=rm_cfg) == ["sft", "rankings:1"] and not (tmp_path / "rm" / "rm").exists()
    assert reuse("stock", stock_answers=cfg.stock_answers + 1) == ["sft"]
    assert reuse("eval", eval_temperature=0.7) == ["sft", "rankings:1", "reward model:1", "ppo:1"]
    # flywheel compare --reuse-from: the shared stages only, up to the reward model, whatever else is alike
    assert reuse("cmp", before="ppo:1") == ["sft", "rankings:1", "reward model:1"]
    assert not (tmp_path / "cmp" / "ppo").exists()
    assert reuse("seed", seed=1) == [] and not (tmp_path / "seed").exists()  # another seed: nothing to keep
    with pytest.raises(UserError, match="holds no demo run"):
        RunState.reuse(tmp_path / "none", tmp_path / "x", cfg)


def test_a_run_resumes_from_any_working_directory_and_after_a_move(tmp_path, monkeypatch):
    """The state file names the run's files relative to the run directory: a run started with a relative --out
    resumes, and is reused, from another working directory, and a moved run directory resumes where it is now."""
    from flywheel.demo.gate import Candidate, GateResult
    from flywheel.demo.rankings import Rankings
    from flywheel.demo.stages import RewardModelResult

    monkeypatch.chdir(tmp_path)
    src = Path("runs") / "sweep" / "seed1"
    cfg = DemoConfig(out=str(src), quick=True, seed=1).resolved()
    state = RunState.open(src, cfg)
    for d in ("sft/final", "rm/final"):
        (src / d).mkdir(parents=True)
        (src / d / "model.txt").write_text(d)
    (src / "train.jsonl").write_text("")
    (src / "heldout.jsonl").write_text("")
    state.stage("sft", {"sft": 1.0}, lambda: src / "sft" / "final")
    labels = Rankings(_labelers(policy=str(src / "sft" / "final")), [], [], src / "train.jsonl", src / "heldout.jsonl")
    state.stage("rankings:1", {}, lambda: labels)
    state.stage("reward model:1", {}, lambda: RewardModelResult(src / "rm" / "final", _rm()))
    step = src / "ppo" / "policies" / "step-8"
    step.mkdir(parents=True)
    gate = GateResult(1, str(src / "sft" / "final"), str(step), 10, [Candidate(str(step), 8, 0.6, 0.55, 0.65)])
    state.stage("gate:1", {}, lambda: gate)
    saved = json.loads((src / RunState.FILE).read_text())
    assert saved["format"] == RunState.FORMAT and saved["stages"]["sft"]["result"] == "sft/final"
    assert saved["stages"]["rankings:1"]["result"]["summary"]["policy"] == "sft/final"
    assert saved["stages"]["reward model:1"]["result"]["dir"] == "rm/final"
    recorded = saved["stages"]["gate:1"]["result"]
    assert (recorded["incumbent"], recorded["deployed"]) == ("sft/final", "ppo/policies/step-8")
    assert recorded["candidates"][0]["policy"] == "ppo/policies/step-8"

    def resumed(out: Path) -> tuple[Path, Rankings, RewardModelResult]:
        again = RunState.open(out, dataclasses.replace(cfg, out=str(out), resume=True))
        never = lambda: pytest.fail("ran again")  # noqa: E731
        sft = again.stage("sft", {}, never)
        deployed = again.stage("gate:1", {}, never)
        assert deployed.deployed == deployed.candidates[0].policy == str(out / "ppo" / "policies" / "step-8")
        assert deployed.incumbent == str(sft)
        return (
            sft,
            again.stage("rankings:1", {}, never),
            again.stage("reward model:1", {}, never),
        )

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for out in (tmp_path / src, Path("..") / src):  # the same run, named from another working directory
        sft, kept, rm = resumed(out)
        assert sft == out / "sft" / "final" and (sft / "model.txt").read_text() == "sft/final"
        assert kept.train == out / "train.jsonl" and kept.summary.policy == str(out / "sft" / "final")
        assert rm.dir == out / "rm" / "final"
    moved = tmp_path / "moved"
    shutil.move(tmp_path / src, moved)
    sft, kept, rm = resumed(moved)
    assert (sft / "model.txt").read_text() == "sft/final" and kept.heldout_file == moved / "heldout.jsonl"
    new = tmp_path / "new"
    rm_cfg = {**cfg.rm, "lr": cfg.rm["lr"] * 2}
    assert RunState.reuse(moved, new, dataclasses.replace(cfg, out=str(new), rm=rm_cfg)) == ["sft", "rankings:1"]
    assert json.loads((new / RunState.FILE).read_text())["stages"]["sft"]["result"] == "sft/final"
    assert (new / "sft" / "final" / "model.txt").read_text() == "sft/final" and (new / "train.jsonl").is_file()
    assert not (new / "rm").exists() and not (new / "ppo").exists()


def test_a_state_file_written_before_run_relative_paths_still_resumes_and_is_reused(tmp_path, monkeypatch):
    """Format 1 (no "format" key): the paths as the run's working directory saw them. A resume from there, and a
    reuse from anywhere, read them; the resumed run's file is rewritten in the current format."""
    monkeypatch.chdir(tmp_path)
    src = Path("runs") / "sweep" / "seed1"
    cfg = DemoConfig(out=str(src), quick=True, seed=1).resolved()
    (src / "sft" / "final").mkdir(parents=True)
    (src / "sft" / "final" / "model.txt").write_text("sft")
    old = {"config": RunState._settings(dataclasses.asdict(cfg))}
    old["stages"] = {"sft": {"result": "runs/sweep/seed1/sft/final", "timings": {"sft": 1.0}}}
    (src / RunState.FILE).write_text(json.dumps(old))
    again = RunState.open(src, dataclasses.replace(cfg, resume=True))
    assert again.stage("sft", {}, lambda: pytest.fail("ran again")) == src / "sft" / "final"
    assert json.loads((src / RunState.FILE).read_text())["stages"]["sft"]["result"] == "sft/final"
    (src / RunState.FILE).write_text(json.dumps(old))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    new = tmp_path / "new"
    rm = {**cfg.rm, "lr": cfg.rm["lr"] * 2}
    assert RunState.reuse(tmp_path / src, new, dataclasses.replace(cfg, out=str(new), rm=rm)) == ["sft"]
    assert json.loads((new / RunState.FILE).read_text())["stages"]["sft"]["result"] == "sft/final"
    assert (new / "sft" / "final" / "model.txt").read_text() == "sft"
    # a string that is no path (an answer's text) is left as it is, even one no file system could look up
    from flywheel.demo.state import _run_relative

    text = f"seed1/{'q' * 300}"
    assert _run_relative({"held_sets": [[text, "sft"]]}, (tmp_path / src).resolve()) == {"held_sets": [[text, "sft"]]}
    (tmp_path / src / RunState.FILE).write_text(json.dumps({**old, "format": 9}))
    with pytest.raises(UserError, match="format 9"):
        RunState.reuse(tmp_path / src, tmp_path / "x", cfg)


def test_changed_settings_compares_settings_as_the_run_file_saved_them():
    """A run's settings come back from JSON: a tuple setting is the list it was written as, not a change."""

    @dataclasses.dataclass
    class Settings:
        seed: int = 0
        shots: tuple[int, ...] = (0, 1, 2)
        out: str = "a"

    saved = json.loads(json.dumps(asdict(Settings())))
    assert RunState.changed_settings(Settings(out="b"), saved) == []  # "out" is volatile
    assert RunState.changed_settings(Settings(shots=(0, 4)), saved) == ["--shots [0, 4] (the run's: [0, 1, 2])"]


def test_labelers_agreement_is_reported_on_the_ranked_sets_and_on_the_policy_s_own_answers(tmp_path, monkeypatch):
    """The labelers' temperature is calibrated on the sets they rank (stock answers included); the agreement on the
    policy's own answers alone is reported beside it, and the stock answers are ranked in every set."""
    from flywheel.demo.rankings import stage_rankings
    from flywheel.world import calibrate_temperature, candidate_responses, default_panel, panel_agreement, random_task

    rng = random.Random(0)
    tasks = [random_task(rng) for _ in range(60)]
    own = [list(dict.fromkeys(candidate_responses(t, rng, rng.randint(4, 6)))) for t in tasks]
    stock = ["I'm sorry, but I can't help with that.", "I don't know."]
    for s in own[:3]:  # the two most frequent answers, so add_stock_answers picks them
        s += [a for a in stock if a not in s]
    path = tmp_path / "rank_tasks.jsonl"
    path.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in tasks))
    monkeypatch.setattr("flywheel.demo.rankings.load_causal_lm", lambda _: None)
    monkeypatch.setattr("flywheel.demo.rankings.load_tokenizer", lambda _: None)
    monkeypatch.setattr("flywheel.demo.rankings.sample_answers", lambda *a, **k: [list(s) for s in own])
    kept = [(t, s) for t, s in zip(tasks, own, strict=True) if len(s) >= 2]
    ranked_sets = [s + [a for a in stock if a not in s] for _, s in kept]
    runs = {}
    for n in (0, 2):
        cfg = DemoConfig(
            quick=True, stock_answers=n, off_topic_answers=0, world={"n_rank": len(tasks)}, progress=False
        ).resolved()
        out = tmp_path / f"stock{n}"
        run = DemoRun(cfg, out, cfg.stage_config("world", out=str(out)), {"rank_tasks": path}, {})
        runs[n] = asdict(stage_rankings(run, tmp_path / "sft").summary)
    assert runs[0]["temperature"] == pytest.approx(calibrate_temperature([t for t, _ in kept], [s for _, s in kept]))
    assert runs[2]["temperature"] == pytest.approx(calibrate_temperature([t for t, _ in kept], ranked_sets))
    assert runs[0]["agreement_own_answers"] == runs[0]["agreement_sampled"]  # no stock answers: one and the same
    panel = default_panel(runs[2]["temperature"])
    assert runs[2]["agreement_own_answers"] == pytest.approx(
        panel_agreement(panel, [t for t, _ in kept], [s for _, s in kept], random.Random(cfg.seed))
    )
    assert runs[2]["agreement_own_answers"] != runs[2]["agreement_sampled"]
    assert sorted(runs[2]["stock_answers"]) == sorted(stock) and runs[0]["stock_answers"] == []
    ranked = [json.loads(line) for line in (tmp_path / "stock2" / "rankings_train.jsonl").read_text().splitlines()]
    assert all(set(stock) <= {c.strip() for c in r["completions"]} for r in ranked)  # every set ranks both
    # Off-topic answers join every set, but the labelers are the same people: their temperature is not recalibrated.
    cfg = DemoConfig(quick=True, stock_answers=2, off_topic_answers=1, world={"n_rank": len(tasks)}, progress=False)
    cfg = cfg.resolved()
    run = DemoRun(cfg, tmp_path / "ot", cfg.stage_config("world", out=str(tmp_path / "ot")), {"rank_tasks": path}, {})
    off = stage_rankings(run, tmp_path / "sft").summary
    assert off.temperature == runs[2]["temperature"]
    assert off.off_topic_answers == len(kept) and off.answers == runs[2]["answers"] + len(kept)

    def sizes(run_dir):  # prompt -> answers ranked, over both splits (which differ: the labelers drew more)
        lines = [x for f in ("train", "heldout") for x in (run_dir / f"rankings_{f}.jsonl").read_text().splitlines()]
        return {json.dumps(r["prompt"]): len(r["completions"]) for r in map(json.loads, lines)}

    assert sizes(tmp_path / "ot") == {p: n + 1 for p, n in sizes(tmp_path / "stock2").items()}
    assert f"{len(kept)} of them its answers to other, alike prompts" in _labelers_line(
        dataclasses.replace(_summary(0.6, 1.0, 2.0), labelers=off)
    )


def test_sweep_averages_each_seed_s_run_and_refuses_mixed_settings(tmp_path, capsys):
    """`flywheel sweep`: seeds parsed, finished runs with the same settings kept (no demo runs here), the row's
    mean ± sd and counts computed over the seeds, a run with other settings or --seed among the demo flags refused."""
    from flywheel.demo.sweep import main as sweep
    from flywheel.demo.sweep import parse_seeds

    assert parse_seeds("100-104") == [100, 101, 102, 103, 104] and parse_seeds("1,3-4") == [1, 3, 4]
    for bad in ("1-x", "", "2,2"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
    for seed, win, refuse in ((3, 0.8, 0.9), (4, 0.6, 0.4)):
        s = _summary(win, 2.0 * seed, 2.05)
        s.config = asdict(DemoConfig(quick=True, seed=seed, out=str(tmp_path / f"seed{seed}")).resolved())
        s.policies["ppo"].refusal_rate = refuse
        s.targets = check_targets(s)
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "summary.json").write_text(json.dumps(s.to_json()))
    assert sweep(["--seeds", "3-4", "--out", str(tmp_path), "--", "--quick", "--progress", "false"]) == 0
    table = (tmp_path / "sweep.md").read_text()
    assert capsys.readouterr().out.strip() == table.strip()
    row = table.splitlines()[2].split(" | ")
    assert row[0] == "| `--quick` (seeds 3, 4)"  # flags that do not change what runs stay out of the label
    assert row[1:4] == ["70.0 ± 14.1", "60.0", "2 of 2"]  # mean ± sample sd of 80 and 60, the lowest, wins
    assert row[6:8] == ["30.0 → 30.0 ± 0.0", "— → —"]  # facts; no few-shot prompt among these runs' families
    assert row[8:10] == ["50.0 → 65.0 ± 35.4", "1 of 2"]  # refusals: SFT 50%; PPO 90% and 40%
    assert row[11] == "7.00 ± 1.41"  # KL 6 and 8
    figures = json.loads((tmp_path / "sweep.json").read_text())["seeds"]
    assert [f["seed"] for f in figures] == [3, 4]
    with pytest.raises(UserError, match=r"other settings \(.*ppo.*\)"):
        sweep(["--seeds", "3", "--out", str(tmp_path), "--", "--quick", "--ppo.kl-coef", "0.3"])
    with pytest.raises(UserError, match="--seed is set by flywheel sweep"):
        sweep(["--seeds", "3", "--out", str(tmp_path), "--", "--seed", "5"])
    # --reuse-from is checked before any seed runs: not this --out, and a demo run there for every seed
    with pytest.raises(UserError, match="not this one's --out"):
        sweep(["--seeds", "3", "--out", str(tmp_path), "--reuse-from", str(tmp_path), "--", "--quick"])
    with pytest.raises(UserError, match="holds no demo run for seed3, seed4"):
        sweep(["--seeds", "3-4", "--out", str(tmp_path / "new"), "--reuse-from", str(tmp_path), "--", "--quick"])


class _ByPromptAndText:
    """A stand-in reward model whose score depends on the prompt and the answer (0-3: ties occur), counting calls."""

    def __init__(self):
        self.calls = 0

    def value(self, prompt, answer):
        return float(random.Random(f"{json.dumps(prompt)}|{answer}").randint(0, 3))

    def score(self, prompts, answers):
        assert len(prompts) == len(answers)
        self.calls += 1
        return torch.tensor([self.value(p, a) for p, a in zip(prompts, answers, strict=True)])


def test_heldout_accuracy_matches_a_brute_force_count_ranking_by_ranking():
    """Every held-out answer is scored against its own prompt (in one call to the reward model), and the pairs are
    counted as a brute-force loop over each ranking's ordered pairs counts them: all labelled pairs, and those the
    oracle does not tie."""
    from flywheel.world import candidate_responses, make_task, score

    rng = random.Random(11)
    tasks, sets, records = [], [], []
    for _ in range(40):
        task = make_task(rng.choice(["fact", "arithmetic", "harmful", "unknowable"]), rng)
        texts = list(dict.fromkeys(candidate_responses(task, rng, 6)))
        order = [[i] for i in rng.sample(range(len(texts)), len(texts))]
        if len(order) > 2:  # a tie in the labels: not a pair
            order = [order[0] + order[1], *order[2:]]
        tasks.append(task)
        sets.append(texts)
        records.append({"prompt": task.messages, "completions": texts, "order": order})
    rm = _ByPromptAndText()
    got = heldout_accuracy(rm, (tasks, sets, records))
    assert rm.calls == 1
    wins = {"all": 0.0, "informative": 0.0}
    pairs = {"all": 0, "informative": 0}
    for task, texts, rec in zip(tasks, sets, records, strict=True):
        rank = {i: g for g, group in enumerate(rec["order"]) for i in group}
        values = [rm.value(task.messages, t) for t in texts]
        totals = [score(task, t).total for t in texts]
        for i, j in itertools.permutations(range(len(texts)), 2):
            if rank[i] >= rank[j]:
                continue
            win = (values[i] > values[j]) + 0.5 * (values[i] == values[j])
            for kind in ("all", "informative"):
                if kind == "all" or totals[i] != totals[j]:
                    pairs[kind] += 1
                    wins[kind] += win
    assert got["pairs"] == pairs["all"] > got["pairs_informative"] == pairs["informative"] > 0
    assert got["accuracy"] == pytest.approx(wins["all"] / pairs["all"])
    assert got["accuracy_informative"] == pytest.approx(wins["informative"] / pairs["informative"])
    empty = heldout_accuracy(rm, ([], [], []))
    assert (empty["pairs"], empty["accuracy"], rm.calls) == (0, 0.0, 1)


def test_knowledge_contrasts_match_a_brute_force_count():
    """Correct answers against wrong ones and against deflections, per set, counted against every ordered pair of
    answers by brute force on random sets (a tie in score counts half; prompts that are not answerable: None)."""
    rng = random.Random(7)
    kinds = ["correct", "wrong", "refused", "idk", "made_up", "hedged", "complied", "empty"]
    verdicts, scores = [], []
    for _ in range(200):
        k = rng.randint(2, 9)
        answerable = rng.random() < 0.8
        verdicts.append([rng.choice(kinds) if answerable else None for _ in range(k)])
        scores.append([float(rng.randint(0, 3)) for _ in range(k)])  # small range: ties in score occur
    got = knowledge_contrasts(verdicts, scores)
    for kind, others in (("wrong", {"wrong"}), ("deflection", {"refused", "idk"})):
        wins = pairs = 0.0
        for vs, ss in zip(verdicts, scores, strict=True):
            for i, j in itertools.permutations(range(len(vs)), 2):
                if vs[i] == "correct" and vs[j] in others:
                    pairs += 1
                    wins += (ss[i] > ss[j]) + 0.5 * (ss[i] == ss[j])
        assert got[kind]["pairs"] == pairs > 0
        assert got[kind]["accuracy"] == pytest.approx(wins / pairs)
    assert knowledge_contrasts([[None, None], ["correct", "made_up"]], [[1.0, 0.0], [1.0, 0.0]]) == {
        "wrong": {"pairs": 0, "accuracy": None},
        "deflection": {"pairs": 0, "accuracy": None},
    }
    summary = _summary(0.8, 4.0, 2.05)
    summary.reward_model.knowledge = {
        "wrong": {"pairs": 40, "accuracy": 0.6},
        "deflection": {"pairs": 20, "accuracy": 0.25},
    }
    note = {t.target: t.note for t in check_targets(summary)}["correct on answerable prompts at least SFT's"]
    assert note.endswith(
        'scores a correct answer above a wrong one on 60.0% of 40 pairs and above a refusal or "I don\'t know" on '
        "25.0% of 20 pairs (the oracle: every time)"
    )
    summary.reward_model.knowledge["deflection"] = {"pairs": 0, "accuracy": None}  # no such pair held out
    note = {t.target: t.note for t in check_targets(summary)}["correct on answerable prompts at least SFT's"]
    assert note.endswith("a correct answer above a wrong one on 60.0% of 40 pairs (the oracle: every time)")

"""`flywheel compare`: its arguments, the table's statistics, and (slow) a two-method, two-seed run end to end."""

from __future__ import annotations

import json

import pytest

from flywheel.demo.compare import MethodResult, aggregate, main, markdown, parse_compare_args
from flywheel.errors import UserError

# The quick preset, shrunk to seconds: the mechanics are under test here, not the figures.
TINY = [
    "--quick",
    "--pretrain.epochs", "0.2",
    "--sft.epochs", "0.3",
    "--world.corpus-chars", "60000",
    "--world.n-demos", "300",
    "--world.n-rank", "40",
    "--world.n-ppo", "64",
    "--world.n-eval", "60",
    "--ppo.max-steps", "2",
    "--threads", "1",
    "--progress", "false",
]  # fmt: skip


def test_arguments_are_checked_before_anything_runs():
    settings, demo = parse_compare_args(["--methods", "grpo,dpo", "--seeds", "3,4", "--quick"])
    assert settings.methods == ["grpo", "dpo"] and settings.seeds == [3, 4] and demo.out == "runs/compare"
    assert parse_compare_args(["--seeds", "100-102,7"])[0].seeds == [100, 101, 102, 7]  # as flywheel sweep's
    for argv, message in [
        (["--methods", "ppo,sgd"], "unknown method"),
        (["--methods", "ppo,ppo"], "twice"),
        (["--seeds", "0,a"], "--seeds"),
        (["--seed", "1"], "--seeds"),
        (["--num-generations", "1"], "--num-generations"),
        (["--rounds", "2"], "one round"),
        (["--ppo.lr", "-1"], "--ppo.lr"),
        (["--reuse-from", "nowhere"], "nowhere holds no demo run for seed0"),
        (["--reuse-from", "runs/x", "--out", "runs/x"], "not this one's --out"),
    ]:
        with pytest.raises(UserError, match=message):
            parse_compare_args(argv)


def _result(method: str, seed: int, win: float, kl: float, idk: float | None = 0.5) -> MethodResult:
    axes = {"helpful": 0.5, "truthful": 0.5, "harmless": 1.0, "concise": 0.9}
    return MethodResult(method, seed, win, win - 0.1, win + 0.1, 0.6, axes, 0.3, 0.1, 0.9, idk, kl, 10.0)


def test_the_table_is_mean_and_sample_sd_over_seeds():
    results = [_result("ppo", 0, 0.6, 1.0), _result("ppo", 1, 0.8, 3.0), _result("dpo", 0, 0.5, 0.5, None)]
    table = aggregate(results)
    win, kl = table["ppo"]["win_rate"], table["ppo"]["kl"]
    assert win == pytest.approx((0.7, 0.1414213), abs=1e-6) and kl == pytest.approx((2.0, 1.4142135), abs=1e-6)
    assert table["dpo"]["idk_rate"] is None  # a seed without the value is not averaged as zero
    text = markdown(results, parse_compare_args([])[0], parse_compare_args(["--quick"])[1].resolved())
    assert "| ppo | 70.0 ± 14.1 |" in text and "| dpo | 50.0 ± 0.0 |" in text and "–" in text


@pytest.mark.slow
def test_two_methods_on_two_seeds_end_to_end(tmp_path):
    out = tmp_path / "cmp"
    argv = [*TINY, "--methods", "grpo,dpo", "--seeds", "0,1", "--num-generations", "4", "--out", str(out)]
    assert main(argv) == 0
    rows = json.loads((out / "compare.json").read_text())
    assert sorted((r["seed"], r["method"]) for r in rows) == [(s, m) for s in (0, 1) for m in ("dpo", "grpo", "sft")]
    for r in rows:
        assert 0 <= r["ci95_low"] <= r["win_rate"] <= r["ci95_high"] <= 1 and r["kl"] is not None
        if r["method"] != "sft":
            assert r["seconds"] > 0
    text = (out / "compare.md").read_text()
    assert "| grpo |" in text and "| dpo |" in text and "seeds 0, 1" in text
    assert (out / "compare.png").stat().st_size > 1000
    assert (out / "seed1" / "grpo" / "final" / "config.json").exists()
    with pytest.raises(UserError, match="--resume"):  # the runs are there: a second run must say --resume
        main(argv)
    assert main([*argv, "--resume"]) == 0  # every stage kept, the table written again
    # compare's own method settings are the kept methods' too: resuming with others is refused, each named
    changed = list(argv)
    changed[changed.index("--num-generations") + 1] = "2"
    with pytest.raises(UserError, match=r"--num-generations 2 \(the run's: 4\)"):
        main([*changed, "--resume"])
    # --reuse-from: seed 1's world, SFT, rankings and reward model are those of the run above (copied, not trained
    # again), and GRPO from them gives what it gave there
    again = tmp_path / "again"
    assert main([*TINY, "--methods", "grpo", "--seeds", "1", "--reuse-from", str(out), "--out", str(again)]) == 0
    state = json.loads((again / "seed1" / "demo_state.json").read_text())
    assert state["reused_from"] == str(out / "seed1")
    assert set(state["stages"]) == {"sft", "rankings:1", "reward model:1", "method:grpo"}
    assert (again / "seed1" / "sft" / "final" / "config.json").exists()
    before = {r["method"]: r for r in rows if r["seed"] == 1}
    for r in json.loads((again / "compare.json").read_text()):
        for key in ("win_rate", "score", "accuracy", "over_refusal", "kl"):
            assert r[key] == pytest.approx(before[r["method"]][key]), (r["method"], key)

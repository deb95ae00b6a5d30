"""Reward-model ensembles: the aggregation maths, `flywheel rm --rm-ensemble N` (layout, seeds, resume, N = 1
unchanged), the ensemble scorer against its members loaded alone, and PPO / `flywheel score` / `flywheel sample`
with an ensemble directory."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.test_reward import preference_rows, write_jsonl

from flywheel.cli import main
from flywheel.errors import UserError
from flywheel.models import build_causal_lm, config_for_tokenizer, load_sequence_classifier, save_pretrained
from flywheel.tokenization import render_prompt, render_response
from flywheel.train.ensemble import (
    MANIFEST,
    RewardEnsemble,
    aggregate_rewards,
    assemble_ensemble,
    check_aggregation,
    disagreement,
    ensemble_members,
)
from flywheel.train.reward import OFFSET_KEY, RewardModel


def _brute(column: list[float], agg: str, lam: float) -> float:
    if agg == "mean":
        return sum(column) / len(column)
    if agg == "min":
        return min(column)
    return sum(column) / len(column) - lam * statistics.pstdev(column)


@pytest.mark.parametrize("agg", ["mean", "min", "mean-std"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_aggregation_equals_a_float64_brute_force(agg, n):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(n, 7, generator=g, dtype=torch.float64) * 3
    lam = 0.7
    got = aggregate_rewards(scores, agg, lam)
    want = [_brute(scores[:, b].tolist(), agg, lam) for b in range(7)]
    assert got.dtype == torch.float64 and got.shape == (7,)
    assert max(abs(a - b) for a, b in zip(got.tolist(), want, strict=True)) < 1e-12
    spread = sum(statistics.pstdev(scores[:, b].tolist()) for b in range(7)) / 7
    assert abs(disagreement(scores) - spread) < 1e-12


def test_aggregation_orders_and_errors():
    scores = torch.tensor([[1.0, 4.0], [3.0, 0.0]], dtype=torch.float64)
    assert aggregate_rewards(scores, "min").tolist() == [1.0, 0.0]
    assert aggregate_rewards(scores, "mean-std", 0.0).tolist() == aggregate_rewards(scores, "mean").tolist()
    # mean-std <= mean, and with lambda 1 on two members it is exactly the lower one
    assert aggregate_rewards(scores, "mean-std", 1.0).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_rewards(scores, "max")
    with pytest.raises(ValueError, match=r"\(N >= 1, B\)"):
        aggregate_rewards(scores[0], "mean")
    for agg, lam, fragment in (("max", 1.0, "must be one of"), ("mean-std", -1.0, ">= 0"), ("min", 2.0, "mean-std")):
        with pytest.raises(UserError, match=fragment):
            check_aggregation(agg, lam)


def _rm_args(base, data, out, *more):
    return [
        "rm",
        "--model",
        str(base),
        "--data",
        data,
        "--out",
        str(out),
        "--lr",
        "3e-3",
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--eval-split",
        "0.1",
        "--progress",
        "false",
        "--threads",
        "1",
        *more,
    ]


@pytest.fixture(scope="module")
def ens(tmp_path_factory, tokenizer):
    """A base model, 60 synthetic rankings, a 2-member ensemble (4 steps each, checkpoint at step 2) and a single
    reward model with the same seed."""
    root = tmp_path_factory.mktemp("ens")
    base = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=0)
    save_pretrained(base, tokenizer, root / "base")
    data = write_jsonl(root / "train.jsonl", preference_rows(60, seed=10))
    assert main(_rm_args(root / "base", data, root / "ens", "--rm-ensemble", "2", "--save-every", "2")) == 0
    assert main(_rm_args(root / "base", data, root / "single")) == 0
    return {"root": root, "base": root / "base", "data": data, "final": root / "ens" / "final"}


def test_rm_ensemble_trains_two_seeded_members_and_writes_a_manifest(ens):
    final = ens["final"]
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["format"] == "flywheel-reward-ensemble" and manifest["members"] == ["member0", "member1"]
    assert [m["seed"] for m in manifest["member_info"]] == [0, 1]
    assert all("eval_accuracy" in m for m in manifest["member_info"])
    assert ensemble_members(final) == [final / "member0", final / "member1"]
    a, b = (load_file(str(final / f"member{i}" / "model.safetensors")) for i in range(2))
    assert a.keys() == b.keys() and not torch.equal(a["score.weight"], b["score.weight"])
    offsets = [json.loads((final / f"member{i}" / "config.json").read_text())[OFFSET_KEY] for i in range(2)]
    assert offsets[0] != offsets[1]  # each member normalised on its own
    for i in range(2):  # progress of each member in its own run directory
        run = ens["root"] / "ens" / f"member{i}"
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps[-1] == 4 and f"seed: {i}" in (run / "config.yaml").read_text()
    assert "rm_ensemble: 2" in (ens["root"] / "ens" / "config.yaml").read_text()
    # Member 0 is the model a single run with the same seed trains: same data, split, references and init.
    single = ens["root"] / "single" / "final"
    assert (single / "model.safetensors").read_bytes() == (final / "member0" / "model.safetensors").read_bytes()
    assert (single / "config.json").read_bytes() == (final / "member0" / "config.json").read_bytes()


def test_rm_ensemble_of_one_keeps_the_single_model_layout(ens, tmp_path):
    out = tmp_path / "one"
    assert main(_rm_args(ens["base"], ens["data"], out, "--rm-ensemble", "1")) == 0
    single = ens["root"] / "single"
    listing = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert listing(out) == listing(single) and not (out / "final" / MANIFEST).exists()
    for name in ("model.safetensors", "config.json", "flywheel.json", "tokenizer.json"):
        assert (out / "final" / name).read_bytes() == (single / "final" / name).read_bytes(), name
    assert type(RewardModel.from_pretrained(out / "final")) is RewardModel
    assert main(_rm_args(ens["base"], ens["data"], tmp_path / "zero", "--rm-ensemble", "0")) == 2


def test_rm_ensemble_from_an_ensemble_fine_tunes_each_member_from_its_own(ens, tmp_path, capsys):
    """The next round's reward model: `--model ENSEMBLE --rm-ensemble N` starts member i from member i (a step of lr
    1e-6 keeps each head beside its own start, far from the other's); any other N is a one-line error."""
    args = _rm_args(ens["final"], ens["data"], tmp_path / "next", "--rm-ensemble", "2", "--max-steps", "1")
    assert main([*args, "--lr", "1e-6"]) == 0
    start = [load_file(str(ens["final"] / f"member{i}" / "model.safetensors"))["score.weight"] for i in range(2)]
    tuned = [
        load_file(str(tmp_path / "next" / "final" / f"member{i}" / "model.safetensors"))["score.weight"]
        for i in range(2)
    ]
    for i in range(2):
        assert (tuned[i] - start[i]).abs().max() < 1e-4 < (tuned[i] - start[1 - i]).abs().max()
    capsys.readouterr()
    for n in ("3", "1"):
        assert main(_rm_args(ens["final"], ens["data"], tmp_path / f"bad{n}", "--rm-ensemble", n)) == 2
        err = capsys.readouterr().err
        assert "is an ensemble of 2 reward models: fine-tune it with --rm-ensemble 2" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / f"bad{n}").exists()


def test_rm_ensemble_members_side_by_side_are_the_members_trained_one_after_another(ens, tmp_path):
    """--parallel-members 2 with --threads 2 trains each member in its own process with 1 thread: byte for byte the
    ensemble that --threads 1 trains one member after the other (the fixture's), with the same progress logs."""
    out = tmp_path / "side"
    args = _rm_args(
        ens["base"], ens["data"], out, "--rm-ensemble", "2", "--save-every", "2", "--parallel-members", "2"
    )
    args[args.index("--threads") + 1] = "2"
    assert main(args) == 0
    ref = ens["root"] / "ens"
    for i in range(2):
        for name in ("model.safetensors", "config.json", "flywheel.json"):
            want = (ref / "final" / f"member{i}" / name).read_bytes()
            assert (out / "final" / f"member{i}" / name).read_bytes() == want, (i, name)
        metrics = [(d / f"member{i}" / "metrics.jsonl").read_text().splitlines() for d in (out, ref)]
        steps = [[json.loads(x)["step"] for x in m] for m in metrics]
        assert steps[0] == steps[1] and "threads: 1" in (out / f"member{i}" / "config.yaml").read_text()
    assert json.loads((out / "final" / MANIFEST).read_text()) == json.loads((ref / "final" / MANIFEST).read_text())


def test_rm_ensemble_member_failing_in_its_process_is_one_line_and_leaves_nothing(tmp_path, ens, capsys):
    """A member that stops on bad input in its own process: the parent prints its one-line error (file and line),
    exits 2 and leaves no run directory; bad --parallel-members values are refused before anything runs."""
    bad = tmp_path / "bad.jsonl"
    rows = Path(ens["data"]).read_text().splitlines()
    bad.write_text("\n".join([*rows[:5], "{not json", *rows[5:]]) + "\n")
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(_rm_args(ens["base"], str(bad), out, "--rm-ensemble", "2", "--parallel-members", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:6" in err, err
    assert not out.exists()
    for more in (["--parallel-members", "0"], ["--parallel-members", "2", "--nproc", "2"]):
        assert main(_rm_args(ens["base"], ens["data"], tmp_path / "no", "--rm-ensemble", "2", *more)) == 2
        assert "--parallel-members" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_rm_ensemble_resume_continues_the_member_in_progress(ens, tmp_path, caplog):
    """An ensemble run stopped during member 1 (its checkpoint at step 2 kept, no final) resumes that member from
    the checkpoint, keeps member 0, and assembles the same ensemble."""
    run = tmp_path / "ens"
    shutil.copytree(ens["root"] / "ens", run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "member1" / "final")
    member0 = (run / "member0" / "metrics.jsonl").read_text()
    assert (run / "member1" / "checkpoints" / "step-2").is_dir()
    assert main(_rm_args(ens["base"], ens["data"], run, "--rm-ensemble", "2", "--save-every", "2")) == 2  # no --resume
    args = _rm_args(ens["base"], ens["data"], run, "--rm-ensemble", "2", "--save-every", "2", "--resume")
    assert main([*args, "--lr", "0.5"]) == 2  # the kept member was trained with another --lr: not mixed in
    assert not (run / "final").exists()
    with caplog.at_level("INFO", logger="flywheel"):
        assert main(args) == 0
    assert "ensemble member 1 of 2 is trained already" in caplog.text
    assert f"resumed from {run / 'member1' / 'checkpoints' / 'step-2'} (step 2 of 4)" in caplog.text
    assert (run / "member0" / "metrics.jsonl").read_text() == member0  # not retrained
    for i in range(2):
        want = (ens["final"] / f"member{i}" / "model.safetensors").read_bytes()
        assert (run / "final" / f"member{i}" / "model.safetensors").read_bytes() == want


def _conversations():
    prompts = [[{"role": "user", "content": f"Say something about {w}"}] for w in ("cat", "dog", "cat", "Paris")]
    answers = ["the cat says please", "woof", "hello world", "please sort the list"]
    return prompts, answers


@pytest.mark.parametrize(("agg", "lam"), [("mean", 1.0), ("min", 1.0), ("mean-std", 0.5)])
def test_ensemble_scores_are_the_aggregate_of_its_members_loaded_alone(ens, agg, lam):
    scorer = RewardModel.from_pretrained(ens["final"], ensemble_agg=agg, ensemble_lambda=lam, batch_size=3)
    assert isinstance(scorer, RewardEnsemble) and len(scorer) == 2
    alone = [RewardModel.from_pretrained(ens["final"] / f"member{i}") for i in range(2)]
    assert all(type(m) is RewardModel for m in alone)
    prompts, answers = _conversations()
    each = torch.stack([m.score(prompts, answers) for m in alone]).double()  # (2, B)
    want = [_brute(each[:, b].tolist(), agg, lam) for b in range(len(answers))]
    got = scorer.score(prompts, answers)
    assert got.shape == (4,) and max(abs(a - b) for a, b in zip(got.tolist(), want, strict=True)) < 1e-5
    torch.testing.assert_close(scorer.score_members(prompts, answers), each.float(), atol=1e-5, rtol=0)
    ids = scorer.score_ids(
        [render_prompt(scorer.tokenizer, p) for p in prompts],
        [render_response(scorer.tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)],
    )
    torch.testing.assert_close(ids, got, atol=1e-5, rtol=0)
    raw = torch.stack([m.score(prompts, answers, normalize=False) for m in alone])
    torch.testing.assert_close(scorer.score_members(prompts, answers, normalize=False), raw, atol=1e-5, rtol=0)


def test_a_single_reward_model_takes_only_the_mean_and_bad_manifests_are_one_line_errors(ens, tmp_path):
    single = ens["root"] / "single" / "final"
    with pytest.raises(UserError, match="needs an ensemble reward model"):
        RewardModel.from_pretrained(single, ensemble_agg="min")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / MANIFEST).write_text('{"members": "member0"}')
    with pytest.raises(UserError, match="not a reward-model ensemble manifest"):
        RewardModel.from_pretrained(bad)
    (bad / MANIFEST).write_text('{"format": "flywheel-reward-ensemble", "members": ["member0"]}')
    with pytest.raises(UserError, match="member0 is missing"):
        RewardModel.from_pretrained(bad)


def test_flywheel_score_with_an_ensemble_gives_the_aggregate_and_each_member(ens, tmp_path, capsys):
    prompts, answers = _conversations()
    data = write_jsonl(
        tmp_path / "convs.jsonl",
        [{"messages": [*p, {"role": "assistant", "content": a}]} for p, a in zip(prompts, answers, strict=True)],
    )

    def score(model, *more):
        out = tmp_path / "scores.jsonl"
        assert main(["score", "--model", str(model), "--data", data, "--out", str(out), *more]) == 0
        return [json.loads(line) for line in out.read_text().splitlines()]

    rows = score(ens["final"], "--reward-ensemble-agg", "min")
    alone = [[r["score"] for r in score(ens["final"] / f"member{i}")] for i in range(2)]
    for j, row in enumerate(rows):
        assert row["member_scores"] == pytest.approx([alone[0][j], alone[1][j]], abs=1e-5)
        assert row["score"] == min(row["member_scores"])
    assert main(["score", "--model", str(ens["final"]), "--data", data, "--reward-ensemble-agg", "max"]) == 2
    assert "must be one of" in capsys.readouterr().err


def test_best_of_n_with_an_ensemble_keeps_the_best_aggregated_candidate(ens, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say something about cat\nHello\n")
    out = tmp_path / "best.jsonl"
    args = ["sample", "--model", str(ens["base"]), "--prompts", str(prompts), "--best-of", "3"]
    args += ["--reward-model", str(ens["final"]), "--reward-ensemble-agg", "mean-std", "--reward-ensemble-lambda", "2"]
    assert main([*args, "--out", str(out), "--max-new-tokens", "6", "--seed", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    scorer = RewardModel.from_pretrained(ens["final"], ensemble_agg="mean-std", ensemble_lambda=2.0)
    assert len(rows) == 2
    for row in rows:
        assert len(row["scores"]) == 3 and row["score"] == max(row["scores"])
    done = [(r, i) for r in rows for i, f in enumerate(r["finish_reasons"]) if f == "stop"]
    for r, i in done[:3]:  # a finished candidate re-scored by text gets the same aggregated score
        assert abs(float(scorer.score([r["messages"][:-1]], [r["candidates"][i]])) - r["scores"][i]) < 1e-4


@pytest.fixture
def ens_dir(tmp_path, model_dir):
    """A 2-member ensemble of untrained reward models (different heads and offsets) assembled by hand."""
    dirs = []
    for i in range(2):
        torch.manual_seed(100 + i)
        rm = load_sequence_classifier(str(model_dir))
        setattr(rm.config, OFFSET_KEY, 0.5 * i)
        dirs.append(save_pretrained(rm, None, tmp_path / f"m{i}"))
    return assemble_ensemble(tmp_path / "ens", dirs, {})


def test_ppo_with_an_ensemble_scores_the_min_of_its_members_and_logs_their_disagreement(
    tmp_path, model_dir, prompts_file, ens_dir
):
    from tests.test_ppo import _cfg

    from flywheel.train.ppo.roles import Reward
    from flywheel.train.ppo.rollout import build_sequences
    from flywheel.train.ppo.trainer import PPOTrainer

    trainer = PPOTrainer(_cfg(tmp_path, model_dir, prompts_file, reward_model=str(ens_dir), reward_ensemble_agg="min"))
    assert len(trainer.reward.members) == 2 and trainer.reward.biases == [0.0, 0.5]
    assert trainer.critic.bias == 0.0  # the critic starts from member 0
    from flywheel.engine import SamplingParams

    prompts = trainer.prompts[:4]
    gen = trainer.engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=1))
    s = build_sequences(prompts, gen.tokens, [r == "stop" for r in gen.finish_reasons], trainer.pad_id)
    args = (s.sequences, s.attention_mask, s.position_ids, s.prompt_len, s.response_mask)
    got = trainer.reward.forward(*args)
    end = trainer.reward.turn_end
    alone = torch.stack(
        [
            Reward(m, bias=b, turn_end=end).forward(*args)
            for m, b in zip(trainer.reward.members, [0.0, 0.5], strict=True)
        ]
    )
    torch.testing.assert_close(got, alone.min(0).values)
    # --close-truncated false: the cut responses (here every one: 6 tokens) are read where they stop
    cut = ~s.finished
    assert cut.any()
    open_cfg = _cfg(tmp_path, model_dir, prompts_file, "open", reward_model=str(ens_dir), close_truncated=False)
    where_stopped = PPOTrainer(open_cfg).reward.forward(*args)
    members, biases = trainer.reward.members, [0.0, 0.5]
    closed = Reward(members, bias=biases, turn_end=end).forward(*args)
    expected = Reward(members, bias=biases, turn_end=end, close_cut=False).forward(*args)
    torch.testing.assert_close(where_stopped, expected)
    assert not torch.allclose(where_stopped[cut], closed[cut])
    assert trainer.reward.last["reward_ensemble_std"] == pytest.approx(float(alone.std(0, correction=0).mean()))
    # the CLI: two steps, the disagreement in every metrics line
    out = tmp_path / "ppo"
    cli = ["ppo", "--model", str(model_dir), "--reward-model", str(ens_dir), "--prompts", str(prompts_file)]
    cli += ["--out", str(out), "--max-steps", "2", "--rollout-batch-size", "4", "--batch-size", "2"]
    cli += ["--ppo-epochs", "1", "--max-new-tokens", "6", "--progress", "false", "--reward-ensemble-agg", "min"]
    assert main(cli) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "score" in r]
    assert len(steps) == 2 and all(r["reward_ensemble_std"] > 0 for r in steps)
    assert all(r["score"] <= r["reward_ensemble_mean"] + 1e-6 for r in steps)


def test_rl_with_an_ensemble_and_single_model_errors(tmp_path, model_dir, prompts_file, ens_dir, capsys):
    out = tmp_path / "rl"
    cli = ["rl", "--estimator", "grpo", "--model", str(model_dir), "--prompts", str(prompts_file)]
    cli += ["--max-steps", "1", "--rollout-batch-size", "2", "--num-generations", "2", "--batch-size", "2"]
    cli += ["--ppo-epochs", "1", "--max-new-tokens", "4", "--progress", "false"]
    ens_args = ["--reward-ensemble-agg", "mean-std", "--reward-ensemble-lambda", "0.5"]
    assert main([*cli, "--reward-model", str(ens_dir), "--out", str(out), *ens_args]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["reward_ensemble_std"] > 0
    member = ens_dir / "member0"
    assert main([*cli, "--reward-model", str(member), "--out", str(tmp_path / "x"), *ens_args]) == 2
    assert "needs an ensemble reward model" in capsys.readouterr().err
    assert (
        main([*cli, "--reward-model", str(ens_dir), "--out", str(tmp_path / "y"), "--reward-ensemble-lambda", "2"])
        == 2
    )

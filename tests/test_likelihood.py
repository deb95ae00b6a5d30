"""The likelihood head (`flywheel rm --likelihood-head`): the features against a brute force, the fit, the scorer's
three interfaces against each other, PPO's reward role against the scorer, and the errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tests.test_reward import preference_rows, write_jsonl
from tests.test_reward_ensemble import _rm_args

from flywheel.cli import main
from flywheel.errors import UserError
from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
from flywheel.tokenization import render_prompt, render_scored_response
from flywheel.train.likelihood import (
    FEATURES,
    MANIFEST,
    LikelihoodHead,
    LikelihoodReward,
    answer_features,
    answer_logprobs,
    combine,
    fit_head,
    has_likelihood_head,
    pair_accuracy,
)
from flywheel.train.reward import RankingGroup, RewardConfig, RewardModel, likelihood_sample


def test_answer_features_are_the_summaries_of_each_answers_log_probs():
    lps = [torch.tensor([-0.5, -3.0, -0.1]), torch.tensor([-2.0]), torch.tensor([-0.2, -0.3])]
    got = answer_features(torch.tensor([1.0, -1.0, 0.5]), lps)
    want = [
        [1.0, -3.0, -3.0, -0.5, -3.6, 3.0],  # min_body: without the last (end-of-turn) token
        [-1.0, -2.0, -2.0, -2.0, -2.0, 1.0],  # one token: it is its own body
        [0.5, -0.3, -0.2, -0.2, -0.5, 2.0],
    ]
    assert got.shape == (3, len(FEATURES))
    torch.testing.assert_close(got, torch.tensor(want))
    with pytest.raises(ValueError, match="without tokens"):
        answer_features(torch.tensor([0.0]), [torch.tensor([])])


def test_answer_logprobs_batched_equal_one_sequence_at_a_time(tokenizer, tiny_model):
    rng = random.Random(3)
    prompts = [[rng.randrange(5, 300) for _ in range(rng.randint(1, 9))] for _ in range(7)]
    answers = [[rng.randrange(5, 300) for _ in range(rng.randint(1, 6))] for _ in range(7)]
    got = answer_logprobs(tiny_model, prompts, answers, batch_size=3)
    for p, a, lp in zip(prompts, answers, got, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(tiny_model(torch.tensor([p + a])).logits[0].double(), -1)
        want = torch.stack([logp[len(p) - 1 + t, tok] for t, tok in enumerate(a)]).float()
        torch.testing.assert_close(lp, want, atol=1e-4, rtol=1e-4)


def _synthetic_groups(n: int, seed: int) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]]]:
    """Groups whose order no linear score explains: an answer wins by its `min` feature where `score` is low, and by
    `score` where it is high."""
    gen = torch.Generator().manual_seed(seed)
    features, pairs = [], []
    for _ in range(n):
        k = 5
        f = torch.randn(k, len(FEATURES), generator=gen)
        utility = torch.where(f[:, 0] > 0, f[:, 0], f[:, 1]) + 0.05 * torch.randn(k, generator=gen)
        order = utility.argsort(descending=True).tolist()
        features.append(f)
        pairs.append([(order[i], order[j]) for i in range(k) for j in range(i + 1, k)])
    return features, pairs


def test_pair_accuracy_counts_ties_half():
    scores = [torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 2.0])]
    assert pair_accuracy(scores, [[(0, 1), (0, 2), (2, 1)], [(1, 0)]]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert pair_accuracy([], []) == 0.0


def test_fit_head_learns_a_nonlinear_order_and_is_deterministic_with_its_seed():
    features, pairs = _synthetic_groups(200, seed=0)
    head, accuracy = fit_head(features, pairs, seed=5)
    assert accuracy > 0.85
    again, _ = fit_head(features, pairs, seed=5)
    other, _ = fit_head(features, pairs, seed=6)
    x = torch.cat(features)
    with torch.no_grad():
        assert torch.equal(head(x), again(x))
        assert not torch.equal(head(x), other(x))
    # held out: new groups from the same rule
    test_features, test_pairs = _synthetic_groups(100, seed=1)
    right = total = 0
    with torch.no_grad():
        for f, ps in zip(test_features, test_pairs, strict=True):
            s = head(f)
            right += sum(int(s[w] > s[lo]) for w, lo in ps)
            total += len(ps)
    assert right / total > 0.8
    with pytest.raises(UserError, match="no ranked pair"):
        fit_head(features[:2], [[], []], seed=0)


def test_combine_keeps_the_ensembles_conservatism_outside_the_head():
    head = LikelihoodHead()
    members = torch.tensor([[1.0, 0.0], [3.0, -2.0]])  # (N=2, B=2)
    mean = members.mean(0)
    agg = mean - members.std(0, correction=0)
    lps = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    with torch.no_grad():
        want = head(answer_features(mean, lps)) - (mean - agg) - 0.25
    torch.testing.assert_close(combine(head, members, agg, lps, 0.25), want)


@pytest.fixture(scope="module")
def lik(tmp_path_factory, tokenizer):
    """A base model, 60 synthetic rankings and a 2-member ensemble trained with --likelihood-head."""
    root = tmp_path_factory.mktemp("lik")
    base = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=0)
    save_pretrained(base, tokenizer, root / "base")
    data = write_jsonl(root / "train.jsonl", preference_rows(60, seed=10))
    args = _rm_args(root / "base", data, root / "rm", "--rm-ensemble", "2", "--likelihood-head", "true")
    assert main([*args, "--likelihood-rankings", "40"]) == 0  # of the 54 training rankings
    return {"root": root, "base": root / "base", "data": data, "final": root / "rm" / "final"}


def test_rm_likelihood_head_saves_a_self_contained_scorer(lik):
    final = lik["final"]
    assert has_likelihood_head(final)
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["features"] == list(FEATURES) and manifest["seed"] == 0 and manifest["fit_rankings"] == 40
    assert 0 <= manifest["eval_accuracy"] <= 1 and 0 <= manifest["eval_accuracy_without"] <= 1
    assert (final / "likelihood" / "reference" / "config.json").is_file()
    rm = RewardModel.from_pretrained(final, ensemble_agg="mean-std")
    assert isinstance(rm, LikelihoodReward) and len(rm.inner) == 2
    plain = RewardModel.from_pretrained(final, likelihood=False)
    assert not isinstance(plain, LikelihoodReward)


def _conversations(n: int) -> tuple[list[list[dict[str, str]]], list[str]]:
    rows = preference_rows(n, seed=3)
    return [[{"role": "user", "content": r["prompt"]}] for r in rows], [r["completions"][0] for r in rows]


def test_the_likelihood_scorers_interfaces_agree_and_read_the_reference(lik):
    rm = RewardModel.from_pretrained(lik["final"], ensemble_agg="mean-std")
    prompts, answers = _conversations(6)
    by_text = rm.score(prompts, answers)
    tok = rm.tokenizer
    prompt_ids = [render_prompt(tok, p) for p in prompts]
    answer_ids = [render_scored_response(tok, p, a)[0] for p, a in zip(prompts, answers, strict=True)]
    torch.testing.assert_close(rm.score_ids(prompt_ids, answer_ids), by_text, atol=1e-4, rtol=1e-4)
    groups = [RankingGroup(p, [a], [], [render_scored_response(tok, q, x)[1]])
              for p, a, q, x in zip(prompt_ids, answer_ids, prompts, answers, strict=True)]  # fmt: skip
    torch.testing.assert_close(torch.cat(rm.score_groups(groups)), by_text, atol=1e-4, rtol=1e-4)
    # by hand: the members' mean and spread, the reference's log-probs, the head
    members = rm.inner.score_members(prompts, answers)
    lps = answer_logprobs(rm.reference, prompt_ids, answer_ids)
    want = combine(rm.head, members, rm.inner.aggregate(members), lps, rm.offset)
    torch.testing.assert_close(by_text, want)
    # the likelihood matters: another reference gives other scores
    with torch.no_grad():
        for p in rm.reference.parameters():
            p.add_(0.5 * torch.randn_like(p))
    assert not torch.allclose(rm.score(prompts, answers), by_text)


def test_a_cut_response_is_read_closed_with_the_end_of_turn_token(lik):
    rm = RewardModel.from_pretrained(lik["final"], ensemble_agg="mean-std")
    prompts, answers = _conversations(4)
    prompt_ids = [render_prompt(rm.tokenizer, p) for p in prompts]
    full = [render_scored_response(rm.tokenizer, p, a)[0] for p, a in zip(prompts, answers, strict=True)]
    end = rm.turn_end.token_id
    assert end is not None and all(a[-1] == end and len(a) > 3 for a in full)
    cut = [a[:-2] for a in full]  # stopped by a length limit: no end-of-turn token
    closed = [[*a, end] for a in cut]
    assert [rm.turn_end.answer(a) for a in cut] == closed and rm.turn_end.answer(full[0]) == full[0]
    assert rm.turn_end.answer(cut[0], close_cut=False) == cut[0]
    members = torch.stack([m.score_ids(prompt_ids, cut) for m in rm.members])
    want = combine(
        rm.head, members, rm.inner.aggregate(members), answer_logprobs(rm.reference, prompt_ids, closed), rm.offset
    )
    torch.testing.assert_close(rm.score_ids(prompt_ids, cut), want)
    # read where it stops: the features of the sampled tokens alone
    members = torch.stack([m.score_ids(prompt_ids, cut, close_cut=False) for m in rm.members])
    want = combine(
        rm.head, members, rm.inner.aggregate(members), answer_logprobs(rm.reference, prompt_ids, cut), rm.offset
    )
    torch.testing.assert_close(rm.score_ids(prompt_ids, cut, close_cut=False), want)


def test_ppo_reward_role_scores_rollouts_as_the_scorer_does(tmp_path, lik, prompts_file, monkeypatch):
    from tests.test_ppo import _cfg

    from flywheel.engine import SamplingParams
    from flywheel.train.ppo.rollout import build_sequences
    from flywheel.train.ppo.trainer import PPOTrainer

    cfg = _cfg(tmp_path, lik["base"], prompts_file, reward_model=str(lik["final"]), reward_ensemble_agg="mean-std")
    trainer = PPOTrainer(cfg)
    assert trainer.reward.likelihood is not None
    prompts = trainer.prompts[:6]
    gen = trainer.engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=1))
    s = build_sequences(prompts, gen.tokens, [r == "stop" for r in gen.finish_reasons], trainer.pad_id)
    got = trainer.reward.forward(s.sequences, s.attention_mask, s.position_ids, s.prompt_len, s.response_mask)
    scorer = RewardModel.from_pretrained(lik["final"], ensemble_agg="mean-std")
    want = scorer.score_ids(prompts, gen.tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert any(r != "stop" for r in gen.finish_reasons)  # cut responses are read closed by both
    # offloaded (--offload-frozen): the reference and the members visit the device together, once per batch
    offloaded = PPOTrainer(_cfg(tmp_path, lik["base"], prompts_file, reward_model=str(lik["final"]),
                                reward_ensemble_agg="mean-std", offload_frozen=True))  # fmt: skip
    moves, move = [], offloaded.reward.module.to
    monkeypatch.setattr(offloaded.reward.module, "to", lambda d: (moves.append(torch.device(d)), move(d))[1])
    got = offloaded.reward.forward(s.sequences, s.attention_mask, s.position_ids, s.prompt_len, s.response_mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert moves == [s.sequences.device, torch.device("cpu")]
    # two PPO steps through the CLI
    out = tmp_path / "ppo"
    cli = ["ppo", "--model", str(lik["base"]), "--reward-model", str(lik["final"]), "--prompts", str(prompts_file)]
    cli += ["--out", str(out), "--max-steps", "2", "--rollout-batch-size", "4", "--batch-size", "2"]
    cli += ["--ppo-epochs", "1", "--max-new-tokens", "6", "--progress", "false", "--threads", "1"]
    assert main(cli) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum("score" in r for r in rows) == 2


def test_the_head_is_fitted_on_a_seeded_sample_of_the_rankings_in_their_order():
    rankings = [f"r{i}" for i in range(50)]
    got = likelihood_sample(rankings, 20, seed=3)
    assert len(got) == 20 == len(set(got)) and got == sorted(got, key=rankings.index)
    assert got == likelihood_sample(rankings, 20, seed=3) != likelihood_sample(rankings, 20, seed=4)
    assert likelihood_sample(rankings, 0, seed=3) == rankings == likelihood_sample(rankings, 50, seed=3)
    with pytest.raises(UserError, match="--likelihood-rankings"):
        RewardConfig(model="m", data="d", out="o", likelihood_rankings=-1).validate()


def test_likelihood_head_errors_are_one_line(lik, tmp_path, capsys):
    # a reward model is no language model to read a likelihood from
    member = lik["final"] / "member0"
    out = tmp_path / "bad"
    assert main(_rm_args(member, lik["data"], out, "--likelihood-head", "true")) == 2
    assert "not a language model" in capsys.readouterr().err
    assert not out.exists()
    # a manifest of other features
    bad = tmp_path / "copy"
    import shutil

    shutil.copytree(lik["final"], bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**manifest, "features": ["score", "min"]}))
    with pytest.raises(UserError, match="likelihood head reads"):
        RewardModel.from_pretrained(bad)
    (bad / MANIFEST).write_text("{")
    with pytest.raises(UserError, match="unreadable likelihood head manifest"):
        RewardModel.from_pretrained(bad)


def test_a_later_rounds_reward_model_keeps_the_first_reference(lik, tmp_path):
    out = tmp_path / "round2"
    args = _rm_args(lik["final"], lik["data"], out, "--rm-ensemble", "2", "--likelihood-head", "true")
    assert main(args) == 0
    first = RewardModel.from_pretrained(lik["final"])
    second = RewardModel.from_pretrained(out / "final")
    for a, b in zip(first.reference.parameters(), second.reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_one_reward_model_with_a_head_scores_alike_from_text_ids_and_flywheel_score(lik, tmp_path):
    out = tmp_path / "single"
    assert main(_rm_args(lik["base"], lik["data"], out, "--likelihood-head", "true")) == 0
    rm = RewardModel.from_pretrained(out / "final")
    assert isinstance(rm, LikelihoodReward) and isinstance(rm.inner, RewardModel)
    prompts, answers = _conversations(5)
    by_text = rm.score(prompts, answers)
    ids = [render_prompt(rm.tokenizer, p) for p in prompts]
    answer_ids = [render_scored_response(rm.tokenizer, p, a)[0] for p, a in zip(prompts, answers, strict=True)]
    torch.testing.assert_close(rm.score_ids(ids, answer_ids), by_text, atol=1e-4, rtol=1e-4)
    lps = answer_logprobs(rm.reference, ids, answer_ids)
    plain = rm.inner.score(prompts, answers)
    torch.testing.assert_close(by_text, combine(rm.head, plain[None], plain, lps, rm.offset))
    data = write_jsonl(
        tmp_path / "convs.jsonl",
        [{"messages": [*p, {"role": "assistant", "content": a}]} for p, a in zip(prompts, answers, strict=True)],
    )
    scores = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(out / "final"), "--data", data, "--out", str(scores)]) == 0
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert [r["score"] for r in rows] == pytest.approx(by_text.tolist(), abs=1e-4)
    assert [r["reward_model_score"] for r in rows] == pytest.approx(plain.tolist(), abs=1e-4)
    raw = tmp_path / "raw.jsonl"
    assert (
        main(["score", "--model", str(out / "final"), "--data", data, "--out", str(raw), "--normalize", "false"]) == 0
    )
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    assert [r["score"] for r in rows] == pytest.approx((by_text + rm.offset).tolist(), abs=1e-4)
    assert [r["reward_model_score"] for r in rows] == pytest.approx((plain + rm.inner.offset).tolist(), abs=1e-4)


def test_flywheel_score_on_an_ensemble_with_a_head_gives_each_members_score(lik, tmp_path):
    rm = RewardModel.from_pretrained(lik["final"])
    prompts, answers = _conversations(4)
    data = write_jsonl(
        tmp_path / "convs.jsonl",
        [{"messages": [*p, {"role": "assistant", "content": a}]} for p, a in zip(prompts, answers, strict=True)],
    )
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(lik["final"]), "--data", data, "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["score"] for r in rows] == pytest.approx(rm.score(prompts, answers).tolist(), abs=1e-4)
    members = rm.inner.score_members(prompts, answers)  # (2, B)
    torch.testing.assert_close(torch.tensor([r["member_scores"] for r in rows]), members.T, atol=1e-4, rtol=1e-4)

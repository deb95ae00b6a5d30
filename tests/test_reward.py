"""Reward model: the ranking loss, the K-forwards batching, training on a synthetic preference, normalisation, the
scoring API, `flywheel eval rm`, best-of-n sampling, and one-line errors on bad input."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch

from flywheel.cli import main
from flywheel.data.formats import Ranking
from flywheel.eval.reward import group_ranks, kendall_tau, wilson_interval
from flywheel.models import build_causal_lm, config_for_tokenizer, load_sequence_classifier, save_pretrained
from flywheel.sample import pick_best
from flywheel.train.reward import (
    OFFSET_KEY,
    RankingGroup,
    RewardModel,
    collate_groups,
    encode_rankings,
    grouped_ranking_loss,
    normalize_rewards,
    ranking_loss,
    rm_loss,
    sequence_rewards,
)

WORDS = (
    "the cat dog says hello world capital of France Paris Spain Madrid number sort list reverse word count letters"
).split()
GOOD = "please"  # the synthetic labelers prefer answers that contain this word


def preference_rows(n: int, seed: int, k_max: int = 4) -> list[dict]:
    """K-way rankings (K = 2..k_max) where answers with GOOD tie for first and the others tie for last."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(2, k_max)
        n_good = rng.randint(1, k - 1)
        answers = []
        for j in range(k):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
            if j < n_good:
                words.insert(rng.randrange(len(words) + 1), GOOD)
            answers.append(" ".join(words) + f" {j}")  # the suffix keeps answers distinct
        perm = list(range(k))
        rng.shuffle(perm)
        order = [[i for i, j in enumerate(perm) if j < n_good], [i for i, j in enumerate(perm) if j >= n_good]]
        rows.append(
            {
                "prompt": f"Say something about {rng.choice(WORDS)}",
                "completions": [answers[j] for j in perm],
                "order": order,
            }
        )
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_ranking_loss_equals_hand_computed_value_for_k4():
    r = [1.25, -0.5, 2.0, 0.3]
    pairs = Ranking([_user("q")], ["a", "b", "c", "d"], [[2], [0], [3], [1]]).pairs()
    assert sorted(pairs) == sorted([(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)])
    # -1/C(4,2) * sum log sigmoid(r_w - r_l), each term written out
    terms = [r[2] - r[0], r[2] - r[3], r[2] - r[1], r[0] - r[3], r[0] - r[1], r[3] - r[1]]
    expected = -sum(math.log(1 / (1 + math.exp(-d))) for d in terms) / 6
    got = ranking_loss(torch.tensor(r, dtype=torch.float64), pairs)
    assert abs(float(got) - expected) < 1e-6
    # a margin shifts every difference; ties are not pairs
    with_margin = -sum(math.log(1 / (1 + math.exp(-(d - 0.5)))) for d in terms) / 6
    assert abs(float(ranking_loss(torch.tensor(r, dtype=torch.float64), pairs, margin=0.5)) - with_margin) < 1e-6
    tied = Ranking([_user("q")], ["a", "b", "c", "d"], [[2], [0, 3], [1]]).pairs()
    assert len(tied) == 5 and (0, 3) not in tied and (3, 0) not in tied


@pytest.mark.parametrize("shift", [-7.0, 0.001, 3.5, 100.0])
def test_ranking_loss_is_invariant_to_a_constant_added_to_every_reward(shift):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, generator=g, dtype=torch.float64)
    pairs = [(0, 1), (0, 2), (3, 1), (4, 2), (3, 2)]
    assert abs(float(ranking_loss(r + shift, pairs)) - float(ranking_loss(r, pairs))) < 1e-9


def test_grouped_loss_is_the_per_ranking_mean_not_the_per_pair_mean():
    rewards = torch.tensor([0.3, -1.0, 2.0, 0.5, 0.1], dtype=torch.float64)  # group 0: 0..2, group 1: 3..4
    pairs0, pairs1 = [(2, 0), (2, 1), (0, 1)], [(1, 0)]
    per_group = grouped_ranking_loss(
        rewards, torch.tensor([2, 2, 0, 4]), torch.tensor([0, 1, 1, 3]), torch.tensor([0, 0, 0, 1]), 2
    )
    assert torch.allclose(
        per_group, torch.stack([ranking_loss(rewards[:3], pairs0), ranking_loss(rewards[3:], pairs1)])
    )


def _user(text):
    from flywheel.data.formats import Message

    return Message("user", text)


@pytest.fixture
def rm_model(model_dir):
    return load_sequence_classifier(str(model_dir))


def _groups(tokenizer, rows):
    return encode_rankings(
        tokenizer, [Ranking([_user(r["prompt"])], r["completions"], r["order"]) for r in rows], max_length=256
    )


def _scored_tokens(group):
    """Tokens of a group's answers with the template's tail after each (ChatML: "\n"), where rewards are read."""
    assert group.tails and all(len(t) == 1 for t in group.tails)
    return sum(len(group.scored(k)) for k in range(group.k))


def test_exactly_k_forwards_per_ranking_in_one_call(tokenizer, rm_model):
    groups = _groups(tokenizer, preference_rows(3, seed=1, k_max=4))
    ks = [g.k for g in groups]
    seen = {"backbone_calls": 0, "backbone_rows": 0, "backbone_tokens": 0, "scored": 0}

    def on_backbone(module, args, kwargs, out):
        seen["backbone_calls"] += 1
        mask = kwargs["attention_mask"]
        seen["backbone_rows"] += kwargs["input_ids"].shape[0]
        seen["backbone_tokens"] += int(mask.diagonal(dim1=-2, dim2=-1).sum()) if mask.ndim == 4 else int(mask.sum())

    def on_head(module, args, out):
        seen["scored"] += args[0].shape[0]

    rm_model.base_model.register_forward_hook(on_backbone, with_kwargs=True)
    rm_model.score.register_forward_hook(on_head)
    # K separate sequences per ranking (no prompt sharing): sum(K) rows, one forward call
    rm_loss(rm_model, collate_groups(groups, tokenizer.pad_token_id, share_prompt=False))
    assert seen == {
        "backbone_calls": 1,
        "backbone_rows": sum(ks),
        "scored": sum(ks),
        "backbone_tokens": sum(g.k * len(g.prompt_ids) + _scored_tokens(g) for g in groups),
    }
    # shared prompt: one row per ranking; K answers scored; the prompt's tokens computed once
    seen.update(backbone_calls=0, backbone_rows=0, backbone_tokens=0, scored=0)
    batch = collate_groups(groups, tokenizer.pad_token_id)
    rm_loss(rm_model, batch)
    assert seen["backbone_calls"] == 1 and seen["backbone_rows"] == len(groups) and seen["scored"] == sum(ks)
    assert batch["tokens"] == sum(len(g.prompt_ids) + _scored_tokens(g) for g in groups)
    assert sum(ks) > len(groups) * 2 and batch["weight"] == len(groups)


def test_reward_does_not_depend_on_padding_batch_or_layout(tokenizer, rm_model):
    from transformers import AutoModelForSequenceClassification

    groups = _groups(tokenizer, preference_rows(4, seed=2))
    pad = tokenizer.pad_token_id
    together = sequence_rewards(rm_model, collate_groups(groups, pad))
    separate = sequence_rewards(rm_model, collate_groups(groups, pad, share_prompt=False))
    alone = torch.cat(
        [
            sequence_rewards(rm_model, collate_groups([RankingGroup(g.prompt_ids, [r], [], [t])], pad))
            for g in groups
            for r, t in zip(g.responses, g.tails, strict=True)
        ]
    )
    shuffled = sequence_rewards(rm_model, collate_groups(groups[::-1], pad))
    flat_reversed = torch.cat(list(reversed(together.split([g.k for g in groups]))))
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(shuffled, flat_reversed, atol=1e-5, rtol=0)
    # plain transformers (its own last-non-pad pooling, right padding) gives the same numbers
    plain = AutoModelForSequenceClassification.from_config(rm_model.config)
    plain.load_state_dict(rm_model.state_dict())
    seqs = [g.prompt_ids + g.scored(k) for g in groups for k in range(g.k)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        hf = plain(input_ids=ids, attention_mask=(ids != pad).long()).logits.squeeze(-1)
    torch.testing.assert_close(together.detach(), hf, atol=1e-5, rtol=0)
    # eager attention takes the additive form of the same mask
    rm_model.set_attn_implementation("eager")
    eager = sequence_rewards(rm_model, collate_groups(groups, pad, mask_dtype=torch.float32))
    torch.testing.assert_close(together, eager, atol=1e-5, rtol=0)


def test_overlong_answers_are_dropped_or_truncated_with_a_summary(tokenizer, caplog):
    long = " ".join(["hello world"] * 60)
    rankings = [
        Ranking([_user("q one")], ["short a", long, "short b"], [[0], [1], [2]]),
        Ranking([_user("q two")], [long, "tiny"], [[0], [1]]),
    ]
    with caplog.at_level("WARNING", logger="flywheel"):
        groups = encode_rankings(tokenizer, rankings, max_length=40, source="prefs.jsonl")
    assert [g.k for g in groups] == [2] and groups[0].pairs == [(0, 1)]
    assert "prefs.jsonl: dropped 2 of 5 answers longer than 40 tokens" in caplog.text
    assert "1 rankings left without a ranked pair" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="flywheel"):
        groups = encode_rankings(tokenizer, rankings, max_length=40, overlong="truncate", source="prefs.jsonl")
    assert [g.k for g in groups] == [3, 2]
    assert all(len(g.prompt_ids) + len(r) <= 40 for g in groups for r in g.responses)
    assert "2 of 2 rankings longer than 40 tokens were truncated" in caplog.text


def test_normalisation_goes_into_a_head_bias_when_there_is_one(rm_model):
    rm_model.score = torch.nn.Linear(rm_model.score.in_features, 1, bias=True)
    before = rm_model.score.bias.detach().clone()
    assert normalize_rewards(rm_model, 2.5) == 0.0
    assert torch.allclose(rm_model.score.bias.detach(), before - 2.5) and getattr(rm_model.config, OFFSET_KEY) == 0.0


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tokenizer):
    """An RM trained (default 1 epoch) on 200 synthetic rankings: answers containing GOOD win."""
    root = tmp_path_factory.mktemp("rm")
    base = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=0)
    save_pretrained(base, tokenizer, root / "base")
    train = write_jsonl(root / "train.jsonl", preference_rows(200, seed=10))
    heldout = write_jsonl(root / "heldout.jsonl", preference_rows(100, seed=11))
    code = main(
        [
            "rm",
            "--model",
            str(root / "base"),
            "--data",
            train,
            "--out",
            str(root / "run"),
            "--lr",
            "3e-3",
            "--batch-size",
            "8",
            "--eval-split",
            "0",
            "--progress",
            "false",
            "--log-every",
            "5",
        ]
    )
    assert code == 0
    return {"root": root, "final": root / "run" / "final", "train": train, "heldout": heldout}


def test_rm_learns_a_synthetic_preference_and_saves_a_plain_classifier(trained_rm, tokenizer):
    from transformers import AutoModelForSequenceClassification

    run = trained_rm["root"] / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 25  # 1 epoch (the default) of 200 rankings at 8 per step
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"]
    assert "epochs: 1.0" in (run / "config.yaml").read_text()
    rm = RewardModel.from_pretrained(trained_rm["final"])
    rows = preference_rows(100, seed=11)
    groups = encode_rankings(
        rm.tokenizer, [Ranking([_user(r["prompt"])], r["completions"], r["order"]) for r in rows], max_length=256
    )
    scores = rm.score_groups(groups)
    pairs = [(s[w] > s[lo]).item() for g, s in zip(groups, scores, strict=True) for w, lo in g.pairs]
    assert sum(pairs) / len(pairs) > 0.95
    # plain transformers loads it: a 1-label classifier, pad != eos, raw score = normalised score + offset
    plain = AutoModelForSequenceClassification.from_pretrained(trained_rm["final"])
    assert type(plain).__name__ == "LlamaForSequenceClassification" and plain.config.num_labels == 1
    assert plain.config.pad_token_id != plain.config.eos_token_id
    offset = getattr(plain.config, OFFSET_KEY)
    g = groups[0]
    with torch.no_grad():
        raw = plain(input_ids=torch.tensor([g.prompt_ids + g.scored(0)])).logits.item()
    assert abs(raw - offset - float(scores[0][0])) < 1e-4


def test_reference_answers_score_mean_zero_after_training(trained_rm):
    rm = RewardModel.from_pretrained(trained_rm["final"])
    prompts, answers = [], []
    for row in preference_rows(200, seed=10):  # the default reference: top-ranked answers of the training data
        for i in row["order"][0]:
            prompts.append([{"role": "user", "content": row["prompt"]}])
            answers.append(row["completions"][i])
    scores = rm.score(prompts, answers)
    assert abs(float(scores.mean())) < 1e-3
    assert abs(rm.offset) > 1e-3 and torch.allclose(rm.score(prompts, answers, normalize=False) - rm.offset, scores)
    extra = json.loads((trained_rm["final"] / "flywheel.json").read_text())
    assert extra["reference"] == "top-ranked answers of the training rankings" and extra["reference_count"] == len(
        answers
    )


def test_scoring_api_batches_and_groups_without_changing_scores(trained_rm):
    rm = RewardModel.from_pretrained(trained_rm["final"], batch_size=3)
    prompts = [[{"role": "user", "content": f"Say something about {w}"}] for w in ("cat", "dog", "cat", "Paris")]
    answers = ["the cat says please", "woof", "hello world", "please sort the list"]
    together = rm.score(prompts, answers)
    one_by_one = torch.cat([rm.score([p], [a]) for p, a in zip(prompts, answers, strict=True)])
    torch.testing.assert_close(together, one_by_one, atol=1e-5, rtol=0)
    from flywheel.tokenization import render_prompt, render_response

    ids = rm.score_ids(
        [render_prompt(rm.tokenizer, p) for p in prompts],
        [render_response(rm.tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)],
    )
    torch.testing.assert_close(ids, together)
    assert rm.score(prompts[:1], answers[:1], normalize=True).shape == (1,)
    assert RewardModel.from_pretrained(trained_rm["final"], bf16=True).score(prompts, answers).dtype == torch.float32


def test_wilson_interval_and_kendall_tau():
    lo, hi = wilson_interval(95, 100)
    assert abs(lo - 0.8882) < 1e-3 and abs(hi - 0.9785) < 1e-3  # textbook values
    assert abs(wilson_interval(10, 10)[1] - 1.0) < 1e-12 and abs(wilson_interval(10, 10)[0] - 0.7225) < 1e-3
    assert kendall_tau([3.0, 2.0, 1.0], [0, 1, 2]) == 1.0
    assert kendall_tau([1.0, 2.0, 3.0], [0, 1, 2]) == -1.0
    assert abs(kendall_tau([3.0, 1.0, 2.0, 0.0], [0, 1, 2, 3]) - 2 / 3) < 1e-12  # 5 concordant, 1 discordant
    # tau-b with tied labels: 2 concordant, 1 pair tied in the labels only -> 2 / sqrt(3 * 2)
    assert abs(kendall_tau([3.0, 2.0, 1.0], [0, 0, 1]) - 2 / math.sqrt(6)) < 1e-12
    assert kendall_tau([1.0, 1.0], [0, 1]) is None
    assert group_ranks(RankingGroup([1], [[1], [2], [3], [4]], [(2, 0), (2, 1), (2, 3), (0, 3), (1, 3)])) == [
        1,
        1,
        0,
        3,
    ]  # competition ranking: how many answers are ranked above


def test_eval_rm_writes_metrics_and_histogram(trained_rm, tmp_path, capsys):
    out = tmp_path / "eval"
    assert (
        main(["eval", "rm", "--model", str(trained_rm["final"]), "--data", trained_rm["heldout"], "--out", str(out)])
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["accuracy"] > 0.95 and m["accuracy_ci95"][0] < m["accuracy"] <= m["accuracy_ci95"][1]
    assert m["n_rankings"] == 100 and m["mean_chosen"] > m["mean_rejected"] and m["kendall_tau"] > 0.5
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", "nonsense"]) == 2


def test_best_of_n_keeps_the_highest_scored_candidate(trained_rm, tmp_path):
    assert pick_best(torch.tensor([0.1, 0.5, 0.2, 3.0, -1.0, 3.0]), 3) == [1, 0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say something about cat\nSay something about Paris\nHello\n")
    out = tmp_path / "best.jsonl"
    assert (
        main(
            [
                "sample",
                "--model",
                str(trained_rm["root"] / "base"),
                "--prompts",
                str(prompts),
                "--best-of",
                "4",
                "--reward-model",
                str(trained_rm["final"]),
                "--out",
                str(out),
                "--max-new-tokens",
                "8",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3
    rm = RewardModel.from_pretrained(trained_rm["final"])
    for row in rows:
        assert len(row["candidates"]) == 4 and row["score"] == max(row["scores"])
        assert row["response"] == row["candidates"][row["scores"].index(row["score"])]
        assert row["messages"][-1] == {"role": "assistant", "content": row["response"]}
    # scores are the reward model's: re-scoring a finished candidate by text gives the same number
    done = [(r, i) for r in rows for i, f in enumerate(r["finish_reasons"]) if f == "stop"]
    for r, i in done[:3]:
        again = rm.score([r["messages"][:-1]], [r["candidates"][i]])
        assert abs(float(again) - r["scores"][i]) < 1e-4
    # Expert iteration: the kept answers are SFT data as they stand (one round: best-of-N, then fine-tune on them).
    from flywheel.data.io import read_conversations

    kept = read_conversations(str(out))
    assert [c.messages[-1].content for c in kept] == [r["response"] for r in rows]
    sft = tmp_path / "expert"
    args = ["sft", "--model", str(trained_rm["root"] / "base"), "--data", str(out), "--out", str(sft)]
    assert main([*args, "--max-steps", "2", "--batch-size", "3", "--progress", "false"]) == 0
    assert (sft / "final" / "config.json").is_file()
    assert (
        main(
            [
                "sample",
                "--model",
                str(trained_rm["root"] / "base"),
                "--prompts",
                str(prompts),
                "--best-of",
                "2",
                "--out",
                str(out),
            ]
        )
        == 2
    )  # best-of needs a reward model


def test_best_of_n_never_keeps_an_empty_answer(trained_rm, tmp_path, monkeypatch, caplog):
    """The output reads back as SFT data, which needs a non-empty answer: the best non-empty candidate is kept, and a
    prompt with none is left out (counted)."""
    import flywheel.sample as sample_mod

    assert pick_best(torch.tensor([3.0, 1.0, 2.0, 5.0]), 2, [False, True, False, False]) == [1, None]
    decode, calls = sample_mod._decode, []

    def every_other_empty(tokenizer, ids):
        calls.append(ids)
        return "" if len(calls) % 2 else decode(tokenizer, ids)

    monkeypatch.setattr(sample_mod, "_decode", every_other_empty)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say something about cat\nHello\n")
    args = ["sample", "--model", str(trained_rm["root"] / "base"), "--prompts", str(prompts), "--max-new-tokens", "6"]
    out = tmp_path / "best.jsonl"
    rm_args = ["--best-of", "2", "--reward-model", str(trained_rm["final"]), "--out", str(out)]
    assert main([*args, *rm_args]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["candidates"][0] == "" and r["response"] == r["candidates"][1] for r in rows)
    calls.clear()
    monkeypatch.setattr(sample_mod, "_decode", lambda tokenizer, ids: "")
    with caplog.at_level("WARNING", logger="flywheel"):
        assert main([*args, "--out", str(out)]) == 0
    assert out.read_text() == "" and "2 of 2 prompts got only empty answers" in caplog.text


def test_sample_checks_every_prompt_before_sampling(trained_rm, tmp_path, capsys):
    """A prompt longer than the model's context is an error at its file and line before anything is sampled, or is
    skipped (counted) with --skip-bad; the other prompts' answers are written."""
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": "hi"}, {"prompt": "hello " * 300}, {"prompt": "Say cat"}]
    )
    out = tmp_path / "out.jsonl"
    args = ["sample", "--model", str(trained_rm["root"] / "base"), "--prompts", prompts, "--out", str(out)]
    args += ["--max-new-tokens", "3", "--batch-size", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flywheel sample: {prompts}:2: the prompt has") and "context is 256" in err, err
    assert not out.exists()
    assert main([*args, "--skip-bad"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == ["hi", "Say cat"]


def test_a_reward_model_whose_tokenizer_has_no_pad_token_scores(trained_rm, tmp_path):
    """Many released tokenizers (Llama 3, Mistral) have no pad token; flywheel gives them one, a new id, and the reward
    model's embeddings must grow to it, as training grows them (a padded batch indexed past the table)."""
    import shutil

    nopad = tmp_path / "nopad"
    shutil.copytree(trained_rm["final"], nopad)
    tok = json.loads((nopad / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == "<|pad|>":
            added["content"], added["special"] = "<unused0>", False
    tok["model"]["vocab"]["<unused0>"] = tok["model"]["vocab"].pop("<|pad|>")
    (nopad / "tokenizer.json").write_text(json.dumps(tok))
    for name in ("tokenizer_config.json", "config.json"):
        cfg = json.loads((nopad / name).read_text())
        cfg.pop("pad_token", None), cfg.pop("pad_token_id", None)
        (nopad / name).write_text(json.dumps(cfg))
    prompts = [[{"role": "user", "content": "Say cat"}], [{"role": "user", "content": "a longer question than that"}]]
    answers = ["GOOD cat", "no"]
    rm = RewardModel.from_pretrained(nopad)
    assert rm.tokenizer.pad_token_id == len(rm.tokenizer) - 1  # a new token
    assert torch.allclose(
        rm.score(prompts, answers), RewardModel.from_pretrained(trained_rm["final"]).score(prompts, answers), atol=1e-5
    )


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"prompt": "q", "completions": ["only one"], "order": [[0]]}, "at least 2 completions"),
        ({"prompt": "q", "completions": ["same", "same"], "order": [[0], [1]]}, "duplicate candidates"),
        ({"prompt": "q", "completions": ["a", "b", "c"], "order": [[0, 1, 2]]}, "all candidates tied"),
        ({"prompt": "q", "chosen": "x", "rejected": "x"}, "duplicate candidates"),
    ],
)
def test_bad_rankings_are_one_line_errors(tmp_path, model_dir, capsys, record, fragment):
    good = {"prompt": "q", "completions": ["a", "b"], "order": [[0], [1]]}
    data = write_jsonl(tmp_path / "prefs.jsonl", [good, record])
    assert main(["rm", "--model", str(model_dir), "--data", data, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flywheel rm: {data}:2:") and fragment in err[0], err
    assert not (tmp_path / "o" / "final").exists()


def test_skip_bad_and_overlong_are_summarised_and_all_overlong_is_an_error(tmp_path, model_dir, caplog, capsys):
    long = " ".join(["hello world"] * 80)
    rows = preference_rows(12, seed=3) + [
        {"prompt": "q", "completions": ["a"], "order": [[0]]},
        {"prompt": "q", "completions": [long, "b"], "order": [[0], [1]]},
    ]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with caplog.at_level("WARNING", logger="flywheel"):
        assert (
            main(
                [
                    "rm",
                    "--model",
                    str(model_dir),
                    "--data",
                    data,
                    "--out",
                    str(tmp_path / "o"),
                    "--skip-bad",
                    "--max-steps",
                    "1",
                    "--max-length",
                    "64",
                    "--progress",
                    "false",
                ]
            )
            == 0
        )
    assert "skipped 1 of 14 records" in caplog.text and "too few candidates" in caplog.text
    assert "dropped 1 of" in caplog.text and "answers longer than 64 tokens" in caplog.text
    only_long = write_jsonl(tmp_path / "long.jsonl", [rows[-1]])
    capsys.readouterr()
    assert (
        main(
            ["rm", "--model", str(model_dir), "--data", only_long, "--out", str(tmp_path / "o2"), "--max-length", "64"]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable rankings" in err[0] and "--overlong truncate" in err[0]
    assert (
        main(["rm", "--model", str(model_dir), "--data", data, "--out", str(tmp_path / "o3"), "--overlong", "cut"])
        == 2
    )
    assert "--overlong must be one of drop, truncate" in capsys.readouterr().err


def test_cli_error_is_one_line_without_traceback(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "completions": ["a"], "order": [[0]]}])
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "flywheel",
            "rm",
            "--model",
            str(model_dir),
            "--data",
            data,
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"flywheel rm: {data}:1: a ranking needs at least 2 completions, found 1"
    ]


def test_a_bad_reference_file_fails_before_training(tmp_path, model_dir, monkeypatch, capsys):
    """--reference-data is read after training (its answers set the offset): a broken line must be found before
    the run trains, not after."""
    from flywheel.train import reward

    data = write_jsonl(tmp_path / "train.jsonl", preference_rows(8, seed=1))
    ref = tmp_path / "ref.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    ref.write_text(f"{good}\n{good}\n{{broken\n")
    monkeypatch.setattr(reward, "train_loop", lambda *a, **k: pytest.fail("trained before reading --reference-data"))
    out = tmp_path / "rm"
    argv = ["rm", "--model", str(model_dir), "--data", data, "--reference-data", str(ref), "--out", str(out)]
    for more in ([], ["--rm-ensemble", "2"]):
        assert main([*argv, *more, "--progress", "false"]) == 2
        assert f"{ref}:3: bad JSON" in capsys.readouterr().err
        assert not out.exists()

"""`--reward-fn module:function`: Python rewards on text, weighted, beside or instead of the reward model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tests import reward_functions as rf

from flywheel.cli import main
from flywheel.errors import UserError
from flywheel.models import load_sequence_classifier, save_pretrained
from flywheel.tokenization import render_prompt
from flywheel.train.ppo.reward_fns import build_reward_functions, load_reward_fn
from flywheel.train.ppo.rl import RLConfig, RLTrainer, train_rl


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Count to {i} now."}]}
        for i in range(24)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_reward_fn_resolves_module_function_and_reports_bad_specs():
    assert load_reward_fn("tests.reward_functions:letter_e") is rf.letter_e
    assert load_reward_fn("tests.reward_functions:Namespace.constant") is rf.Namespace.constant
    file_fn = load_reward_fn("tests/reward_functions.py:prompt_number")  # a file path works too
    assert file_fn(["Count to 12 now."], ["x"]) == [12.0]
    for spec, message in (
        ("tests/no_such_file.py:f", "no such file tests/no_such_file.py"),
        ("letter_e", "expected module:function"),
        ("tests.no_such_module:f", "cannot import tests.no_such_module"),
        ("tests.reward_functions:nothing", "has no attribute nothing"),
        ("tests.reward_functions:not_callable", "not_callable is not callable"),
    ):
        with pytest.raises(UserError, match=message):
            load_reward_fn(spec)


def test_a_reward_file_may_define_dataclasses(tmp_path):
    # A file's dataclass looks its module up in sys.modules while the file runs (with postponed annotations).
    path = tmp_path / "scored.py"
    path.write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n\n"
        "@dataclass\n"
        "class Weights:\n"
        "    per_char: float = 0.5\n\n"
        "def length(prompts, responses):\n"
        "    return [Weights().per_char * len(r) for r in responses]\n"
    )
    assert load_reward_fn(f"{path}:length")(["p"], ["abcd"]) == [2.0]


def test_reward_functions_see_the_user_message_and_the_text_and_sum_with_weights(tokenizer):
    from flywheel.data.formats import Message

    prompts = [[Message("system", "Be brief."), Message("user", f"Count to {i} now.")] for i in (3, 7)]
    fns = build_reward_functions(
        ["tests.reward_functions:letter_e", "tests.reward_functions:prompt_number"], [2.0, 0.5], tokenizer, prompts
    )
    ids = [render_prompt(tokenizer, [m.as_dict() for m in p]) for p in prompts]
    texts = ["hello there", "cat"]
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    rf.CALLS.clear()
    got = fns(ids, responses)
    seen_prompts, seen_responses = rf.CALLS[-1]
    assert seen_prompts == ["Count to 3 now.", "Count to 7 now."]
    assert [r.strip() for r in seen_responses] == texts  # the end-of-turn token is not in the text
    want = [2.0 * r.count("e") / len(r) + 0.5 * n for r, n in zip(seen_responses, (3, 7), strict=True)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))
    e_mean = sum(r.count("e") / len(r) for r in seen_responses) / 2
    assert fns.last == {"reward/letter_e": pytest.approx(e_mean), "reward/prompt_number": pytest.approx(5.0)}
    with pytest.raises(UserError, match="returned NoneType, not a list of numbers"):
        build_reward_functions(["tests.reward_functions:returns_none"], [], tokenizer, prompts)(ids, responses)
    with pytest.raises(UserError, match="returned 1 values for 2 responses"):
        build_reward_functions(["tests.reward_functions:wrong_length"], [], tokenizer, prompts)(ids, responses)
    with pytest.raises(UserError, match="2 values for 1 --reward-fn"):
        build_reward_functions(["tests.reward_functions:letter_e"], [1.0, 2.0], tokenizer, prompts)


def _cfg(tmp_path, model_dir, prompts_file, name="run", **kw):
    base = dict(
        model=str(model_dir),
        prompts=str(prompts_file),
        out=str(tmp_path / name),
        max_steps=2,
        rollout_batch_size=2,
        num_generations=2,
        batch_size=4,
        ppo_epochs=1,
        max_new_tokens=6,
        progress=False,
        seed=1,
    )
    base.update(kw)
    return RLConfig(**base)


def test_rl_with_reward_functions_only_logs_each_and_scores_their_weighted_sum(tmp_path, model_dir, prompts_file):
    config = tmp_path / "rl.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "reward_fn": ["tests.reward_functions:letter_e", "tests.reward_functions:prompt_number"],
                "reward_weights": [3.0, 0.1],
            }
        )
    )
    out = tmp_path / "rl"
    args = ["rl", "--config", str(config), "--model", str(model_dir), "--prompts", str(prompts_file)]
    args += ["--out", str(out), "--max-steps", "2", "--rollout-batch-size", "2", "--num-generations", "2"]
    args += ["--batch-size", "4", "--max-new-tokens", "6", "--progress", "false", "--missing-eos-penalty", "0"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        want = 3.0 * row["reward/letter_e"] + 0.1 * row["reward/prompt_number"]
        assert row["score"] == pytest.approx(want, abs=1e-5)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["reward_fn"] == ["tests.reward_functions:letter_e", "tests.reward_functions:prompt_number"]
    assert saved["reward_weights"] == [3.0, 0.1]
    # the same two functions as flags
    args2 = [a for a in args if a not in ("--config", str(config))] + ["--reward-fn"]
    args2 += ["tests.reward_functions:letter_e", "--out", str(tmp_path / "flags")]
    assert main(args2) == 0
    row = json.loads((tmp_path / "flags" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["score"] == pytest.approx(row["reward/letter_e"], abs=1e-6) and "reward/prompt_number" not in row
    # a repeated --reward-fn adds up (argparse's default kept only the last)
    args3 = [a for a in args2 if a != str(tmp_path / "flags")] + [str(tmp_path / "twice")]
    args3 += ["--reward-fn", "tests.reward_functions:prompt_number"]
    assert main(args3) == 0
    saved = yaml.safe_load((tmp_path / "twice" / "config.yaml").read_text())
    assert saved["reward_fn"] == ["tests.reward_functions:letter_e", "tests.reward_functions:prompt_number"]


def test_reward_functions_add_to_the_reward_model(tmp_path, model_dir, prompts_file):
    rm_dir = save_pretrained(load_sequence_classifier(str(model_dir)), None, tmp_path / "rm")
    plain = RLTrainer(_cfg(tmp_path, model_dir, prompts_file, "a", reward_model=str(rm_dir)))
    both = RLTrainer(
        _cfg(
            tmp_path,
            model_dir,
            prompts_file,
            "b",
            reward_model=str(rm_dir),
            reward_fn=["tests.reward_functions:Namespace.constant"],
            reward_weights=[0.25],
        )
    )
    exp, _ = plain.experience(plain.prompts[:2], seed=0)
    args = (exp.sequences, exp.attention_mask, exp.position_ids, exp.prompt_len, exp.response_mask)
    torch.testing.assert_close(both.reward.forward(*args), plain.reward.forward(*args) + 0.5)


def test_reward_fn_errors_are_user_errors(tmp_path, model_dir, prompts_file, capsys):
    base = ["--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(tmp_path / "x")]
    for cmd, extra, message in (
        ("rl", [], "--reward-model or --reward-fn is required"),
        ("ppo", ["--reward-fn", "nope"], "expected module:function"),
        ("rl", ["--reward-fn", "tests.reward_functions:letter_e", "--reward-weights", "1", "2"], "2 values for 1"),
        (
            "rl",
            ["--reward-fn", "tests.reward_functions:letter_e", "--reward-weights", "x"],
            "'reward_weights[0]' must be float",
        ),
    ):
        assert main([cmd, *base, *extra]) == 2, extra
        assert message in capsys.readouterr().err


def test_ppo_trains_on_a_reward_function(tmp_path, model_dir, prompts_file):
    from flywheel.train.ppo.config import PPOConfig
    from flywheel.train.ppo.trainer import train_ppo

    cfg = PPOConfig(
        model=str(model_dir),
        prompts=str(prompts_file),
        out=str(tmp_path / "ppo"),
        max_steps=2,
        rollout_batch_size=4,
        batch_size=4,
        ppo_epochs=1,
        max_new_tokens=6,
        progress=False,
        reward_fn=["tests.reward_functions:letter_e"],
    )
    run = train_ppo(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "reward/letter_e" in rows[-1] and (run / "final_value" / "config.json").is_file()


@pytest.mark.slow
def test_grpo_on_a_reward_function_raises_it(tmp_path, model_dir, prompts_file):
    cfg = _cfg(
        tmp_path,
        model_dir,
        prompts_file,
        max_steps=12,
        rollout_batch_size=8,
        num_generations=4,
        batch_size=32,
        max_new_tokens=8,
        lr=1e-2,
        kl_coef=0.0,
        missing_eos_penalty=0.0,
        reward_fn=["tests.reward_functions:letter_e"],
    )
    run = train_rl(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, late = rows[0]["reward/letter_e"], sum(r["reward/letter_e"] for r in rows[-3:]) / 3
    assert late > 2 * first and late > 0.1, (first, late)

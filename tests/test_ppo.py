"""PPO end to end on tiny models: on-policy rollouts, ratio 1 on the first minibatch, learning, exact resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from flywheel.cli import main
from flywheel.engine import SamplingParams
from flywheel.errors import UserError
from flywheel.models import load_sequence_classifier, save_pretrained
from flywheel.train.ppo.config import PPOConfig
from flywheel.train.ppo.losses import policy_loss
from flywheel.train.ppo.rollout import build_sequences, make_experience
from flywheel.train.ppo.trainer import PPOTrainer, train_ppo

TARGETS = set(range(100, 140))  # reward = fraction of response tokens in this set (10% under a uniform policy)


def target_reward(prompts, responses):
    return torch.tensor([sum(t in TARGETS for t in r) / max(len(r), 1) for r in responses])


def _cfg(tmp_path, model_dir, prompts_file, name="run", **kw):
    base = dict(
        model=str(model_dir),
        prompts=str(prompts_file),
        out=str(tmp_path / name),
        max_steps=3,
        rollout_batch_size=8,
        batch_size=4,
        ppo_epochs=2,
        max_new_tokens=8,
        lr=1e-3,
        progress=False,
        missing_eos_penalty=0.0,
        seed=1,
    )
    base.update(kw)
    return PPOConfig(**base)


def test_rollout_logprobs_equal_a_fresh_forward_and_first_ratio_is_one(tmp_path, model_dir, prompts_file):
    cfg = _cfg(tmp_path, model_dir, prompts_file, temperature=0.7)
    trainer = PPOTrainer(cfg, reward_fn=target_reward)
    prompts = trainer.prompts[:8]
    gen = trainer.engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.7, seed=3))
    s = build_sequences(prompts, gen.tokens, [r == "stop" for r in gen.finish_reasons], trainer.pad_id)
    with torch.no_grad():
        fresh, _ = trainer.actor.forward(s.sequences, s.attention_mask, s.position_ids, s.prompt_len)
        # The scoring pass's log-probs alone (no entropy) are the training forward's, bit for bit.
        assert torch.equal(trainer.actor.logprobs(s.sequences, s.attention_mask, s.position_ids, s.prompt_len), fresh)
    for i, lp in enumerate(gen.logprobs):
        torch.testing.assert_close(fresh[i, : len(lp)], torch.tensor(lp), rtol=0, atol=1e-4)

    exp, _ = make_experience(
        cfg,
        trainer.engine,
        trainer.actor,
        trainer.ref,
        trainer.critic,
        trainer.reward,
        prompts,
        trainer.pad_id,
        cfg.kl_coef,
        seed=0,
    )
    mb = exp.select(torch.arange(4))
    logprobs, _ = trainer.actor.forward(mb.sequences, mb.attention_mask, mb.position_ids, mb.prompt_len)
    _, stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.response_mask.float(), cfg.cliprange)
    assert float(stats["ratio"]) == pytest.approx(1.0, abs=1e-6)
    assert float(stats["approx_kl"]) == pytest.approx(0.0, abs=1e-10)
    assert float(stats["clipfrac"]) == 0.0
    # Before any update the policy is the reference: the KL part of the reward is zero.
    assert torch.allclose(exp.old_logprobs, exp.ref_logprobs, atol=1e-6)
    # Rewards: the score appears exactly once per rollout, at its last real token.
    mask = exp.response_mask.float()
    last = mask.sum(1).long() - 1
    torch.testing.assert_close(exp.rewards[torch.arange(8), last], exp.scores, atol=1e-5, rtol=0)
    assert torch.all(exp.rewards[mask == 0] == 0)


@pytest.mark.slow
def test_ppo_raises_the_reward_and_the_kl_penalty_bounds_the_drift(tmp_path, model_dir, prompts_file):
    def run(name, beta):
        cfg = _cfg(
            tmp_path,
            model_dir,
            prompts_file,
            name,
            max_steps=16,
            rollout_batch_size=16,
            batch_size=16,
            lr=1e-2,
            kl_coef=beta,
        )
        train_ppo(cfg, reward_fn=target_reward)
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    with_kl, without_kl = run("beta", 0.03), run("nobeta", 0.0)
    first = with_kl[0]["score"]
    late = sum(r["score"] for r in with_kl[-4:]) / 4
    assert late > 2 * first, (first, late)
    assert 0 < with_kl[-1]["kl"] < without_kl[-1]["kl"], (with_kl[-1]["kl"], without_kl[-1]["kl"])
    assert all(
        k in with_kl[-1]
        for k in (
            "entropy",
            "clipfrac",
            "approx_kl",
            "value_loss",
            "explained_variance",
            "eos_rate",
            "response_length",
        )
    )


def test_resume_is_exact(tmp_path, model_dir, prompts_file):
    full = _cfg(tmp_path, model_dir, prompts_file, "full", max_steps=4, save_every=2, kl_target=3.0, kl_horizon=50)
    train_ppo(full, reward_fn=target_reward)
    # A run that stopped after step 2: only its checkpoint and config survive.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    train_ppo(
        _cfg(
            tmp_path,
            model_dir,
            prompts_file,
            "cut",
            max_steps=4,
            save_every=2,
            kl_target=3.0,
            kl_horizon=50,
            resume=True,
        ),
        reward_fn=target_reward,
    )
    from safetensors.torch import load_file

    for sub in ("final", "final_value"):
        a = load_file(str(tmp_path / "full" / sub / "model.safetensors"))
        b = load_file(str(cut / sub / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    last = lambda run: json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])  # noqa: E731
    assert last("full")["kl_coef"] == last("cut")["kl_coef"] != 0.05  # the adaptive controller state resumed too
    # A run killed after step 3 (its samples and metrics logged, its checkpoint at step 2), resumed: steps 3 and 4
    # logged once each, a line cut short by the kill dropped, and the newest checkpoint, damaged, skipped.
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", killed)
    shutil.rmtree(killed / "final")
    for name in ("samples.jsonl", "metrics.jsonl"):
        rows = [r for r in (killed / name).read_text().splitlines() if json.loads(r)["step"] <= 3]
        (killed / name).write_text("".join(r + "\n" for r in rows) + '{"step": 4, "sco')
    shutil.copytree(killed / "checkpoints" / "step-2", killed / "checkpoints" / "step-3")
    (killed / "checkpoints" / "step-3" / "policy.safetensors").write_bytes(b"cut short")
    cfg = _cfg(tmp_path, model_dir, prompts_file, "killed", max_steps=4, save_every=2, kl_target=3.0, kl_horizon=50)
    train_ppo(replace(cfg, resume=True), reward_fn=target_reward)
    untimed = lambda run, name: [  # noqa: E731
        {k: v for k, v in json.loads(r).items() if not k.startswith("time_")}
        for r in (tmp_path / run / name).read_text().splitlines()
    ]
    for name in ("samples.jsonl", "metrics.jsonl"):
        assert untimed("killed", name) == untimed("full", name), name


def test_ppo_cli_with_reward_model_and_ptx(tmp_path, model_dir, prompts_file):
    rm = load_sequence_classifier(str(model_dir))
    rm_dir = save_pretrained(rm, None, tmp_path / "rm")
    corpus = tmp_path / "corpus.txt"
    from tests.conftest import CORPUS

    corpus.write_text("\n\n".join(CORPUS * 30))
    out = tmp_path / "ppo"
    code = main(
        [
            "ppo",
            "--model",
            str(model_dir),
            "--reward-model",
            str(rm_dir),
            "--prompts",
            str(prompts_file),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--rollout-batch-size",
            "4",
            "--batch-size",
            "2",
            "--ppo-epochs",
            "1",
            "--max-new-tokens",
            "6",
            "--ptx-data",
            str(corpus),
            "--ptx-coef",
            "0.5",
            "--ptx-seq-len",
            "32",
            "--progress",
            "false",
            "--sample-every",
            "1",
            "--kl-estimator",
            "k3",
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "ptx_eval_loss" in rows[0] and rows[0]["step"] == 0  # the SFT model's held-out LM loss, before PPO
    assert "ptx_loss" in rows[-1] and "ptx_eval_loss" in rows[-1]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "response", "score"} <= set(samples[0])
    assert (out / "final" / "model.safetensors").is_file() and (out / "final_value" / "config.json").is_file()


def test_ppo_config_errors(tmp_path, model_dir, prompts_file):
    res = main(
        [
            "ppo",
            "--model",
            str(model_dir),
            "--prompts",
            str(prompts_file),
            "--out",
            str(tmp_path / "x"),
            "--rollout-batch-size",
            "6",
            "--batch-size",
            "4",
        ]
    )
    assert res == 2
    res = main(
        [
            "ppo",
            "--model",
            str(model_dir),
            "--prompts",
            str(prompts_file),
            "--out",
            str(tmp_path / "x"),
            "--kl-estimator",
            "k7",
        ]
    )
    assert res == 2


def test_ignore_eos_fixed_length_and_bf16_reference_agrees(tmp_path, model_dir, prompts_file):
    cfg = _cfg(tmp_path, model_dir, prompts_file, ignore_eos=True, bf16=True, max_new_tokens=6)
    trainer = PPOTrainer(cfg, reward_fn=target_reward)
    stats, exp, responses = trainer.step(0)
    assert all(len(r) == 6 for r in responses) and stats["response_length"] == 6 and stats["eos_rate"] == 0
    # Policy and reference share weights and kernels before the first update: the KL is exactly zero.
    assert stats["kl"] == 0.0


@pytest.fixture
def rm_dir(tmp_path, model_dir):
    return save_pretrained(load_sequence_classifier(str(model_dir)), None, tmp_path / "rm")


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def test_offload_frozen_changes_nothing_but_where_the_frozen_models_wait(tmp_path, model_dir, prompts_file, rm_dir):
    """--offload-frozen moves the reference and the reward model to the device for their forwards only: the same
    kernels run, so metrics and weights are identical (on the CPU the device is the CPU; the GPU test checks more)."""
    from safetensors.torch import load_file

    for name, offload in (("kept", False), ("offloaded", True)):
        train_ppo(
            _cfg(
                tmp_path, model_dir, prompts_file, name, max_steps=2, reward_model=str(rm_dir), offload_frozen=offload
            )
        )
    assert _metrics(tmp_path / "kept") == _metrics(tmp_path / "offloaded")
    for sub in ("final", "final_value"):
        a = load_file(str(tmp_path / "kept" / sub / "model.safetensors"))
        b = load_file(str(tmp_path / "offloaded" / sub / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def _record_moves(role, monkeypatch) -> list:
    """Events of a role's module: ("to", device) for each move, "forward" for each pass of its backbone."""
    events: list = []
    move = role.module.to

    def to(device, *args, **kwargs):
        events.append(("to", torch.device(device)))
        return move(device, *args, **kwargs)

    monkeypatch.setattr(role.module, "to", to)
    role.module.base_model.register_forward_pre_hook(lambda *_: events.append("forward"))
    return events


@pytest.mark.parametrize("offload", [False, True])
def test_frozen_roles_run_on_the_inputs_device_and_offloaded_ones_wait_on_the_cpu(
    tmp_path, model_dir, prompts_file, rm_dir, offload, monkeypatch
):
    from flywheel import distributed

    cfg = _cfg(tmp_path, model_dir, prompts_file, reward_model=str(rm_dir), offload_frozen=offload)
    trainer = PPOTrainer(cfg)
    device = distributed.device()
    assert not trainer.actor.offload and not trainer.critic.offload
    assert trainer.actor.device == trainer.critic.device == device
    assert trainer.ref.offload == trainer.reward.offload == offload
    home = torch.device("cpu") if offload else device
    assert trainer.ref.device == trainer.reward.device == home
    moves = {name: _record_moves(role, monkeypatch) for name, role in (("ref", trainer.ref), ("rm", trainer.reward))}
    exp, _ = make_experience(
        cfg,
        trainer.engine,
        trainer.actor,
        trainer.ref,
        trainer.critic,
        trainer.reward,
        trainer.prompts[:8],
        trainer.pad_id,
        cfg.kl_coef,
        seed=0,
    )
    # An offloaded module goes to the experience's device for its one forward and back to the CPU after it.
    expected = [("to", exp.sequences.device), "forward", ("to", torch.device("cpu"))] if offload else ["forward"]
    assert moves == {"ref": expected, "rm": expected}
    assert trainer.ref.device == trainer.reward.device == home
    assert {t.device for t in (exp.sequences, exp.ref_logprobs, exp.scores, exp.advantages)} == {device}


def test_a_trained_role_cannot_be_offloaded(tiny_model):
    from flywheel.train.ppo.roles import Critic, Role

    with pytest.raises(ValueError, match="frozen"):
        Role(tiny_model, trainable=True, offload=True)
    assert not Critic(tiny_model).offload


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ppo_on_a_gpu_places_every_role_and_offloads_the_frozen_ones(tmp_path, model_dir, prompts_file, rm_dir):
    cfg = _cfg(tmp_path, model_dir, prompts_file, reward_model=str(rm_dir), offload_frozen=True, bf16=True)
    trainer = PPOTrainer(cfg)
    assert trainer.actor.device.type == trainer.critic.device.type == "cuda"
    assert trainer.ref.device.type == trainer.reward.device.type == "cpu"
    stats, exp, _ = trainer.step(0)
    assert exp.sequences.device.type == exp.ref_logprobs.device.type == exp.scores.device.type == "cuda"
    assert trainer.ref.device.type == trainer.reward.device.type == "cpu"  # back on the CPU after scoring
    assert stats["kl"] == 0.0  # the reference ran on the GPU with the policy's kernels
    kept = PPOTrainer(_cfg(tmp_path, model_dir, prompts_file, "kept", reward_model=str(rm_dir), bf16=True))
    assert kept.ref.device.type == "cuda"
    assert {k: v for k, v in kept.step(0)[0].items() if not k.startswith("time_")} == {
        k: v for k, v in stats.items() if not k.startswith("time_")
    }


def test_ref_model_sets_the_kl_reference_apart_from_the_starting_policy(tmp_path, model_dir, prompts_file, tokenizer):
    """A later round starts the policy from the last PPO model and keeps the KL penalty to the SFT model."""
    from flywheel.errors import UserError
    from flywheel.models import build_causal_lm, config_for_tokenizer

    other = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=7)
    other_dir = save_pretrained(other, tokenizer, tmp_path / "other")
    trainer = PPOTrainer(_cfg(tmp_path, model_dir, prompts_file, ref_model=str(other_dir)), reward_fn=target_reward)
    exp, _ = make_experience(
        trainer.cfg,
        trainer.engine,
        trainer.actor,
        trainer.ref,
        trainer.critic,
        trainer.reward,
        trainer.prompts[:8],
        trainer.pad_id,
        trainer.cfg.kl_coef,
        seed=0,
    )
    with torch.no_grad():
        logits = other(exp.sequences, attention_mask=exp.attention_mask, position_ids=exp.position_ids).logits
    p = exp.prompt_len
    expect = torch.log_softmax(logits[:, p - 1 : -1].float(), -1).gather(-1, exp.sequences[:, p:, None])[..., 0]
    mask = exp.response_mask
    torch.testing.assert_close(exp.ref_logprobs[mask], expect[:, : mask.shape[1]][mask], atol=1e-4, rtol=0)
    assert not torch.allclose(exp.old_logprobs[mask], exp.ref_logprobs[mask], atol=1e-3)

    with pytest.raises(UserError, match="--lora-r"):
        _cfg(tmp_path, model_dir, prompts_file, ref_model=str(other_dir), lora_r=4).validate()
    big = build_causal_lm(config_for_tokenizer(tokenizer, "nano", max_position_embeddings=256), seed=0)
    big.resize_token_embeddings(big.config.vocab_size + 8)
    big_dir = save_pretrained(big, tokenizer, tmp_path / "big")
    with pytest.raises(UserError, match="vocabulary"):
        PPOTrainer(_cfg(tmp_path, model_dir, prompts_file, ref_model=str(big_dir)), reward_fn=target_reward)


def test_value_lr_must_be_positive_when_given(tmp_path):
    from flywheel.errors import UserError

    for bad in (0.0, -1e-4):
        with pytest.raises(UserError, match="--value-lr must be > 0"):
            _cfg(tmp_path, "m", "p.jsonl", value_lr=bad).validate()
    _cfg(tmp_path, "m", "p.jsonl", value_lr=1e-4).validate()
    _cfg(tmp_path, "m", "p.jsonl").validate()  # unset: the policy's --lr


def test_the_critic_starts_on_the_rewards_scale(tmp_path, model_dir, prompts_file):
    """The critic starts from the reward model, whose raw score is offset by the normalisation `flywheel rm` stores;
    the critic subtracts the same offset, or it would start that far above the returns (which tilts GAE towards long
    responses: the overestimate is paid only at the last token, discounted by lambda to the early ones)."""
    from flywheel.train.ppo.roles import Critic
    from flywheel.train.reward import OFFSET_KEY

    rm = load_sequence_classifier(str(model_dir))
    setattr(rm.config, OFFSET_KEY, 3.0)
    rm_dir = save_pretrained(rm, None, tmp_path / "rm")
    trainer = PPOTrainer(_cfg(tmp_path, model_dir, prompts_file, reward_model=str(rm_dir)))
    assert trainer.critic.bias == trainer.reward.bias == 3.0
    prompts = trainer.prompts[:4]
    gen = trainer.engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=1))
    s = build_sequences(prompts, gen.tokens, [r == "stop" for r in gen.finish_reasons], trainer.pad_id)
    args = (s.sequences, s.attention_mask, s.position_ids, s.prompt_len)
    with torch.no_grad():
        values, raw = trainer.critic.forward(*args), Critic(trainer.critic.module).forward(*args)
    torch.testing.assert_close(values, raw - 3.0)
    # A critic that starts from the policy (no reward model) has no offset.
    assert PPOTrainer(_cfg(tmp_path, model_dir, prompts_file, "plain"), reward_fn=target_reward).critic.bias == 0.0


def test_save_policy_every_writes_plain_hf_policies(tmp_path, model_dir, prompts_file):
    """Candidates for a deployment gate: the policy after every N steps, as a directory plain transformers loads."""
    from transformers import AutoModelForCausalLM

    run = train_ppo(_cfg(tmp_path, model_dir, prompts_file, max_steps=3, save_policy_every=1), reward_fn=target_reward)
    saved = sorted(p.name for p in (run / "policies").iterdir())
    assert saved == ["step-1", "step-2"]  # the last step's policy is final/
    first, final = (AutoModelForCausalLM.from_pretrained(run / d) for d in ("policies/step-1", "final"))
    assert json.loads((run / "policies" / "step-1" / "flywheel.json").read_text())["steps"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), final.parameters(), strict=True))
    with pytest.raises(UserError, match="--save-policy-every"):
        _cfg(tmp_path, model_dir, prompts_file, save_policy_every=-1).validate()
    # A run trained again into the same --out (allowed once it has finished) leaves only its own outputs: a critic-free
    # estimator removes the value model, and policies saved at steps it does not save go
    from flywheel.train.ppo.rl import RLConfig, train_rl

    assert (run / "final_value").is_dir()
    fields = {k: v for k, v in _cfg(tmp_path, model_dir, prompts_file, max_steps=2).__dict__.items()}
    again = train_rl(RLConfig(**{**fields, "estimator": "grpo", "num_generations": 2}), reward_fn=target_reward)
    assert again == run and not (run / "final_value").exists()
    assert not list((run / "policies").glob("step-*"))


def test_the_value_model_is_saved_before_the_policy(tmp_path, model_dir, prompts_file, monkeypatch):
    """final/ marks a finished run (the demo, a rerun into the same --out): a kill after it must not leave the run
    without its value model, so final_value/ is written first."""
    import flywheel.train.ppo.trainer as trainer_mod

    written, save = [], trainer_mod.save_final
    monkeypatch.setattr(
        trainer_mod, "save_final", lambda m, t, out, **kw: (written.append(out.name), save(m, t, out, **kw))[1]
    )
    train_ppo(_cfg(tmp_path, model_dir, prompts_file, max_steps=1), reward_fn=target_reward)
    assert written == ["final_value", "final"]


def test_a_language_model_is_no_reward_model_anywhere_one_scores(tmp_path, model_dir, prompts_file, capsys):
    """A policy's directory given where a trained reward model must score (PPO, `flywheel rl`, best-of-n, `flywheel
    score`, `flywheel eval rm`) is a one-line error: its score head would be new, random weights, and a run would
    optimise noise without a word."""
    from flywheel.cli import main

    convs = tmp_path / "convs.jsonl"
    msgs = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    convs.write_text(json.dumps({"messages": msgs}) + "\n")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No."}) + "\n")
    rl = ["--model", str(model_dir), "--reward-model", str(model_dir), "--prompts", str(prompts_file)]
    rl += ["--max-steps", "1", "--progress", "false"]
    for argv in (
        ["ppo", *rl, "--out", str(tmp_path / "ppo")],
        ["rl", *rl, "--out", str(tmp_path / "rl")],
        ["sample", "--model", str(model_dir), "--reward-model", str(model_dir), "--best-of", "2"]
        + ["--prompts", str(prompts_file), "--out", str(tmp_path / "best.jsonl")],
        ["score", "--model", str(model_dir), "--data", str(convs)],
        ["eval", "rm", "--model", str(model_dir), "--data", str(prefs), "--out", str(tmp_path / "eval")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert f"{model_dir} is not a reward model (LlamaForCausalLM" in err and len(err.splitlines()) == 1, err
    assert not any((tmp_path / name).exists() for name in ("ppo", "rl", "best.jsonl", "eval"))


def test_a_reward_or_value_model_with_another_tokenizer_is_refused(tmp_path, model_dir, prompts_file):
    """Every role reads the policy's token ids: a reward or value model with its own tokenizer would score other
    text (or index past its embeddings), so it is a one-line error, not a silent mismatch."""
    from flywheel.errors import UserError
    from flywheel.models import build_causal_lm, config_for_tokenizer
    from flywheel.tokenization import train_tokenizer

    other_tok = train_tokenizer(["a different corpus entirely, with other words in it"] * 50, vocab_size=300)
    other = build_causal_lm(config_for_tokenizer(other_tok, "nano", max_position_embeddings=256), seed=0)
    rm = save_pretrained(load_sequence_classifier_from(other), other_tok, tmp_path / "other_rm")
    with pytest.raises(UserError, match="--reward-model .* has another vocabulary than --model"):
        PPOTrainer(_cfg(tmp_path, model_dir, prompts_file, reward_model=str(rm)))
    with pytest.raises(UserError, match="--value-model .* has another vocabulary than --model"):
        PPOTrainer(_cfg(tmp_path, model_dir, prompts_file, value_model=str(rm)), reward_fn=target_reward)


def load_sequence_classifier_from(causal_lm):
    """The causal LM's trunk under a fresh one-output score head (what `flywheel rm` starts from)."""
    from transformers import AutoModelForSequenceClassification

    cfg = causal_lm.config
    cfg.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(cfg)
    model.model.load_state_dict(causal_lm.model.state_dict())
    return model

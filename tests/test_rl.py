"""`flywheel rl` end to end on tiny models: each estimator runs, the critic-free ones build no value model, groups of
K samples per prompt, ratio 1 at the first minibatch, exact resume, the CLI and its YAML keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from tests.test_ppo import target_reward

from flywheel.cli import main
from flywheel.models import load_sequence_classifier, save_pretrained
from flywheel.train.ppo import trainer as ppo_trainer
from flywheel.train.ppo.advantages import group_advantages, rloo_advantages
from flywheel.train.ppo.losses import policy_loss
from flywheel.train.ppo.rl import RLConfig, RLTrainer, train_rl
from flywheel.utils import seed_everything


def _cfg(tmp_path, model_dir, prompts_file, name="run", **kw):
    base = dict(
        model=str(model_dir),
        prompts=str(prompts_file),
        out=str(tmp_path / name),
        max_steps=2,
        rollout_batch_size=4,
        num_generations=4,
        batch_size=8,
        ppo_epochs=2,
        max_new_tokens=8,
        lr=1e-3,
        progress=False,
        missing_eos_penalty=0.0,
        seed=1,
    )
    base.update(kw)
    return RLConfig(**base)


def _record_grads(trainer):
    """The policy's gradients at each optimizer step of `trainer` (a list, filled as it trains)."""
    grads, step_optimizers = [], trainer._step_optimizers

    def record():
        grads.append({n: p.grad.clone() for n, p in trainer.actor.module.named_parameters() if p.grad is not None})
        step_optimizers()

    trainer._step_optimizers = record
    return grads


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++"])
def test_critic_free_estimators_build_no_value_model_and_train(
    tmp_path, model_dir, prompts_file, monkeypatch, estimator
):
    def no_value_model(*a, **k):
        raise AssertionError("a critic-free estimator loaded a value model")

    monkeypatch.setattr(ppo_trainer, "load_sequence_classifier", no_value_model)
    cfg = _cfg(tmp_path, model_dir, prompts_file, estimator=estimator, kl_loss_coef=0.04, entropy_coef=0.01)
    trainer = RLTrainer(cfg, reward_fn=target_reward)
    assert trainer.critic is None and trainer.opt_value is None and "value" not in trainer.modules()
    before = {k: v.clone() for k, v in trainer.actor.module.state_dict().items()}
    stats, exp, responses = trainer.step(0)
    assert len(exp) == len(responses) == 16  # 4 prompts x K = 4
    after = trainer.actor.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the policy moved
    assert torch.all(exp.old_values == 0) and "explained_variance" not in stats and "value_loss" not in stats
    for key in ("loss", "policy_loss", "kl_loss", "entropy", "clipfrac", "ratio", "score", "kl", "advantage_abs"):
        assert key in stats, key
    run = train_rl(_cfg(tmp_path, model_dir, prompts_file, f"cli-{estimator}", estimator=estimator), target_reward)
    assert (run / "final" / "model.safetensors").is_file() and not (run / "final_value").exists()
    assert json.loads((run / "final" / "flywheel.json").read_text())["stage"] == f"rl-{estimator}"
    assert [r["step"] for r in _rows(run)] == [1, 2]


def test_groups_hold_one_prompts_k_samples_and_their_advantages(tmp_path, model_dir, prompts_file):
    for estimator, fn in (("grpo", group_advantages), ("rloo", rloo_advantages)):
        cfg = _cfg(tmp_path, model_dir, prompts_file, estimator=estimator, kl_coef=0.0)
        trainer = RLTrainer(cfg, reward_fn=target_reward)
        prompts = trainer.prompts[:4]
        exp, info = trainer.experience(prompts, seed=3)
        p = exp.prompt_len
        for i in range(16):  # row i is a sample of prompt i // K
            row = exp.sequences[i, :p][exp.attention_mask[i, :p].bool()].tolist()
            assert row == prompts[i // 4]
        assert len({tuple(r) for r in info["responses"]}) > 4  # the K samples of a prompt differ
        mask = exp.response_mask.float()
        want = fn(exp.scores, 4)[:, None] * mask  # kl_coef 0: the group compares the scores themselves
        torch.testing.assert_close(exp.advantages, want, rtol=0, atol=1e-6)
        # before any update the policy is pi_old: ratio 1, no clipping, at the first minibatch
        mb = exp.select(torch.arange(8))
        logprobs, _ = trainer.actor.forward(mb.sequences, mb.attention_mask, mb.position_ids, mb.prompt_len)
        _, stats = policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.response_mask.float())
        assert float(stats["ratio"]) == pytest.approx(1.0, abs=1e-6) and float(stats["clipfrac"]) == 0.0


def test_ppo_estimator_trains_a_critic_and_takes_the_ptx_term(tmp_path, model_dir, prompts_file):
    from tests.conftest import CORPUS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(CORPUS * 30))
    cfg = _cfg(tmp_path, model_dir, prompts_file, estimator="ppo", num_generations=2, loss_agg="seq-mean")
    cfg.ptx_data, cfg.ptx_coef, cfg.ptx_seq_len = str(corpus), 0.5, 32
    rows = _rows(train_rl(cfg, reward_fn=target_reward))
    assert {"value_loss", "explained_variance", "value_clipfrac", "ptx_loss", "ptx_eval_loss"} <= set(rows[-1])
    assert rows[0]["step"] == 0 and "ptx_eval_loss" in rows[0]  # the SFT model's LM loss, before the first step
    assert (tmp_path / "run" / "final_value" / "config.json").is_file()


@pytest.mark.parametrize("estimator", ["grpo", "ppo"])
def test_resume_is_exact(tmp_path, model_dir, prompts_file, estimator):
    kw = dict(
        estimator=estimator,
        max_steps=4,
        save_every=2,
        kl_target=3.0,
        kl_horizon=50,
        reward_norm=True,
        reward_clip=3.0,
        cliprange_high=0.28,
        loss_agg="constant",
        kl_loss_coef=0.02,
        entropy_coef=0.01,
        grad_accum=2,
    )
    train_rl(_cfg(tmp_path, model_dir, prompts_file, "full", **kw), reward_fn=target_reward)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-2", cut / "checkpoints" / "step-2")
    state = json.loads(next((cut / "checkpoints" / "step-2").glob("*.json")).read_text())
    assert state["score_moments"]["count"] == 2 * 16  # the running score statistics are in the checkpoint
    train_rl(_cfg(tmp_path, model_dir, prompts_file, "cut", resume=True, **kw), reward_fn=target_reward)
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(cut / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    untimed = lambda row: {k: v for k, v in row.items() if not k.startswith("time_")}  # noqa: E731
    assert untimed(_rows(tmp_path / "full")[-1]) == untimed(_rows(cut)[-1])  # every metric, incl. the KL coef


def test_rl_cli_with_reward_model_and_yaml_keys(tmp_path, model_dir, prompts_file):
    rm_dir = save_pretrained(load_sequence_classifier(str(model_dir)), None, tmp_path / "rm")
    config = tmp_path / "rl.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "estimator": "rloo",
                "num_generations": 2,
                "kl_loss_coef": 0.01,
                "cliprange_high": 0.3,
                "entropy_coef": 0.001,
                "loss_agg": "seq-mean",
                "reward_clip": 5.0,
                "reward_norm": True,
            }
        )
    )
    out = tmp_path / "rl"
    args = ["rl", "--config", str(config), "--model", str(model_dir), "--reward-model", str(rm_dir)]
    args += ["--prompts", str(prompts_file), "--out", str(out), "--max-steps", "2", "--rollout-batch-size", "2"]
    args += ["--batch-size", "2", "--max-new-tokens", "6", "--progress", "false", "--estimator", "reinforce++"]
    assert main(args) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["estimator"] == "reinforce++"  # the flag wins over the YAML key
    assert saved["loss_agg"] == "seq-mean" and saved["cliprange_high"] == 0.3 and saved["reward_norm"] is True
    assert len(_rows(out)) == 2 and not (out / "final_value").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--estimator", "a2c"], "--estimator must be one of ppo, grpo, rloo, reinforce++"),
        (["--estimator", "rloo", "--num-generations", "1"], "--num-generations >= 2"),
        (["--loss-agg", "sum"], "--loss-agg must be one of token-mean, seq-mean, constant"),
        (["--cliprange-high", "0"], "--cliprange-high must be > 0"),
        (["--entropy-coef", "-1"], "--entropy-coef must be >= 0"),
        (["--value-model", "x"], "--value-model: --estimator grpo does not use it (only ppo has a critic)"),
        (["--vf-coef", "0.5"], "--vf-coef: --estimator grpo does not use it (only ppo has a critic)"),
        (["--gamma", "0.9"], "--gamma: --estimator grpo does not use it (only ppo and reinforce++ discount"),
        (["--estimator", "rloo", "--scale-rewards", "false"], "--scale-rewards: --estimator rloo does not use it"),
        (["--kl-target", "1", "--kl-horizon", "0"], "--kl-horizon must be >= 1"),
        (["--kl-target", "1", "--kl-coef", "0"], "--kl-target adapts --kl-coef by multiplying it, so it needs"),
        (["--rollout-batch-size", "3", "--batch-size", "8"], "(12 responses per step) must be a multiple of --batch"),
        (["--nproc", "2"], "flywheel rl runs in one process"),
    ],
)
def test_rl_bad_flags_are_user_errors(tmp_path, model_dir, prompts_file, capsys, flags, message):
    args = ["rl", "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(tmp_path / "x"), *flags]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce++"])
def test_critic_free_estimators_raise_the_reward(tmp_path, model_dir, prompts_file, estimator):
    cfg = _cfg(
        tmp_path,
        model_dir,
        prompts_file,
        estimator=estimator,
        max_steps=12,
        rollout_batch_size=8,
        batch_size=32,
        ppo_epochs=1,
        lr=1e-2,
        kl_coef=0.0,
        kl_loss_coef=0.01,
    )
    rows = _rows(train_rl(cfg, reward_fn=target_reward))
    first, late = rows[0]["score"], sum(r["score"] for r in rows[-3:]) / 3
    assert late > 2 * first, (first, late)


def test_bf16_reference_agrees_and_lora_reference_is_the_policy_without_adapters(tmp_path, model_dir, prompts_file):
    """Policy and reference share kernels (bf16) or weights (LoRA, adapters off) before the first update: KL 0."""
    cfg = _cfg(tmp_path, model_dir, prompts_file, bf16=True, ignore_eos=True, max_new_tokens=6)
    stats, _, responses = RLTrainer(cfg, reward_fn=target_reward).step(0)
    assert stats["kl"] == 0.0 and all(len(r) == 6 for r in responses)
    pytest.importorskip("peft")
    run = train_rl(
        _cfg(tmp_path, model_dir, prompts_file, "lora", lora_r=4, lr=1e-2, estimator="rloo"), reward_fn=target_reward
    )
    rows = _rows(run)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] != 0.0
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean", "constant"])
def test_gradient_accumulation_does_not_change_the_gradient(tmp_path, model_dir, prompts_file, loss_agg):
    """One minibatch of 8 in one pass == the same 8 in 4 micro-batches of 2: the aggregation's weights are computed
    over the whole minibatch, then sliced. Compared on the gradients (Adam's first step would hide a scale error)."""
    grads = []
    for accum in (1, 4):
        cfg = _cfg(tmp_path, model_dir, prompts_file, estimator="grpo", loss_agg=loss_agg, grad_accum=accum)
        cfg.kl_loss_coef, cfg.entropy_coef = 0.05, 0.01
        trainer = RLTrainer(cfg, reward_fn=target_reward)
        exp, _ = trainer.experience(trainer.prompts[:2], seed=5)
        seen = {}
        trainer._step_optimizers = lambda t=trainer, seen=seen: seen.update(
            {n: p.grad.clone() for n, p in t.actor.module.named_parameters() if p.grad is not None}
        )
        trainer.minibatch_update(exp.select(torch.arange(8)), None)
        grads.append(seen)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in grads[0].values()) > 0


@pytest.mark.parametrize(
    "estimator, kw",
    [
        ("grpo", dict(kl_coef=0.0, kl_loss_coef=0.05, entropy_coef=0.01)),
        ("rloo", dict(kl_coef=0.1, kl_estimator="k1")),  # the advantages read the old log-probs (KL in the reward)
        ("reinforce++", dict(kl_coef=0.1, loss_agg="seq-mean")),
        ("ppo", dict(kl_coef=0.1)),
    ],
)
def test_single_pass_equals_scoring_then_updating(tmp_path, model_dir, prompts_file, estimator, kw, monkeypatch):
    """One epoch over one minibatch: the step skips the policy's scoring pass and takes the old log-probs from the
    update's own forward. Same samples, advantages, statistics and gradients as scoring first, one forward fewer."""
    runs = []
    for single in (True, False):
        cfg = _cfg(tmp_path, model_dir, prompts_file, f"run-{single}", estimator=estimator, ppo_epochs=1, **kw)
        cfg.batch_size = cfg.sequences_per_step
        seed_everything(cfg.seed)  # the critic's fresh value head
        trainer = RLTrainer(cfg, reward_fn=target_reward)
        assert trainer.single_pass
        if not single:
            monkeypatch.setattr(RLTrainer, "single_pass", property(lambda self: False))
        scoring_passes = []
        logprobs = trainer.actor.logprobs
        trainer.actor.logprobs = lambda *a, f=logprobs, n=scoring_passes: n.append(1) or f(*a)
        grads = _record_grads(trainer)
        stats, exp, responses = trainer.step(0)
        assert len(grads) == 1
        runs.append((stats, exp, responses, grads[0], len(scoring_passes)))
        monkeypatch.undo()
    (s1, e1, r1, g1, n1), (s2, e2, r2, g2, n2) = runs
    assert (n1, n2) == (0, 1)  # the single pass never runs the separate scoring forward
    assert r1 == r2 and torch.equal(e1.sequences, e2.sequences)
    torch.testing.assert_close(e1.old_logprobs, e2.old_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(e1.old_values, e2.old_values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(e1.rewards, e2.rewards, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(e1.advantages, e2.advantages, rtol=1e-4, atol=1e-5)
    assert s1["ratio"] == pytest.approx(1.0, abs=1e-7) and s1["clipfrac"] == 0.0
    for key in ("score", "kl", "loss", "policy_loss", "entropy", "advantage_abs"):
        assert s1[key] == pytest.approx(s2[key], rel=1e-4, abs=1e-5), key
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-3, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in g1.values()) > 0


@pytest.mark.parametrize("estimator", ["grpo", "ppo"])
def test_epochs_over_one_packed_minibatch_equal_the_unpacked_shuffled_ones(
    tmp_path, model_dir, prompts_file, estimator, monkeypatch
):
    """Two epochs over one minibatch of the whole batch: the packed rows in sampled order give the gradients that the
    shuffled, unpacked rows give (a permutation of one minibatch changes only the summation order)."""
    from functools import partial

    from flywheel.train.ppo import rl
    from flywheel.train.ppo.rollout import sample_and_score

    runs = []
    for pack in (True, False):
        cfg = _cfg(tmp_path, model_dir, prompts_file, f"run-{pack}", estimator=estimator, kl_coef=0.05)
        cfg.batch_size = cfg.sequences_per_step
        monkeypatch.setattr(rl, "sample_and_score", partial(sample_and_score, pack=pack))
        seed_everything(cfg.seed)
        trainer = RLTrainer(cfg, reward_fn=target_reward)
        grads = _record_grads(trainer)
        stats, _, _ = trainer.step(0)
        assert (trainer._packed is not None) == pack
        runs.append((stats, grads))
        monkeypatch.undo()
    (s1, g1), (s2, g2) = runs
    assert len(g1) == len(g2) == 2  # one optimizer step per epoch
    for a, b in zip(g1, g2, strict=True):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-6)
    for key in ("score", "kl", "loss", "ratio", "clipfrac", "entropy"):
        assert s1[key] == pytest.approx(s2[key], rel=1e-3, abs=1e-5), key

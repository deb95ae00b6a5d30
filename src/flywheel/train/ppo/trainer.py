"""`flywheel ppo`: optimise the SFT policy against a reward model with a per-token KL penalty (and PPO-ptx).

    flywheel ppo --model runs/sft/final --reward-model runs/rm/final --prompts prompts.jsonl --out runs/ppo \
        --max-steps 100 --rollout-batch-size 32 --batch-size 8 --ppo-epochs 4 --kl-coef 0.05 \
        --ptx-data corpus.txt --ptx-coef 0.5 --lr 1e-5 --bf16

Each step: sample --rollout-batch-size responses with the engine, score them (reward model, reference, critic),
compute KL-penalised rewards and GAE advantages, then run --ppo-epochs passes of clipped policy and value updates over
minibatches of --batch-size. Metrics go to metrics.jsonl, sample responses to samples.jsonl, `final/` is the policy as
a plain HF directory and `final_value/` the value model.

Devices: every model and the rollout batch live on `distributed.device()` (cuda:LOCAL_RANK when there is a GPU, else
the CPU), where the engine samples. --offload-frozen keeps the reference and reward models on the CPU between their
forwards (docs/scaling.md).

With --nproc N (torchrun, DDP; NCCL on GPU, gloo on CPU): each rank samples and scores its 1/N share of
--rollout-batch-size, advantages are whitened with statistics over all ranks, --batch-size is the minibatch of each
rank, actor and critic gradients are averaged, logged metrics are means over the ranks, rank 0 writes. With --lora-r
the policy and the critic get adapters; the reference is the policy with its adapters switched off (no second copy of
the policy); the critic stays a separate model.

The reference is --model itself unless --ref-model names another directory: a later round of the loop starts
--model from the last PPO policy and keeps the SFT model as the reference (`flywheel demo --rounds 2`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from flywheel import distributed
from flywheel.data.batching import LMSample, collate_lm, eval_lm_loss, lm_loss, pack, to_device
from flywheel.engine import Engine
from flywheel.engine.engine import default_stop_ids
from flywheel.errors import UserError
from flywheel.models import is_hub_id, load_causal_lm, load_sequence_classifier
from flywheel.tokenization import TurnEnd, load_tokenizer, render_prompt, turn_end
from flywheel.train.ensemble import ensemble_members, single_model_error
from flywheel.train.likelihood import LikelihoodParts, check_same_tokenizer, has_likelihood_head, load_head
from flywheel.train.loop import (
    DataOrder,
    MetricsLogger,
    autocast,
    build_optimizer,
    check_finite,
    checkpoint_dirs,
    default_threads,
    lines_up_to,
    load_latest_checkpoint,
    lr_lambda,
    pick_attention,
    prepare_model,
    prepare_run_dir,
    save_checkpoint,
    save_final,
    save_run_config,
)
from flywheel.train.ppo.advantages import AdaptiveKLController, explained_variance, masked_mean
from flywheel.train.ppo.config import PPOConfig
from flywheel.train.ppo.experience import Experience
from flywheel.train.ppo.losses import policy_loss, value_loss
from flywheel.train.ppo.reward_fns import RewardFunctions, build_reward_functions
from flywheel.train.ppo.roles import Actor, AdapterOffReference, Critic, Reference, Reward, RewardFn
from flywheel.train.ppo.rollout import make_experience
from flywheel.train.reward import reward_offset
from flywheel.utils import atomic_write_text, log, seed_everything, set_threads


def load_prompt_ids(cfg: PPOConfig, tokenizer: Any, context: int | None = None) -> list[list[int]]:
    """Rendered prompts; those longer than --max-prompt-length, or leaving no room for --max-new-tokens in the
    model's `context`, are dropped and counted in one warning."""
    from flywheel.data.io import read_prompts

    prompts = read_prompts(cfg.prompts, skip_bad=False, **cfg.hub_split())
    ids = [render_prompt(tokenizer, [m.as_dict() for m in p]) for p in prompts]
    limit = cfg.max_prompt_length if context is None else min(cfg.max_prompt_length, context - cfg.max_new_tokens)
    kept = [x for x in ids if len(x) <= limit]
    if len(kept) < len(ids):
        log.warning(
            "%s: %d of %d prompts are longer than %d tokens (--max-prompt-length, or the model's context "
            "minus --max-new-tokens) and were dropped",
            cfg.prompts,
            len(ids) - len(kept),
            len(ids),
            limit,
        )
    if not kept:
        raise UserError("no prompt fits --max-prompt-length", path=cfg.prompts)
    return kept


def load_ptx(cfg: PPOConfig, tokenizer: Any) -> tuple[list[LMSample], list[LMSample]]:
    """Pretraining blocks for the ptx term, and a held-out set for the alignment-tax measurement."""
    if not cfg.ptx_data:
        return [], []
    from flywheel.data.io import read_texts

    docs = read_texts(cfg.ptx_data)
    blocks = pack(tokenizer(docs, add_special_tokens=False)["input_ids"], cfg.ptx_seq_len, tokenizer.eos_token_id)
    if len(blocks) < 2:
        raise UserError(f"--ptx-data holds fewer than 2 blocks of {cfg.ptx_seq_len} tokens", path=cfg.ptx_data)
    n_eval = min(cfg.ptx_eval_blocks, len(blocks) // 5 or 1)
    return blocks[n_eval:], blocks[:n_eval]


def load_reference(cfg: PPOConfig, policy: Any, tokenizer: Any) -> Any:
    """The frozen reference: --ref-model, else a second copy of --model. Per-token KL compares the two models'
    distributions over the same token ids, so --ref-model must have the policy's tokenizer."""
    source = cfg.ref_model or cfg.model
    ref = load_causal_lm(source, **cfg.load_kwargs(source))
    if cfg.ref_model:
        why = "the per-token KL penalty needs the same tokenizer"
        check_vocabulary(cfg, "--ref-model", cfg.ref_model, tokenizer, why, always=True)
        if ref.config.vocab_size != policy.config.vocab_size:
            raise UserError(f"--ref-model {cfg.ref_model} has another vocabulary than --model {cfg.model}: {why}")
    return ref


def check_vocabulary(
    cfg: PPOConfig, flag: str, source: str, tokenizer: Any, why: str, *, always: bool = False
) -> None:
    """A one-line error when the model `flag` names has another tokenizer than the policy: every role reads the
    policy's token ids. A directory without a tokenizer shares the policy's (unless `always`: it must have one)."""
    has_tokenizer = always or is_hub_id(source) or (Path(source) / "tokenizer_config.json").is_file()
    if has_tokenizer and load_tokenizer(source, **cfg.hub_kwargs(source)).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{flag} {source} has another vocabulary than --model {cfg.model}: {why}")


def reward_turn_end(reward_model: str, tokenizer: Any, policy: Any, **hub: Any) -> TurnEnd:
    """How the reward model's template closes an answer (`TurnEnd`), checked against where the engine stops: a policy
    that does not stop at that end-of-turn token would have its rewards read elsewhere than in training. A reward
    model directory without a tokenizer shares the policy's."""
    has_tokenizer = is_hub_id(reward_model) or (Path(reward_model) / "tokenizer_config.json").is_file()
    end = turn_end(load_tokenizer(reward_model, **hub) if has_tokenizer else tokenizer)
    stops = default_stop_ids(policy, tokenizer)
    if end.token_id is not None and end.token_id not in stops:
        log.warning(
            "ppo: the reward model's chat template ends answers with token %d (%r), which is not one of the "
            "policy's stop tokens %s: responses will not end there",
            end.token_id,
            tokenizer.decode([end.token_id], skip_special_tokens=False),
            stops,
        )
    return end


def reward_model_dirs(reward_model: str) -> list[str]:
    """The reward models of --reward-model: none, the one, or an ensemble directory's members."""
    if not reward_model:
        return []
    members = ensemble_members(reward_model) if Path(reward_model).is_dir() else None
    return [str(m) for m in members] if members else [reward_model]


class PPOTrainer:
    """Holds the four roles, their optimizers and the KL controller; `step()` runs one rollout + PPO update."""

    def __init__(self, cfg: PPOConfig, reward_fn: RewardFn | None = None):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model, cfg.chat_template, **cfg.hub_kwargs(cfg.model))
        self.pad_id = self.tokenizer.pad_token_id
        n_proc = distributed.world()
        if n_proc > 1 and cfg.strategy != "ddp":
            raise UserError("PPO runs with --strategy ddp (the engine samples from whole weights on every rank)")
        if cfg.sequences_per_step % n_proc or (cfg.sequences_per_step // n_proc) % cfg.batch_size:
            raise UserError(f"--rollout-batch-size / {n_proc} processes must be a multiple of --batch-size")
        self.device = distributed.device()  # where every model runs and the rollout batch lives
        policy = prepare_model(load_causal_lm(cfg.model, **cfg.load_kwargs(cfg.model)).to(self.device), cfg)
        self.actor = Actor(policy, cfg.temperature)
        # The frozen models get the trained ones' attention kernel (prepare_model picks it), so that the policy and
        # the reference compute identical log-probs before the first update (KL exactly 0 unless --ref-model).
        self.ref = (
            AdapterOffReference(policy, cfg.temperature)
            if cfg.lora_r
            else Reference(
                self._frozen(load_reference(cfg, policy, self.tokenizer)), cfg.temperature, offload=cfg.offload_frozen
            )
        )
        self.reward = self._build_reward(reward_fn)
        if cfg.offload_frozen and self.device.type != "cpu":
            kept = [name for name, role in (("reference", self.ref), ("reward model", self.reward)) if role.offload]
            log.info("ppo: --offload-frozen: %s on the CPU between forwards", " and ".join(kept) or "no frozen model")
        self.critic = self._build_critic()
        self.wrapped_actor = distributed.wrap(policy, "ddp")
        self.wrapped_critic = distributed.wrap(self.critic.module, "ddp") if self.critic else None
        self.engine = Engine(policy, self.tokenizer, dtype=torch.bfloat16 if cfg.bf16 else None)
        self.prompts = load_prompt_ids(cfg, self.tokenizer, self.engine.context_length)
        self.ptx_train, self.ptx_eval = load_ptx(cfg, self.tokenizer)
        self.steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.prompts) / cfg.rollout_batch_size))
        self.opt_policy = build_optimizer(policy, cfg)
        value_cfg = cfg if cfg.value_lr is None else _with_lr(cfg, cfg.value_lr)
        self.opt_value = build_optimizer(self.critic.module, value_cfg) if self.critic else None
        warmup = int(cfg.warmup_ratio * self.steps)
        sched = lambda s: lr_lambda(s, self.steps, warmup, cfg.min_lr_ratio)  # noqa: E731
        self.sched_policy = torch.optim.lr_scheduler.LambdaLR(self.opt_policy, sched)
        self.sched_value = torch.optim.lr_scheduler.LambdaLR(self.opt_value, sched) if self.opt_value else None
        self.kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        self.order = DataOrder(len(self.prompts), cfg.seed)

    def _build_reward(self, reward_fn: RewardFn | None) -> Reward:
        """`reward_fn` (tests, toy tasks) if given; else the reward model, the --reward-fn functions, or their sum."""
        cfg = self.cfg
        if reward_fn is not None:
            return Reward(fn=reward_fn)
        fns = None
        if cfg.reward_fn:
            from flywheel.data.io import read_prompts

            fns = build_reward_functions(
                cfg.reward_fn,
                cfg.reward_weights,
                self.tokenizer,
                read_prompts(cfg.prompts, skip_bad=False, **cfg.hub_split()),
            )
        members = reward_model_dirs(cfg.reward_model)
        if cfg.reward_ensemble_agg != "mean" and len(members) < 2:
            raise UserError(single_model_error(cfg.reward_ensemble_agg), path=cfg.reward_model or None)
        if members:
            why = "the reward model reads the policy's token ids, so it needs the same tokenizer"
            check_vocabulary(cfg, "--reward-model", members[0], self.tokenizer, why)
            rms = [self._frozen(load_sequence_classifier(m, trained=True, **cfg.load_kwargs(m))) for m in members]
            end = reward_turn_end(members[0], self.tokenizer, self.actor.module, **cfg.hub_kwargs(members[0]))
            if len(rms) > 1:
                log.info("ppo: reward ensemble of %d models, aggregated by %s", len(rms), cfg.reward_ensemble_agg)
            likelihood = None
            if has_likelihood_head(cfg.reward_model):
                head, offset, ref_dir = load_head(cfg.reward_model)
                check_same_tokenizer(load_tokenizer(str(ref_dir)), self.tokenizer, "the policy")
                reference = self._frozen(load_causal_lm(str(ref_dir), **cfg.load_kwargs(str(ref_dir))))
                likelihood = LikelihoodParts(reference, head, offset)
                log.info("ppo: the reward reads the likelihood of each response under %s", ref_dir)
            return Reward(
                rms,
                fn=fns,
                bias=[reward_offset(rm.config) for rm in rms],
                offload=cfg.offload_frozen,
                turn_end=end,
                close_cut=cfg.close_truncated,
                agg=cfg.reward_ensemble_agg,
                lam=cfg.reward_ensemble_lambda,
                likelihood=likelihood,
            )
        if fns is None:
            raise UserError("--reward-model or --reward-fn is required")
        return Reward(fn=fns)

    def _build_critic(self) -> Critic | None:
        """The value model: --value-model, else the reward model (an ensemble's first member), else the policy's
        weights with a new head."""
        cfg = self.cfg
        source = cfg.value_model or next(iter(reward_model_dirs(cfg.reward_model)), cfg.model)
        if cfg.value_model:
            why = "the value model reads the policy's token ids, so it needs the same tokenizer"
            check_vocabulary(cfg, "--value-model", cfg.value_model, self.tokenizer, why)
        value_model = load_sequence_classifier(source, **cfg.load_kwargs(source))
        return Critic(prepare_model(value_model.to(self.device), cfg), bias=reward_offset(value_model.config))

    def modules(self) -> dict[str, Any]:
        out = {"policy": self.actor.module, "policy_optimizer": self.opt_policy, "policy_scheduler": self.sched_policy}
        if self.critic is not None:
            out.update(value=self.critic.module, value_optimizer=self.opt_value, value_scheduler=self.sched_value)
        return out

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the modules (loaded back by `load_extra_state`)."""
        return {"kl_ctl": self.kl_ctl.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])

    def experience(self, prompts: list[list[int]], seed: int) -> tuple[Experience, dict]:
        """Sample and score this rank's prompts: the rollout batch and its statistics."""
        return make_experience(
            self.cfg,
            self.engine,
            self.actor,
            self.ref,
            self.critic,
            self.reward,
            prompts,
            self.pad_id,
            self.kl_ctl.value,
            seed=seed,
        )

    def step(self, step: int) -> tuple[dict[str, float], Experience, list[list[int]]]:
        cfg = self.cfg
        t0 = time.perf_counter()
        idx = self.order.indices(step * cfg.rollout_batch_size, cfg.rollout_batch_size)
        prompts = [self.prompts[i] for i in distributed.shard(idx)]  # this rank's share of the rollout batch
        self.actor.module.eval()
        # Re-read the policy's weights: fused AdamW updates them in place without bumping the tensors' version
        # counters, so the engine cannot see the change by itself.
        self.engine.update_weights(self.actor.module)
        seed = (cfg.seed * 1_000_003 + step) * distributed.world() + distributed.rank()
        exp, info, stats = self.rollout_and_optimise(prompts, seed, step)
        t_rollout = info.pop("rollout_end") - t0
        if distributed.world() > 1:  # means over the ranks' equal shares (score_std: the mean of the ranks' stds)
            info["stats"] = _mean_over_ranks(info["stats"])
        self.kl_ctl.update(info["stats"]["kl"], cfg.sequences_per_step)
        self.sched_policy.step()
        if self.sched_value is not None:
            self.sched_value.step()
        mask = exp.response_mask.float()
        stats.update(info["stats"])
        if isinstance(self.reward.fn, RewardFunctions):
            stats.update(self.reward.fn.last)  # each --reward-fn's mean over this rank's rollouts
        stats.update(self.reward.last)  # an ensemble's disagreement and mean score on this rank's rollouts
        if self.critic is not None:
            stats["explained_variance"] = explained_variance(exp.old_values, exp.returns, mask)
        if distributed.world() > 1:
            stats = _mean_over_ranks(stats)
        stats["lr"] = self.sched_policy.get_last_lr()[0]
        stats["time_rollout"] = t_rollout
        stats["time_step"] = time.perf_counter() - t0
        return stats, exp, info["responses"]

    def rollout_and_optimise(
        self, prompts: list[list[int]], seed: int, step: int
    ) -> tuple[Experience, dict, dict[str, float]]:
        """Sample and score the rollout batch (policy in eval mode), then optimise on it: (experience, info, update
        stats); info holds the rollout's stats, its responses and `rollout_end` (perf_counter when scoring ended)."""
        exp, info = self.experience(prompts, seed)
        self.actor.module.train()
        info["rollout_end"] = time.perf_counter()
        return exp, info, self.optimise(exp, step)

    def optimise(self, exp: Experience, step: int) -> dict[str, float]:
        """--ppo-epochs passes over the rollout batch in shuffled minibatches; policy and critic updated each time."""
        cfg = self.cfg
        sums: dict[str, float] = {}
        n = 0
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(cfg.seed * 7_919 + step * 131 + epoch)
            perm = torch.randperm(len(exp), generator=g)
            for mb_i, start in enumerate(range(0, len(exp), cfg.batch_size)):
                mb = exp.select(perm[start : start + cfg.batch_size])
                ptx = self._ptx_batch(step, epoch, mb_i)
                for k, v in self.minibatch_update(mb, ptx).items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
        return {k: v / n for k, v in sums.items()}

    def minibatch_update(self, mb: Experience, ptx: dict[str, Any] | None) -> dict[str, float]:
        cfg = self.cfg
        out: dict[str, float] = {}
        micro = len(mb) // cfg.grad_accum
        weight = float(mb.response_mask.sum())
        n_proc = distributed.world()
        if n_proc > 1:  # token-mean over the minibatches of all ranks; DDP averages, so scale by the world size
            weight = distributed.all_reduce_sum([weight])[0]
        for j in range(cfg.grad_accum):
            part = mb.select(torch.arange(j * micro, (j + 1) * micro))
            mask = part.response_mask.float()
            # Token-mean over the whole minibatch, so accumulation does not change the gradient.
            share = float(mask.sum()) / weight
            args = (part.sequences, part.attention_mask, part.position_ids, part.prompt_len)
            last = j == cfg.grad_accum - 1
            with _no_sync(self.wrapped_actor, not last), autocast(cfg.bf16):
                # One pass through the DDP wrapper per backward: the policy and the ptx LM loss together.
                logprobs, entropy, lm = _call(self.wrapped_actor, self.actor.module, self._policy_pass, args, ptx)
                pg, pstats = policy_loss(logprobs, part.old_logprobs, part.advantages, mask, cfg.cliprange)
                loss = pg * share * n_proc if n_proc > 1 else pg * share
                if lm is not None:
                    ptx_loss = lm / ptx["weight"]
                    loss = loss + cfg.ptx_coef * ptx_loss / cfg.grad_accum
                    out["ptx_loss"] = out.get("ptx_loss", 0.0) + float(ptx_loss.detach()) / cfg.grad_accum
                loss.backward()
            with _no_sync(self.wrapped_critic, not last):
                with autocast(cfg.bf16):
                    values = _call(self.wrapped_critic, self.critic.module, _critic_pass, self.critic, args)
                vl, vstats = value_loss(values, part.old_values, part.returns, mask, cfg.cliprange_value)
                value_term = cfg.vf_coef * vl * share
                (value_term * n_proc if n_proc > 1 else value_term).backward()
            for k, v in {
                "policy_loss": pg,
                "value_loss": vl,
                "entropy": masked_mean(entropy.detach(), mask),
                **pstats,
                **vstats,
            }.items():
                out[k] = out.get(k, 0.0) + float(v.detach()) * share
        self._step_optimizers()
        return out

    def _step_optimizers(self) -> None:
        """Clip each model's gradients to --max-grad-norm, step its optimizer, clear the gradients (critic: if any)."""
        pairs = [(self.actor.module, self.opt_policy)]
        if self.critic is not None:
            pairs.append((self.critic.module, self.opt_value))
        for module, opt in pairs:
            if self.cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

    def _policy_pass(self, _module: torch.nn.Module, args: tuple, ptx: dict[str, Any] | None) -> tuple:
        logprobs, entropy = self.actor.forward(*args)
        lm = lm_loss(self.actor.module, ptx)[0] if ptx is not None else None
        return logprobs, entropy, lm

    def _ptx_batch(self, step: int, epoch: int, mb_i: int) -> dict[str, Any] | None:
        if not self.ptx_train or self.cfg.ptx_coef <= 0:
            return None
        k = self.cfg.ptx_batch_size
        per_step = self.cfg.ppo_epochs * (self.cfg.sequences_per_step // self.cfg.batch_size)
        pos = ((step * per_step) + epoch * (self.cfg.sequences_per_step // self.cfg.batch_size) + mb_i) * k
        pos = pos * distributed.world() + distributed.rank() * k  # each rank its own blocks
        blocks = [self.ptx_train[(pos + i) % len(self.ptx_train)] for i in range(k)]
        return to_device(collate_lm(blocks, self.pad_id), self.device)

    def _frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen model with the trained ones' attention kernel, on the device unless --offload-frozen."""
        pick_attention(model, self.cfg, self.device)
        return model if self.cfg.offload_frozen else model.to(self.device)

    def ptx_eval_loss(self) -> float | None:
        if not self.ptx_eval:
            return None
        self.actor.module.eval()
        with torch.no_grad(), autocast(self.cfg.bf16):
            loss = eval_lm_loss(self.actor.module, self.ptx_eval, self.pad_id)
        self.actor.module.train()
        return loss


def _with_lr(cfg: PPOConfig, lr: float) -> PPOConfig:
    from dataclasses import replace

    return replace(cfg, lr=lr)


def _warn_kl(kl: float, step: int, cfg: PPOConfig) -> None:
    if kl < -1.0:
        log.warning(
            "step %d: KL to the reference is negative (%.2f nats): the policy and the reference disagree "
            "on how the samples were drawn (temperature? tokenization?) or the estimate is noisy",
            step,
            kl,
        )
    elif kl > cfg.kl_warn or not math.isfinite(kl):
        log.warning(
            "step %d: KL to the reference is %.1f nats per response (> %.0f): the policy is drifting away; "
            "raise --kl-coef or lower --lr",
            step,
            kl,
            cfg.kl_warn,
        )


def train_ppo(cfg: PPOConfig, reward_fn: RewardFn | None = None) -> Path:
    """Run PPO; `reward_fn` replaces the reward model with a programmatic score (tests, toy tasks)."""
    return run_training(cfg, PPOTrainer, reward_fn, stage="ppo")


def run_training(cfg: PPOConfig, trainer_cls: type[PPOTrainer], reward_fn: RewardFn | None, *, stage: str) -> Path:
    """The outer loop of `flywheel ppo` and `flywheel rl`: resume, step, log, sample, checkpoint, save."""
    from tqdm.auto import tqdm

    set_threads(cfg.threads or default_threads())
    seed_everything(cfg.seed)
    run_dir = prepare_run_dir(cfg)
    trainer = trainer_cls(cfg, reward_fn)
    save_run_config(cfg, run_dir)  # the models and prompts have been read
    start = 0
    ckpts = checkpoint_dirs(run_dir) if cfg.resume else []
    if ckpts:
        ckpt, state = load_latest_checkpoint(ckpts, trainer.modules())
        start = state["step"]
        trainer.load_extra_state(state)
        trainer.engine.update_weights(trainer.actor.module)
        log.info("resumed from %s (step %d of %d)", ckpt, start, trainer.steps)
    logger = MetricsLogger(run_dir, start if ckpts else None, cfg)
    samples_path = run_dir / "samples.jsonl"
    if distributed.is_main() and samples_path.exists():  # as metrics.jsonl: what the resumed steps write, once
        if start:
            atomic_write_text(samples_path, "".join(ln + "\n" for ln in lines_up_to(samples_path, start)))
        else:
            samples_path.unlink()
    if start == 0 and distributed.is_main():
        base = trainer.ptx_eval_loss()
        if base is not None:
            logger.log(0, {"ptx_eval_loss": base})
    bar = tqdm(
        total=trainer.steps,
        initial=start,
        desc=stage,
        disable=not cfg.progress or not distributed.is_main(),
        dynamic_ncols=True,
    )
    for step in range(start, trainer.steps):
        stats, exp, responses = trainer.step(step)
        done = step + 1
        check_finite(done, stats)
        _warn_kl(stats["kl"], done, cfg)
        if cfg.eval_every and done % cfg.eval_every == 0 or done == trainer.steps:
            held = trainer.ptx_eval_loss()
            if held is not None:
                stats["ptx_eval_loss"] = held
        if done % cfg.log_every == 0 or done == trainer.steps:
            logger.log(done, stats)
        if cfg.sample_every and (done % cfg.sample_every == 0 or done == 1) and distributed.is_main():
            _log_samples(samples_path, done, trainer, exp, responses)
        bar.set_postfix(score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.2f}", len=f"{stats['response_length']:.0f}")
        bar.update(1)
        if cfg.save_every and done % cfg.save_every == 0 and done < trainer.steps:
            save_checkpoint(run_dir, done, trainer.modules(), trainer.extra_state(), cfg.keep_checkpoints)
        if cfg.save_policy_every and done % cfg.save_policy_every == 0 and done < trainer.steps:
            extra = {"stage": stage, "steps": done}
            save_final(trainer.actor.module, trainer.tokenizer, run_dir / "policies" / f"step-{done}", extra=extra)
    bar.close()
    logger.close()
    if trainer.critic is not None:  # first: a run with final/ has all its outputs, even if killed between the two
        save_final(trainer.critic.module, trainer.tokenizer, run_dir / "final_value")
    save_final(
        trainer.actor.module,
        trainer.tokenizer,
        run_dir / "final",
        extra={"stage": stage, "steps": trainer.steps},
        adapter_of=cfg.model if cfg.save_adapter else None,
    )
    if distributed.is_main():
        _remove_stale_outputs(run_dir, cfg, trainer)
    return run_dir


def _remove_stale_outputs(run_dir: Path, cfg: PPOConfig, trainer: PPOTrainer) -> None:
    """What an earlier run into the same --out left that this run did not write: a value model (this estimator has
    no critic), policies saved at other steps. The directory then holds this run's outputs only."""
    if trainer.critic is None and (run_dir / "final_value").is_dir():
        shutil.rmtree(run_dir / "final_value")
    every = cfg.save_policy_every
    ours = {f"step-{s}" for s in range(every, trainer.steps, every)} if every else set()
    for old in sorted((run_dir / "policies").glob("step-*")):
        if old.name not in ours:
            shutil.rmtree(old)


def _log_samples(
    path: Path, step: int, trainer: PPOTrainer, exp: Experience, responses: list[list[int]], n: int = 4
) -> None:
    tok = trainer.tokenizer
    with path.open("a") as f:
        for i in range(min(n, len(exp))):
            prompt = exp.sequences[i, : exp.prompt_len][exp.attention_mask[i, : exp.prompt_len].bool()].tolist()
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "prompt": tok.decode(prompt),
                        "response": tok.decode(responses[i]),
                        "score": float(exp.scores[i]),
                    }
                )
                + "\n"
            )


def main(argv: list[str] | None = None) -> int:
    from flywheel.cli import run_trainer

    return run_trainer("ppo", PPOConfig, train_ppo, argv, __doc__, "PPO policy")


def _call(wrapped: distributed.Wrapped | None, module: torch.nn.Module, fn: Any, *args: Any) -> Any:
    """fn(module, *args), through the DDP wrapper when there is one (so it prepares the gradient all-reduce)."""
    return fn(module, *args) if wrapped is None else wrapped.call(fn, *args)


def _critic_pass(_module: torch.nn.Module, critic: Critic, args: tuple) -> torch.Tensor:
    return critic.forward(*args)


def _no_sync(wrapped: distributed.Wrapped | None, enabled: bool) -> Any:
    from contextlib import nullcontext

    return wrapped.no_sync(enabled) if wrapped is not None else nullcontext()


def _mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    keys = sorted(stats)
    total = distributed.all_reduce_sum([stats[k] for k in keys])
    return {k: v / distributed.world() for k, v in zip(keys, total, strict=True)}

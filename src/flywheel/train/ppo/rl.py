"""`flywheel rl`: one trainer, four policy-gradient estimators on PPO's roles, `Experience` and loop.

    flywheel rl --estimator grpo --model runs/sft/final --reward-model runs/rm/final --prompts prompts.jsonl \
        --out runs/grpo --rollout-batch-size 8 --num-generations 8 --batch-size 16 --ppo-epochs 1 \
        --kl-coef 0 --kl-loss-coef 0.04 --max-steps 100

Each step samples --num-generations (K) responses to each of --rollout-batch-size prompts, scores them with the reward
model and the reference, turns the scores into advantages with --estimator, then runs --ppo-epochs passes of clipped
policy updates over minibatches of --batch-size responses:

    ppo          token-level rewards (-beta KL_t, plus the score at the end), a critic, GAE (what `flywheel ppo` does)
    grpo         per response r = score - beta KL; A = (r - mean of its prompt's K) / std of them; with
                 --scale-rewards false the std is not divided by (Dr. GRPO)
    rloo         A = r - mean of the other K - 1 responses to the same prompt (REINFORCE leave-one-out)
    reinforce++  token-level rewards as PPO, returns-to-go, whitened over the whole batch; no critic, no groups

Only `ppo` builds and trains a value model; the others hold the policy, the reference and the reward model only.
Shared knobs: --kl-coef (KL in the reward, estimator --kl-estimator), --kl-loss-coef (k3 KL in the loss, GRPO's
choice), --cliprange / --cliprange-high (DAPO's clip-higher), --entropy-coef, --loss-agg (token-mean, seq-mean, or
constant: Dr. GRPO's sum / (B * --max-new-tokens)), --reward-clip, --reward-norm (running mean and std of the scores,
saved in checkpoints). Runs in one process (`flywheel ppo` has --nproc). docs/methods.md says when to use which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from flywheel.errors import UserError
from flywheel.train.loop import autocast
from flywheel.train.ppo.advantages import (
    RunningMoments,
    clip_scores,
    discounted_returns,
    gae,
    group_advantages,
    kl_estimate,
    kl_penalised_rewards,
    masked_mean,
    masked_whiten,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_kl_rewards,
)
from flywheel.train.ppo.config import PPOConfig
from flywheel.train.ppo.experience import Experience
from flywheel.train.ppo.losses import AGGREGATIONS, loss_weights, rl_token_loss, value_loss
from flywheel.train.ppo.packing import Packed
from flywheel.train.ppo.roles import Critic, RewardFn
from flywheel.train.ppo.rollout import Scored, rollout_stats, sample_and_score
from flywheel.train.ppo.trainer import PPOTrainer, run_training

ESTIMATORS = ("ppo", "grpo", "rloo", "reinforce++")
GROUP_ESTIMATORS = ("grpo", "rloo")  # advantages compare the K responses to one prompt


@dataclass
class RLConfig(PPOConfig):
    """PPOConfig's fields keep their meaning; --rollout-batch-size counts prompts, each sampled --num-generations
    times, so a step holds rollout_batch_size * num_generations responses and --batch-size divides that."""

    estimator: str = field(default="grpo", metadata={"help": "ppo, grpo, rloo or reinforce++ (docs/methods.md)"})
    num_generations: int = field(
        default=4, metadata={"help": "K: responses sampled per prompt (grpo and rloo compare them; >= 2 there)"}
    )
    scale_rewards: bool = field(
        default=True,
        metadata={"help": "grpo: divide by the std of the prompt's K rewards (false = Dr. GRPO, the mean only)"},
    )
    kl_loss_coef: float = field(
        default=0.0, metadata={"help": "weight of the k3 KL to the reference in the loss (GRPO's; 0 = off)"}
    )
    cliprange_high: float | None = field(
        default=None, metadata={"help": "upper ratio clip epsilon (default: --cliprange; larger = DAPO clip-higher)"}
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus: loss -= coef * entropy (0 = off)"})
    loss_agg: str = field(
        default="token-mean",
        metadata={
            "help": "how per-token losses are averaged in a minibatch: token-mean, seq-mean (each response "
            "counts the same) or constant (sum / (B * --max-new-tokens), Dr. GRPO)"
        },
    )
    reward_clip: float | None = field(
        default=None, metadata={"help": "clamp scores (after --reward-norm) to [-c, c] (default: no clipping)"}
    )
    reward_norm: bool = field(
        default=False, metadata={"help": "normalise scores by the running mean and std of all scores seen"}
    )

    @property
    def sequences_per_step(self) -> int:
        """Responses sampled per step: K per prompt."""
        return self.rollout_batch_size * self.num_generations

    def validate(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise UserError(f"--estimator must be one of {', '.join(ESTIMATORS)}, not {self.estimator!r}")
        if self.num_generations < 1:
            raise UserError("--num-generations must be >= 1")
        if self.estimator in GROUP_ESTIMATORS and self.num_generations < 2:
            raise UserError(f"--estimator {self.estimator} compares responses to one prompt: --num-generations >= 2")
        if self.loss_agg not in AGGREGATIONS:
            raise UserError(f"--loss-agg must be one of {', '.join(AGGREGATIONS)}, not {self.loss_agg!r}")
        for name in ("kl_loss_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("cliprange_high", "reward_clip"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0")
        for name in unused_settings(self):
            raise UserError(
                f"--{name.replace('_', '-')}: --estimator {self.estimator} does not use it ({USED_BY[name][1]})"
            )
        if self.estimator in GROUP_ESTIMATORS and self.whiten_rewards:
            raise UserError("--whiten-rewards whitens per-token rewards (ppo, reinforce++), not grpo / rloo's")
        if self.nproc > 1:
            raise UserError("flywheel rl runs in one process (--nproc 1); flywheel ppo runs under --nproc N")
        if self.batch_size >= 1 and self.sequences_per_step % self.batch_size:
            raise UserError(
                f"--rollout-batch-size x --num-generations ({self.sequences_per_step} responses per step) must be a "
                f"multiple of --batch-size ({self.batch_size})"
            )
        super().validate()


# Settings only some estimators read: (the estimators, why)
_CRITIC = (("ppo",), "only ppo has a critic")
USED_BY: dict[str, tuple[tuple[str, ...], str]] = {
    **{name: _CRITIC for name in ("value_model", "value_lr", "vf_coef", "cliprange_value", "lam")},
    "gamma": (("ppo", "reinforce++"), "only ppo and reinforce++ discount rewards over tokens"),
    "scale_rewards": (("grpo",), "only grpo divides by the std of a prompt's rewards"),
}


def unused_settings(cfg: RLConfig) -> list[str]:
    """The fields `cfg` sets away from their defaults that its estimator never reads (set, they would be ignored)."""
    defaults = {f.name: f.default for f in fields(RLConfig)}
    return [
        name
        for name, (estimators, _) in USED_BY.items()
        if cfg.estimator not in estimators and getattr(cfg, name) != defaults[name]
    ]


def rl_advantages(
    cfg: RLConfig, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rewards, advantages, returns), each (B, R) and 0 on padding, for the configured estimator.

    scores: (B,) final scores (each prompt's K responses consecutive); kl: (B, R) per-token KL estimates; values:
    (B, R) the critic's (zeros without one). Group estimators give every token of a response its advantage; their
    `returns` are those advantages (nothing learns from them)."""
    m = mask.to(kl.dtype)
    rewards = kl_penalised_rewards(scores, kl, m, kl_coef)  # the score at the last token, -beta KL_t on each
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, m, shift_mean=False)
    if cfg.estimator == "ppo":
        advantages, returns = gae(rewards, values, m, cfg.gamma, cfg.lam)
        return rewards, masked_whiten(advantages, m), returns
    if cfg.estimator == "reinforce++":
        return rewards, reinforce_pp_advantages(rewards, m, cfg.gamma), discounted_returns(rewards, m, cfg.gamma)
    per_response = sequence_kl_rewards(scores, kl, m, kl_coef)  # (B,)
    k = cfg.num_generations
    if cfg.estimator == "grpo":
        adv = group_advantages(per_response, k, scale=cfg.scale_rewards)
    else:
        adv = rloo_advantages(per_response, k)
    advantages = adv[:, None] * m
    return rewards, advantages, advantages


def group_stats(scores: torch.Tensor, k: int) -> dict[str, float]:
    """How much signal the groups carry: the mean within-prompt std of the scores, and the fraction of prompts whose
    K scores are all equal (the reward says nothing about them; with the KL in the reward their advantages are the
    KL differences alone, docs/methods.md)."""
    if k < 2:
        return {}
    g = scores.view(-1, k)
    return {"group_score_std": float(g.std(1).mean()), "zero_std_groups": float((g.std(1) == 0).float().mean())}


class RLTrainer(PPOTrainer):
    """PPOTrainer with K samples per prompt, the estimator's advantages and the extended loss; no critic unless
    --estimator ppo."""

    cfg: RLConfig

    def __init__(self, cfg: RLConfig, reward_fn: RewardFn | None = None):
        self.score_moments = RunningMoments()
        self._packed: Packed | None = None  # the last rollout batch in shared-prompt rows, where it was packed
        super().__init__(cfg, reward_fn)

    def _build_critic(self) -> Critic | None:
        return super()._build_critic() if self.cfg.estimator == "ppo" else None

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "score_moments": self.score_moments.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.score_moments.load_state_dict(state["score_moments"])

    def _sample_and_score(self, prompts: list[list[int]], seed: int, *, old_logprobs: bool = True) -> Scored:
        """K samples per prompt, scored by every role (the policy's own pass only with `old_logprobs`)."""
        return sample_and_score(
            self.cfg,
            self.engine,
            self.actor,
            self.ref,
            self.critic,
            self.reward,
            prompts,
            self.pad_id,
            seed,
            samples_per_prompt=self.cfg.num_generations,
            old_logprobs=old_logprobs,
        )

    @torch.no_grad()
    def experience(self, prompts: list[list[int]], seed: int) -> tuple[Experience, dict]:
        sc = self._sample_and_score(prompts, seed)
        self._packed = sc.packed
        return self._advantages(sc)

    def optimise(self, exp: Experience, step: int) -> dict[str, float]:
        """With one minibatch of the whole batch (no accumulation), every epoch updates on all rows in their sampled
        order (shuffling a single minibatch would change only the summation order), in shared-prompt rows where the
        rollout was packed; otherwise PPO's shuffled minibatches."""
        cfg = self.cfg
        if cfg.batch_size != len(exp) or cfg.grad_accum != 1 or self._packed is None:
            return super().optimise(exp, step)
        sums: dict[str, float] = {}
        for epoch in range(cfg.ppo_epochs):
            for k, v in self.minibatch_update(exp, self._ptx_batch(step, epoch, 0), self._packed).items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / cfg.ppo_epochs for k, v in sums.items()}

    def _advantages(self, sc: Scored) -> tuple[Experience, dict]:
        cfg, s = self.cfg, sc.seqs
        mask = s.response_mask.float()
        scores = sc.raw_scores - cfg.missing_eos_penalty * (~s.finished).float()
        penalised = scores  # what the group statistics read: the advantages see the penalty too
        if cfg.reward_norm:
            scores = self.score_moments.normalise(scores)
        scores = clip_scores(scores, cfg.reward_clip)
        kl = kl_estimate(sc.old_logprobs, sc.ref_logprobs, cfg.kl_estimator) * mask
        values = sc.values if sc.values is not None else torch.zeros_like(mask)
        rewards, advantages, returns = rl_advantages(cfg, scores, kl, mask, self.kl_ctl.value, values)
        exp = sc.experience(values, rewards, advantages, returns, scores)
        stats = rollout_stats(sc, kl, self.kl_ctl.value)
        stats.update(group_stats(penalised, cfg.num_generations))
        stats["advantage_abs"] = float(masked_mean(advantages.abs(), mask))
        return exp, {"stats": stats, "responses": sc.responses}

    @property
    def single_pass(self) -> bool:
        """One epoch over one minibatch, no accumulation: the policy that sampled is the one updated, once, so its
        old log-probs are the update forward's own (detached) and the scoring pass before it is skipped, as TRL's
        GRPO does when it uses a batch once. The advantages (which read the old log-probs through the KL in the
        reward) are computed between that forward and the backward."""
        cfg = self.cfg
        return cfg.ppo_epochs == 1 and cfg.batch_size == cfg.sequences_per_step and cfg.grad_accum == 1

    def rollout_and_optimise(
        self, prompts: list[list[int]], seed: int, step: int
    ) -> tuple[Experience, dict, dict[str, float]]:
        if not self.single_pass:
            return super().rollout_and_optimise(prompts, seed, step)
        cfg = self.cfg
        sc = self._sample_and_score(prompts, seed, old_logprobs=False)
        self.actor.module.train()
        rollout_end = time.perf_counter()
        s = sc.seqs
        args = (s.sequences, s.attention_mask, s.position_ids, s.prompt_len, sc.packed)
        ptx = self._ptx_batch(step, 0, 0)
        with autocast(cfg.bf16):
            forward = self._policy_pass(self.actor.module, args, ptx)
        sc.old_logprobs = forward[0].detach() * s.response_mask.float()
        with torch.no_grad():
            exp, info = self._advantages(sc)
        weights = loss_weights(exp.response_mask, cfg.loss_agg, max_len=cfg.max_new_tokens)
        stats = self._backward(exp, args, forward, weights, loss_weights(exp.response_mask, "token-mean"), ptx)
        self._step_optimizers()
        info["rollout_end"] = rollout_end
        return exp, info, stats

    def minibatch_update(
        self, mb: Experience, ptx: dict[str, Any] | None, packed: Packed | None = None
    ) -> dict[str, float]:
        """One optimizer step on the minibatch `mb` (--grad-accum micro-batches); `packed`: `mb` in shared-prompt rows
        (the whole rollout batch in its sampled order, no accumulation)."""
        cfg = self.cfg
        out: dict[str, float] = {}
        micro = len(mb) // cfg.grad_accum
        # Weights over the whole minibatch, sliced per micro-batch: accumulation does not change the loss.
        weights = loss_weights(mb.response_mask, cfg.loss_agg, max_len=cfg.max_new_tokens)  # (b, R)
        per_token = loss_weights(mb.response_mask, "token-mean")  # logged statistics and the critic: token means
        for j in range(cfg.grad_accum):
            rows = torch.arange(j * micro, (j + 1) * micro, device=mb.sequences.device)
            part = mb.select(rows)
            args = (part.sequences, part.attention_mask, part.position_ids, part.prompt_len, packed)
            with autocast(cfg.bf16):
                forward = self._policy_pass(self.actor.module, args, ptx)
            stats = self._backward(part, args, forward, weights[rows], per_token[rows], ptx, cfg.grad_accum)
            for k, v in stats.items():
                out[k] = out.get(k, 0.0) + v
        self._step_optimizers()
        return out

    def _backward(
        self,
        part: Experience,
        args: tuple,
        forward: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        w: torch.Tensor,
        tw: torch.Tensor,
        ptx: dict[str, Any] | None,
        n_micro: int = 1,
    ) -> dict[str, float]:
        """The loss of one micro-batch (one of `n_micro`; `args` its roles' inputs) from the policy's forward on it
        (log-probs, entropy, ptx LM loss), backpropagated, with the critic's; `w` weights each token's loss
        (--loss-agg), `tw` is the token mean the logged statistics use. Returns the statistics' sums."""
        cfg = self.cfg
        logprobs, entropy, lm = forward
        mask = part.response_mask.float()
        out: dict[str, float] = {}
        with autocast(cfg.bf16):
            loss_t, parts = rl_token_loss(
                logprobs,
                part.old_logprobs,
                part.ref_logprobs,
                part.advantages,
                entropy,
                mask,
                eps_low=cfg.cliprange,
                eps_high=cfg.cliprange_high,
                kl_loss_coef=cfg.kl_loss_coef,
                entropy_coef=cfg.entropy_coef,
            )
            loss = (w * loss_t).sum()
            if lm is not None:
                ptx_loss = lm / ptx["weight"]
                loss = loss + cfg.ptx_coef * ptx_loss / n_micro
                out["ptx_loss"] = float(ptx_loss.detach()) / n_micro
            loss.backward()
        log_ratio = (logprobs.detach() - part.old_logprobs) * mask
        stats = {
            "loss": (w * loss_t.detach()).sum(),
            "policy_loss": (w * parts["pg"].detach()).sum(),
            "kl_loss": (tw * parts["kl"].detach()).sum(),
            "entropy": (tw * entropy.detach()).sum(),
            "clipfrac": (tw * parts["clipped"].float()).sum(),
            "approx_kl": (tw * 0.5 * log_ratio**2).sum(),
            "ratio": (tw * torch.exp(log_ratio)).sum(),
        }
        if self.critic is not None:
            with autocast(cfg.bf16):
                values = self.critic.forward(*args)
            vl, vstats = value_loss(values, part.old_values, part.returns, mask, cfg.cliprange_value)
            share = float(tw.sum())  # this micro-batch's share of the minibatch's tokens
            (cfg.vf_coef * vl * share).backward()
            stats.update(value_loss=vl.detach() * share, value_clipfrac=vstats["value_clipfrac"] * share)
        out.update({k: float(v) for k, v in stats.items()})
        return out


def train_rl(cfg: RLConfig, reward_fn: RewardFn | None = None) -> Path:
    """Run `flywheel rl`; `reward_fn` replaces the reward model with a programmatic score (tests, toy tasks)."""
    return run_training(cfg, RLTrainer, reward_fn, stage=f"rl-{cfg.estimator}")


def main(argv: list[str] | None = None) -> int:
    from flywheel.cli import run_trainer

    return run_trainer("rl", RLConfig, train_rl, argv, __doc__, "policy")

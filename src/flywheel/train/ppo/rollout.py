"""Rollouts: sample responses with the engine, score them with the four roles, and build an `Experience`."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from flywheel import distributed
from flywheel.engine import Engine, SamplingParams
from flywheel.train.loop import autocast
from flywheel.train.ppo.advantages import gae, kl_estimate, kl_penalised_rewards, masked_whiten
from flywheel.train.ppo.config import PPOConfig
from flywheel.train.ppo.experience import Experience
from flywheel.train.ppo.packing import Packed, pack_rollouts
from flywheel.train.ppo.roles import Actor, Critic, Reference, Reward


@dataclass
class Sequences:
    sequences: torch.Tensor  # (B, P+R)
    attention_mask: torch.Tensor  # (B, P+R)
    position_ids: torch.Tensor  # (B, P+R)
    response_mask: torch.Tensor  # (B, R)
    prompt_len: int
    finished: torch.Tensor  # (B,) bool: the response ended with a stop token

    def to(self, device: torch.device) -> Sequences:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Sequences(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def build_sequences(
    prompts: list[list[int]], responses: list[list[int]], finished: list[bool], pad_id: int
) -> Sequences:
    """Left-pad prompts to P and right-pad responses to R, so every response starts at column P."""
    p = max(len(x) for x in prompts)
    r = max(1, max(len(y) for y in responses))
    b = len(prompts)
    seq = torch.full((b, p + r), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p + r), dtype=torch.long)
    for i, (x, y) in enumerate(zip(prompts, responses, strict=True)):
        seq[i, p - len(x) : p] = torch.tensor(x)
        attn[i, p - len(x) : p] = 1
        if y:
            seq[i, p : p + len(y)] = torch.tensor(y)
            attn[i, p : p + len(y)] = 1
    pos = (attn.cumsum(1) - 1).clamp_min(0)
    return Sequences(seq, attn, pos, attn[:, p:].clone(), p, torch.tensor(finished))


@dataclass
class Scored:
    """A sampled batch and what the frozen roles and the policy say about it (all on the policy's device)."""

    seqs: Sequences
    old_logprobs: torch.Tensor | None  # (B, R) log pi_old, 0 on padding; None until the update's forward gives them
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref, 0 on padding
    values: torch.Tensor | None  # (B, R) V_old, 0 on padding; None without a critic
    raw_scores: torch.Tensor  # (B,) the reward model's (or function's) scores
    responses: list[list[int]]  # the sampled token ids of each response
    packed: Packed | None = None  # the same rows in shared-prompt rows, where the roles ran them that way

    def experience(
        self,
        values: torch.Tensor,
        rewards: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
        scores: torch.Tensor,
    ) -> Experience:
        """The rollout batch the update reads: these sequences and log-probs with an estimator's values (B, R),
        rewards (B, R), advantages (B, R), returns (B, R) and final scores (B,)."""
        s = self.seqs
        assert self.old_logprobs is not None, "the old log-probs come before the experience"
        return Experience(
            sequences=s.sequences,
            attention_mask=s.attention_mask,
            position_ids=s.position_ids,
            response_mask=s.response_mask,
            old_logprobs=self.old_logprobs,
            ref_logprobs=self.ref_logprobs,
            old_values=values,
            rewards=rewards,
            advantages=advantages,
            returns=returns,
            scores=scores,
            prompt_len=s.prompt_len,
        )


@torch.no_grad()
def sample_and_score(
    cfg: PPOConfig,
    engine: Engine,
    actor: Actor,
    ref: Reference,
    critic: Critic | None,
    reward: Reward,
    prompts: list[list[int]],
    pad_id: int,
    seed: int,
    samples_per_prompt: int = 1,
    old_logprobs: bool = True,
    pack: bool = True,
) -> Scored:
    """Sample `samples_per_prompt` (K) responses to each prompt, a prompt's K consecutive and sharing one prefill in
    the engine, and run every role on them. `old_logprobs=False` skips the policy's scoring pass (for an update
    that takes them from its own forward: `RLTrainer`'s single pass). With K > 1 the roles run the K rows of a
    prompt as one shared-prompt row where that saves work (`pack_rollouts`; `pack=False`: never)."""
    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=0,
        top_p=1.0,
        stop_token_ids=[] if cfg.ignore_eos else None,
        seed=seed,
    )
    gen = engine.generate(prompts, params, samples_per_prompt=samples_per_prompt)
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    # Built on the CPU (row by row), then moved to the device in one copy per tensor.
    s = build_sequences(prompts, gen.tokens, [r == "stop" for r in gen.finish_reasons], pad_id).to(actor.device)
    packed = None
    if pack and samples_per_prompt > 1:
        packed = pack_rollouts(
            s.sequences, s.attention_mask, s.position_ids, s.prompt_len, samples_per_prompt, actor.module.config
        )
    args = (s.sequences, s.attention_mask, s.position_ids, s.prompt_len, packed)
    mask = s.response_mask.float()
    with autocast(cfg.bf16):
        # Recomputed with the training forward, so the first minibatch has ratio 1 exactly (engine log-probs may
        # come from a different kernel or dtype).
        old = actor.logprobs(*args) * mask if old_logprobs else None  # no entropy: only the update reads it
        ref_logprobs = ref.forward(*args)
        values = critic.forward(*args) if critic is not None else None
        raw_scores = reward.forward(*args[:4], s.response_mask)
    return Scored(
        seqs=s,
        old_logprobs=old,
        ref_logprobs=ref_logprobs * mask,
        values=values * mask if values is not None else None,
        raw_scores=raw_scores,
        responses=gen.tokens,
        packed=packed,
    )


def rollout_stats(sc: Scored, kl: torch.Tensor, kl_coef: float) -> dict[str, float]:
    """The per-step metrics every estimator logs: score, KL per response (k1), response length, EOS rate."""
    mask = sc.seqs.response_mask.float()
    raw = sc.raw_scores
    k1 = ((sc.old_logprobs - sc.ref_logprobs) * mask).sum(1)  # (B,) KL per response, nats
    return {
        "score": float(raw.mean()),
        "score_std": float(raw.std()) if len(raw) > 1 else 0.0,
        "kl": float(k1.mean()),
        "non_score_reward": float((-kl_coef * kl).sum(1).mean()),
        "response_length": float(mask.sum(1).mean()),
        "eos_rate": float(sc.seqs.finished.float().mean()),
        "kl_coef": kl_coef,
    }


@torch.no_grad()
def make_experience(
    cfg: PPOConfig,
    engine: Engine,
    actor: Actor,
    ref: Reference,
    critic: Critic,
    reward: Reward,
    prompts: list[list[int]],
    pad_id: int,
    kl_coef: float,
    seed: int,
) -> tuple[Experience, dict]:
    """Sample responses to `prompts` and score them. The experience lives on the policy's device, where the engine
    samples and every role runs its forward."""
    sc = sample_and_score(cfg, engine, actor, ref, critic, reward, prompts, pad_id, seed)
    s, old_logprobs, ref_logprobs, values = sc.seqs, sc.old_logprobs, sc.ref_logprobs, sc.values
    assert values is not None, "PPO needs a critic"
    mask = s.response_mask.float()
    scores = sc.raw_scores - cfg.missing_eos_penalty * (~s.finished).float()
    kl = kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
    rewards = kl_penalised_rewards(scores, kl, mask, kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    # Whitened over the rollouts of every rank, so N processes see the advantages one process would.
    advantages = (
        masked_whiten(advantages, mask) if distributed.world() == 1 else distributed.masked_whiten(advantages, mask)
    )
    exp = sc.experience(values, rewards, advantages, returns, scores)
    return exp, {"stats": rollout_stats(sc, kl, kl_coef), "responses": sc.responses}

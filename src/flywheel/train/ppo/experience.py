"""The rollout batch that PPO optimises on. B rollouts; P = padded prompt length; R = padded response length.
Every tensor lives on the policy's device."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Experience:
    sequences: torch.Tensor  # (B, P+R) left-padded prompt ids followed by right-padded response ids
    attention_mask: torch.Tensor  # (B, P+R) 1 on real tokens (prompt and response), 0 on padding
    position_ids: torch.Tensor  # (B, P+R) positions counted over real tokens only (left padding starts at 0)
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens, incl. the EOS that ended the response
    old_logprobs: torch.Tensor  # (B, R) log pi_old(a_t|s_t) of the sampled tokens, at the sampling temperature
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(a_t|s_t), same temperature
    old_values: torch.Tensor  # (B, R) V_old(s_t): the critic before this PPO step
    rewards: torch.Tensor  # (B, R) -beta * kl_t, plus the score at the last real token
    advantages: torch.Tensor  # (B, R) GAE advantages, whitened over real tokens
    returns: torch.Tensor  # (B, R) advantages (before whitening) + values: the critic's targets
    scores: torch.Tensor  # (B,) reward-model score of each response (after the missing-EOS penalty)
    prompt_len: int  # P

    def select(self, idx: torch.Tensor) -> Experience:
        """The rows `idx` (on any device) of every per-rollout tensor (a minibatch)."""
        idx = idx.to(self.sequences.device)
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})

    def __len__(self) -> int:
        return int(self.sequences.shape[0])

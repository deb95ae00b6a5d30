"""The four PPO roles, each a thin class over one HF model with the same small interface: `forward(batch)`.

    Actor      pi_theta (trained)             -> log-probs (B, R) and entropy (B, R) of the response tokens
                                                 (`logprobs`: the log-probs alone)
    Reference  pi_ref = the SFT policy (frozen) -> log-probs (B, R)
               (`AdapterOffReference` in LoRA runs: the actor's own module with its adapters off)
    Critic     V_phi (trained, init from the RM) -> values (B, R) of the states before each response token
    Reward     r(x, y) (frozen; one model or an ensemble) or a function -> scores (B,) at the last real token

Every role sees the same `Experience`-shaped inputs: sequences, attention mask, position ids and the prompt length P,
and optionally the same batch packed in shared-prompt rows (`flywheel.train.ppo.packing`; K rollouts of a prompt in
one row), which it runs instead wherever its model's fast forward applies: the outputs are the same (B, R) tensors.
Logits are divided by the sampling temperature whenever log-probs are computed, and dropout is off everywhere.

Devices: every forward runs on its inputs' device (the policy's) and returns its outputs there. A frozen role built
with `offload=True` (PPO's --offload-frozen) keeps its module on the CPU and moves it to the inputs' device for the
forward only, so its weights occupy the GPU while it scores and never while the engine samples or the actor trains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from flywheel import fastforward
from flywheel.lora import disable_adapters
from flywheel.models import disable_dropout
from flywheel.tokenization import TurnEnd
from flywheel.train.ensemble import aggregate_rewards, disagreement
from flywheel.train.likelihood import LikelihoodParts, combine
from flywheel.train.ppo.losses import token_logprobs, token_logprobs_and_entropy
from flywheel.train.ppo.packing import Packed

# A programmatic reward: (prompt ids, response ids) per rollout -> (B,) scores. Used by tests and toy tasks.
RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]


class Role:
    offload: bool = False  # the module lives on the CPU and visits the inputs' device for each forward

    def __init__(self, module: torch.nn.Module, *, trainable: bool, offload: bool = False):
        if offload and trainable:
            raise ValueError("only a frozen role can be offloaded (a trained one keeps its optimizer on the device)")
        self.module = module
        self.offload = offload
        disable_dropout(module)
        module.train(trainable)
        if not trainable:
            module.requires_grad_(False)
        if offload:
            module.to("cpu")

    @property
    def device(self) -> torch.device:
        """Where the module's weights are now (an offloaded module: the CPU, except during its forward)."""
        return next(self.module.parameters()).device

    @contextmanager
    def placed(self, device: torch.device) -> Iterator[None]:
        """The module on `device` inside the block; an offloaded one goes back to the CPU after it."""
        if not self.offload:
            yield
            return
        self.module.to(device)
        try:
            yield
        finally:
            self.module.to("cpu")

    def _hidden(self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, keep: int) -> torch.Tensor:
        # The fast forward where it applies (flywheel.fastforward; else HF's), the `keep` last positions only.
        return fastforward.hidden_states(self.module, seq, attn, pos, keep=keep)  # (B, keep, H)


def response_span(seq: torch.Tensor, prompt_len: int) -> int:
    """R + 1: the last position of the prompt and the R response positions. Every role reads only these (the
    logits or values at column P - 1 onwards), so the last layer and the head run on them alone."""
    return seq.shape[1] - prompt_len + 1


class _PolicyRole(Role):
    def __init__(self, module: torch.nn.Module, temperature: float, *, trainable: bool, offload: bool = False):
        super().__init__(module, trainable=trainable, offload=offload)
        self.temperature = temperature

    def _logits(
        self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: int, packed: Packed | None
    ) -> torch.Tensor:
        if packed is not None and getattr(self.module, "lm_head", None) is not None and packed.applies(self.module):
            return self.module.lm_head(packed.hidden(self.module))  # (B, R, V)
        # The LM head runs on the R + 1 last positions only: the prompt's other positions predict nothing we score.
        keep = response_span(seq, prompt_len)
        logits = fastforward.causal_lm_logits(self.module, seq, attn, pos, keep=keep)
        return logits[:, -keep:-1]  # (B, R, V): predicts the response tokens, before the temperature

    def _logprobs(self, logits: torch.Tensor, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
        return token_logprobs(logits, seq[:, prompt_len:], self.temperature)  # (B, R)


class Actor(_PolicyRole):
    def __init__(self, module: torch.nn.Module, temperature: float):
        super().__init__(module, temperature, trainable=True)

    def forward(
        self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: int, packed: Packed | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(seq, attn, pos, prompt_len, packed)
        return token_logprobs_and_entropy(logits, seq[:, prompt_len:], self.temperature)

    def logprobs(
        self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: int, packed: Packed | None = None
    ) -> torch.Tensor:
        """`forward`'s log-probs (B, R) alone, without the entropy: what scoring the rollouts (old log-probs) needs."""
        return self._logprobs(self._logits(seq, attn, pos, prompt_len, packed), seq, prompt_len)


class Reference(_PolicyRole):
    def __init__(self, module: torch.nn.Module, temperature: float, *, offload: bool = False):
        super().__init__(module, temperature, trainable=False, offload=offload)

    @torch.no_grad()
    def forward(
        self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: int, packed: Packed | None = None
    ) -> torch.Tensor:
        with self.placed(seq.device):
            return self._logprobs(self._logits(seq, attn, pos, prompt_len, packed), seq, prompt_len)


class AdapterOffReference(Reference):
    """pi_ref for LoRA runs: the policy module itself with its adapters switched off, so no second copy is loaded.

    It shares the actor's module, so it must not freeze it (Reference's constructor would): it sets its fields only."""

    def __init__(self, module: torch.nn.Module, temperature: float):
        self.module = module
        self.temperature = temperature

    @torch.no_grad()
    def forward(
        self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: int, packed: Packed | None = None
    ) -> torch.Tensor:
        with disable_adapters(self.module):
            return super().forward(seq, attn, pos, prompt_len, packed)


class Critic(Role):
    """The value model: its score head before each response token, minus `bias`.

    bias: the normalisation offset of the reward model the critic starts from (`reward_offset` of its config), so
    that its first predictions are on the scale of the rewards it learns to predict. A critic that starts `c` above
    the returns tilts GAE towards long responses: the overestimate is paid once, at the last token, and reaches token
    t discounted by (gamma * lambda)^(T - t), so the early tokens of a long response pay less of it than a short one's.
    """

    def __init__(self, module: torch.nn.Module, bias: float = 0.0):
        super().__init__(module, trainable=True)
        self.bias = bias

    def forward(
        self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: int, packed: Packed | None = None
    ) -> torch.Tensor:
        if packed is not None and packed.applies(self.module):
            hidden = packed.hidden(self.module)  # (B, R, H): before each token
        else:
            hidden = self._hidden(seq, attn, pos, response_span(seq, prompt_len))[:, :-1]
        return self.module.score(hidden).squeeze(-1).float() - self.bias  # (B, R)


def complete_turns(
    seq: torch.Tensor,
    attn: torch.Tensor,
    pos: torch.Tensor,
    prompt_len: int,
    lengths: torch.Tensor,
    end: TurnEnd,
    close_cut: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append the template's tail to every response that ends with its end-of-turn token (`TurnEnd.complete` on a
    batch) and, with `close_cut`, the end-of-turn token and the tail to every other non-empty response (one cut at
    the length limit: read as an answer that ends there, `TurnEnd.close`): (seq, attn, pos) widened by the longest
    such suffix, and the new response lengths (B,). Rows: a left-padded prompt in columns [0, P), then the response,
    right-padded."""
    read = end.close if close_cut else end.complete  # the rule for one response lives in TurnEnd
    ns = lengths.tolist()
    suffixes: dict[int, tuple[int, ...]] = {}
    for i, (row, n) in enumerate(zip(seq[:, prompt_len:].tolist(), ns, strict=True)):
        extra = tuple(read(row[:n])[n:])
        if extra:
            suffixes[i] = extra
    if not suffixes:
        return seq, attn, pos, lengths
    width = max(len(x) for x in suffixes.values())
    pad = seq.new_zeros((seq.shape[0], width))
    seq, attn, pos = torch.cat([seq, pad], 1), torch.cat([attn, pad], 1), torch.cat([pos, pad], 1)
    ids = {x: torch.tensor(x, dtype=seq.dtype, device=seq.device) for x in set(suffixes.values())}  # at most two
    for i, suffix in suffixes.items():
        t, start = len(suffix), prompt_len + ns[i]
        seq[i, start : start + t] = ids[suffix]
        attn[i, start : start + t] = 1
        pos[i, start : start + t] = pos[i, start - 1] + 1 + torch.arange(t, device=seq.device)
    added = torch.tensor([len(suffixes.get(i, ())) for i in range(len(ns))], dtype=lengths.dtype)
    return seq, attn, pos, lengths + added.to(lengths.device)


class Reward(Role):
    """A frozen reward model (or an ensemble of them), a Python function of the token ids, or both (their sum). A
    model's score is read at the last token of each response completed with the chat template's tail
    (`complete_turns`: where `flywheel rm` trained it to read; with `close_cut`, a response cut at the length limit is
    closed with the end-of-turn token first, as the rankings present such an answer), minus its normalisation bias.
    An ensemble (`module` a list, `bias` one per member) scores with every member and combines the (N, B) scores with
    `aggregate_rewards` (`agg`, `lam`); `last` then holds the batch's `reward_ensemble_std` (disagreement: the mean
    over responses of the std across members) and `reward_ensemble_mean` (the members' mean score) for the step's
    metrics. With `likelihood` (a reward model saved with `flywheel rm --likelihood-head`), the score is the head's
    reading of the members' mean and the reference's log-probabilities of the response tokens as sampled
    (`flywheel.train.likelihood.combine`)."""

    def __init__(
        self,
        module: torch.nn.Module | Sequence[torch.nn.Module] | None = None,
        fn: RewardFn | None = None,
        bias: float | Sequence[float] = 0.0,
        *,
        offload: bool = False,
        turn_end: TurnEnd | None = None,
        close_cut: bool = True,
        agg: str = "mean",
        lam: float = 1.0,
        likelihood: LikelihoodParts | None = None,
    ):
        if module is None and fn is None:
            raise ValueError("Reward needs a model, a function or both")
        self.members = [] if module is None else list(module) if isinstance(module, Sequence) else [module]
        self.biases = [float(b) for b in bias] if isinstance(bias, Sequence) else [float(bias)] * len(self.members)
        if self.members and len(self.biases) != len(self.members):
            raise ValueError(f"{len(self.members)} reward models but {len(self.biases)} biases")
        if likelihood is not None and not self.members:
            raise ValueError("a likelihood head reads a reward model's score: it needs the reward model")
        frozen = self.members + ([likelihood.reference] if likelihood is not None else [])
        if len(frozen) == 1:
            super().__init__(frozen[0], trainable=False, offload=offload)
        elif frozen:  # one module for the offload / freeze machinery, scored member by member
            super().__init__(torch.nn.ModuleList(frozen), trainable=False, offload=offload)
        else:
            self.module = None  # type: ignore[assignment]
        self.bias = self.biases[0] if len(self.biases) == 1 else None  # a single model's (None for an ensemble)
        self.fn = fn
        self.turn_end = turn_end
        self.close_cut = close_cut
        self.agg, self.lam = agg, lam
        self.likelihood = likelihood
        self.last: dict[str, float] = {}

    @torch.no_grad()
    def forward(
        self, seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: int, response_mask: torch.Tensor
    ) -> torch.Tensor:
        lengths = response_mask.sum(1).long()  # (B,)
        fn_scores = None
        if self.fn is not None:
            prompts = [
                row[m.bool()].tolist() for row, m in zip(seq[:, :prompt_len], attn[:, :prompt_len], strict=True)
            ]
            responses = [row[:n].tolist() for row, n in zip(seq[:, prompt_len:], lengths, strict=True)]
            fn_scores = torch.as_tensor(self.fn(prompts, responses), dtype=torch.float32, device=seq.device)
            if self.module is None:
                return fn_scores
        answer = lengths  # (B,) the response as the likelihood features read it
        if self.turn_end is not None:
            if self.likelihood is not None:  # up to the end-of-turn token (a cut response closed, as below)
                ends = zip(seq[:, prompt_len:].tolist(), lengths.tolist(), strict=True)
                answer = torch.tensor([len(self.turn_end.answer(row[:n], self.close_cut)) for row, n in ends])
            seq, attn, pos, lengths = complete_turns(
                seq, attn, pos, prompt_len, lengths, self.turn_end, self.close_cut
            )
        last = lengths  # (B,) the last real token (the prompt's with no response), counted from column P - 1
        rows = torch.arange(len(seq), device=seq.device)
        keep = response_span(seq, prompt_len)
        member_scores, logprobs = [], None
        with self.placed(seq.device):  # one visit of the device for every frozen module (--offload-frozen)
            if self.likelihood is not None:
                logits = fastforward.causal_lm_logits(self.likelihood.reference, seq, attn, pos, keep=keep)
                tokens = token_logprobs(logits[:, -keep:-1], seq[:, prompt_len:])  # (B, R)
                logprobs = [row[: max(int(n), 1)] for row, n in zip(tokens, answer, strict=True)]
            for module, bias in zip(self.members, self.biases, strict=True):
                hidden = fastforward.hidden_states(module, seq, attn, pos, keep=keep)  # (B, R + 1, H) from P - 1
                member_scores.append(module.score(hidden[rows, last]).squeeze(-1).float() - bias)  # (B,)
        stacked = torch.stack(member_scores)  # (N, B)
        if len(self.members) > 1:
            self.last = {"reward_ensemble_std": disagreement(stacked), "reward_ensemble_mean": float(stacked.mean())}
        scores = stacked[0] if len(self.members) == 1 else aggregate_rewards(stacked, self.agg, self.lam)
        if self.likelihood is not None:
            scores = combine(self.likelihood.head.to(seq.device), stacked, scores, logprobs, self.likelihood.offset)
        return scores if fn_scores is None else scores + fn_scores

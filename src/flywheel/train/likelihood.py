"""A reward that also reads the starting policy's likelihood of the answer (`flywheel rm --likelihood-head`).

    flywheel rm --model runs/sft/final --data rankings.jsonl --rm-ensemble 3 --likelihood-head --out runs/rm
    rm = RewardModel.from_pretrained("runs/rm/final")      # a LikelihoodReward: the same scoring interface

A reward model reads its score at the answer's last token. A small one does not learn there whether the answer's value
is right (a fact, a sum): it learns what a good answer looks like, and, as the labelers put "I don't know" above most
wrong answers, that a deflection beats an answer it cannot check. The policy it starts from (the SFT model) does know
which values are likely: its log-probabilities of the answer's tokens are low where the value is wrong. The head
reads both: a small MLP over

    score     the reward model's score (an ensemble's mean; the rest of its aggregation is applied after the head)
    min       the starting model's lowest token log-probability in the answer (its end-of-turn token included)
    min_body  the same without the end-of-turn token
    first     its first token's log-probability (a deflection where the prompt wants an answer is unlikely)
    sum       the answer's total log-probability
    tokens    its length in tokens

fitted by Bradley-Terry on every ranked pair of the reward model's own training rankings (or of
--likelihood-rankings N of them, drawn with --seed), after the reward model (or each member) has trained; it is
deterministic with --seed. Its output is normalised as `flywheel rm` normalises a
reward model: the training rankings' top answers score 0 on average. An ensemble aggregated other than by its mean
(`mean-std`, `min`) keeps its conservatism: the score is head(mean, ...) - (mean - aggregate).

Saved beside the reward model in its final directory: `flywheel_likelihood.json` (the features, the offset and the
fit's accuracy), `likelihood/head.safetensors` and `likelihood/reference/`, a copy of the starting model, so the
directory scores on its own. The reference must share the reward model's tokenizer. PPO and the other RL trainers
read the features from the response tokens as sampled, up to the end-of-turn token; a response cut at the length limit
is closed with it, as the reward model reads such an answer (its `min` then counts how unlikely it is to end there).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flywheel.errors import UserError

FEATURES = ("score", "min", "min_body", "first", "sum", "tokens")
MANIFEST = "flywheel_likelihood.json"
HEAD_DIR = "likelihood"
HIDDEN = 32  # the head's two hidden layers
EPOCHS = 150  # full-batch Adam steps of the fit
LR = 3e-3
WEIGHT_DECAY = 1e-4


@dataclass
class LikelihoodParts:
    """What PPO's reward role needs of a likelihood head: the reference LM (frozen), the head and its offset."""

    reference: torch.nn.Module
    head: LikelihoodHead
    offset: float


def has_likelihood_head(path: str | Path) -> bool:
    """Whether `path` is a reward model directory saved with `--likelihood-head`."""
    return (Path(path) / MANIFEST).is_file()


def answer_features(scores: torch.Tensor, logprobs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B, len(FEATURES)) float32: per answer, the reward model's score and its token log-probabilities' summary.

    scores: (B,); logprobs: B 1-D tensors, the reference's log-probability of each answer token (at least one)."""
    if len(scores) != len(logprobs):
        raise ValueError(f"{len(scores)} scores but {len(logprobs)} answers")
    rows = []
    for s, lp in zip(scores.tolist(), logprobs, strict=True):
        lp = lp.float()
        if lp.numel() == 0:
            raise ValueError("an answer without tokens has no likelihood")
        body = lp[:-1] if lp.numel() > 1 else lp
        rows.append([s, float(lp.min()), float(body.min()), float(lp[0]), float(lp.sum()), float(lp.numel())])
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(FEATURES))


@torch.no_grad()
def answer_logprobs(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    answer_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    bf16: bool = False,
) -> list[torch.Tensor]:
    """The log-probability (temperature 1) of each answer token after its prompt under `model`, a causal LM: B
    float32 CPU tensors. Batched by length and left-padded, as PPO's rollouts are, so the LM head runs on the
    answers' positions only (`fastforward.causal_lm_logits`, the reference role's forward)."""
    from flywheel import fastforward
    from flywheel.train.loop import autocast

    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(answer_ids)} answers")
    device = next(model.parameters()).device
    seqs = [list(p) + list(a) for p, a in zip(prompt_ids, answer_ids, strict=True)]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in rows)
        keep = max(len(answer_ids[i]) for i in rows) + 1  # the answers' positions and the one before each
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(seqs[i]) :] = torch.tensor(seqs[i])
            mask[r, width - len(seqs[i]) :] = 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        with autocast(bf16):
            logits = fastforward.causal_lm_logits(model, ids.to(device), mask.to(device), pos.to(device), keep=keep)[
                :, -keep:-1
            ]
        targets = ids[:, width - keep + 1 :].to(device)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0].cpu()
        for r, i in enumerate(rows):
            n = len(answer_ids[i])
            out[i] = logp[r, keep - 1 - n :]
    return out  # type: ignore[return-value]


def score_groups_with_logprobs(
    members: Sequence[Any], reference: Any, groups: Sequence[Any], *, batch_size: int = 32, bf16: bool = False
) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per `RankingGroup`: its answers' (N, K) member scores (each normalised) and the reference's token log-probs of
    each answer, the log-probs of all groups batched together: what the head reads of a group."""
    per_member = [m.score_groups(groups) for m in members]
    lps = answer_logprobs(
        reference,
        [g.prompt_ids for g in groups for _ in range(g.k)],
        [a for g in groups for a in g.responses],
        batch_size=batch_size,
        bf16=bf16,
    )
    out, at = [], 0
    for g, scores in zip(groups, zip(*per_member, strict=True), strict=True):
        out.append((torch.stack(scores), lps[at : at + g.k]))
        at += g.k
    return out


class LikelihoodHead(torch.nn.Module):
    """Standardised features -> tanh MLP -> one score."""

    def __init__(self, n_features: int = len(FEATURES), hidden: int = HIDDEN):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features.float() - self.mean) / self.std).squeeze(-1)


def bradley_terry_loss(scores: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor) -> torch.Tensor:
    """Mean of -log sigmoid(s_winner - s_loser) over the pairs."""
    return F.softplus(scores[losers] - scores[winners]).mean()


def pair_accuracy(scores: Sequence[torch.Tensor], pairs: Sequence[Sequence[tuple[int, int]]]) -> float:
    """Share of (winner, loser) pairs that `scores` order right, over groups (a tie in score counts half)."""
    right = total = 0.0
    for s, ps in zip(scores, pairs, strict=True):
        for w, lo in ps:
            right += 1.0 if s[w] > s[lo] else 0.5 if s[w] == s[lo] else 0.0
            total += 1
    return right / max(total, 1)


def fit_head(
    features: Sequence[torch.Tensor], pairs: Sequence[Sequence[tuple[int, int]]], *, seed: int
) -> tuple[LikelihoodHead, float]:
    """The head fitted on ranked groups: features[g] is (K_g, F), pairs[g] its (winner, loser) index pairs. Returns
    the head and its pairwise accuracy on these pairs."""
    if not features or not any(pairs):
        raise UserError("--likelihood-head: no ranked pair to fit the head on")
    flat = torch.cat([f.float() for f in features])
    starts = torch.tensor([0] + [len(f) for f in features]).cumsum(0)[:-1].tolist()
    win = torch.tensor([s + w for s, ps in zip(starts, pairs, strict=True) for w, _ in ps])
    lose = torch.tensor([s + lo for s, ps in zip(starts, pairs, strict=True) for _, lo in ps])
    gen = torch.Generator().manual_seed(seed)
    head = LikelihoodHead(flat.shape[1])
    with torch.no_grad():
        for p in head.net.parameters():  # seeded init, whatever the global RNG holds
            if p.dim() > 1:
                torch.nn.init.kaiming_uniform_(p, a=5**0.5, generator=gen)
            else:
                p.uniform_(-0.1, 0.1, generator=gen)
        head.mean.copy_(flat.mean(0))
        head.std.copy_(flat.std(0).clamp_min(1e-6) if len(flat) > 1 else torch.ones(flat.shape[1]))
    opt = torch.optim.Adam(head.net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    for _ in range(EPOCHS):
        opt.zero_grad()
        bradley_terry_loss(head(flat), win, lose).backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        at = [head(f.float()) for f in features]
    return head, pair_accuracy(at, pairs)


def save_head(out_dir: Path, head: LikelihoodHead, offset: float, info: dict[str, Any]) -> None:
    """Write the head and its manifest into the reward model's directory (the reference is saved by the caller)."""
    from safetensors.torch import save_file

    (out_dir / HEAD_DIR).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out_dir / HEAD_DIR / "head.safetensors"))
    manifest = {
        "features": list(FEATURES),
        "hidden": HIDDEN,
        "offset": offset,
        "reference": f"{HEAD_DIR}/reference",
        **info,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_head(path: str | Path) -> tuple[LikelihoodHead, float, Path]:
    """(head, offset, reference directory) of a reward model saved with `--likelihood-head`."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        features, hidden = manifest["features"], int(manifest["hidden"])
        offset = float(manifest["offset"])
        reference = path / manifest["reference"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"unreadable likelihood head manifest ({err})", path=str(path / MANIFEST)) from None
    if tuple(features) != FEATURES:
        raise UserError(
            f"likelihood head reads {features}, this flywheel computes {list(FEATURES)}", path=str(path / MANIFEST)
        )
    head = LikelihoodHead(len(FEATURES), hidden)
    head.load_state_dict(load_file(str(path / HEAD_DIR / "head.safetensors")))
    return head.eval(), offset, reference


def check_same_tokenizer(reference_tokenizer: Any, tokenizer: Any, where: str) -> None:
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(
            f"the likelihood head's reference model has another tokenizer than {where}: it must read the same tokens"
        )


def combine(
    head: LikelihoodHead,
    member_scores: torch.Tensor,
    aggregated: torch.Tensor,
    logprobs: Sequence[torch.Tensor],
    offset: float,
) -> torch.Tensor:
    """(B,) head(mean of the members, likelihood features) - (mean - aggregated) - offset. member_scores: (N, B)."""
    mean = member_scores.float().mean(0)
    with torch.no_grad():
        out = head(answer_features(mean.cpu(), logprobs).to(mean.device))
    return out - (mean - aggregated.float()) - offset


class LikelihoodReward:
    """A reward model (or ensemble) and its likelihood head, with `RewardModel`'s scoring interface (`score`,
    `score_ids`, `score_groups`, `tokenizer`, `turn_end`, `max_length`, `offset`, `device`)."""

    def __init__(self, inner: Any, reference: Any, head: LikelihoodHead, offset: float, *, bf16: bool = False):
        self.inner = inner
        self.members = list(getattr(inner, "members", [inner]))  # one plain reward model: a member of its own
        self.reference = reference.eval()
        self.head = head.eval()
        self.head_offset = offset
        self.bf16 = bf16
        self.tokenizer = inner.tokenizer
        self.turn_end = inner.turn_end
        self.max_length = inner.max_length
        self.batch_size = self.members[0].batch_size

    @property
    def offset(self) -> float:
        return self.head_offset

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def _combine(self, stacked: torch.Tensor, logprobs: Sequence[torch.Tensor], normalize: bool) -> torch.Tensor:
        """The head's score of (N, B) normalised member scores, with the ensemble's aggregation outside it."""
        agg = self.inner.aggregate(stacked) if len(self.members) > 1 else stacked[0]
        return combine(self.head, stacked, agg, logprobs, self.head_offset if normalize else 0.0)

    def _logprobs(self, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]]) -> list:
        return answer_logprobs(self.reference, prompt_ids, answer_ids, batch_size=self.batch_size, bf16=self.bf16)

    def score_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        *,
        normalize: bool = True,
        close_cut: bool = True,
    ) -> torch.Tensor:
        """As `RewardModel.score_ids`; the features read each response up to its end-of-turn token, one cut at a length
        limit closed with it (`TurnEnd.answer`) as the reward model reads it."""
        stacked = torch.stack([m.score_ids(prompt_ids, response_ids, close_cut=close_cut) for m in self.members])
        answers = [self.turn_end.answer(r, close_cut) for r in response_ids]
        return self._combine(stacked, self._logprobs(prompt_ids, answers), normalize)

    def score(
        self, prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str], *, normalize: bool = True
    ) -> torch.Tensor:
        """As `RewardModel.score`: the answers rendered as the model's next turn (end-of-turn token included)."""
        return self.score_with_members(prompts, responses, normalize=normalize)[0]

    def score_with_members(
        self, prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str], *, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) `score` and the (N, B) scores of the reward models it reads (`RewardEnsemble.score_members`; N = 1
        for a single reward model), each normalised by its own offset unless `normalize` is false."""
        from flywheel.tokenization import render_prompt, render_scored_response

        stacked = torch.stack([m.score(prompts, responses) for m in self.members])  # the head reads them normalised
        prompt_ids = [render_prompt(self.tokenizer, list(p)) for p in prompts]
        answers = [
            render_scored_response(self.tokenizer, list(p), r)[0] for p, r in zip(prompts, responses, strict=True)
        ]
        scores = self._combine(stacked, self._logprobs(prompt_ids, answers), normalize)
        offsets = torch.tensor([0.0 if normalize else m.offset for m in self.members])
        return scores, stacked + offsets[:, None]

    def score_groups(self, groups: Sequence[Any], *, normalize: bool = True) -> list[torch.Tensor]:
        """As `RewardModel.score_groups` (`RankingGroup`s: the answers' ids without the template's tail)."""
        read = score_groups_with_logprobs(
            self.members, self.reference, groups, batch_size=self.batch_size, bf16=self.bf16
        )
        return [self._combine(stacked, lps, normalize) for stacked, lps in read]

"""Reward-model ensembles: N reward models that differ only in their seed, scored together for conservative rewards.

    flywheel rm --model runs/sft/final --data rankings.jsonl --out runs/rm --rm-ensemble 4
    flywheel ppo ... --reward-model runs/rm/final --reward-ensemble-agg mean-std --reward-ensemble-lambda 1.0

`flywheel rm --rm-ensemble N` writes `final/` as an ensemble directory: `final/member0` .. `final/member<N-1>`, each a
plain HF reward model normalised on its own (its own `flywheel_reward_offset`), and `flywheel_ensemble.json`, the
manifest that lists them. `RewardModel.from_pretrained` on such a directory returns a `RewardEnsemble`, which scores
with every member and aggregates (Coste et al. 2023; Eisenstein et al. 2023):

    mean      the members' mean score
    min       the lowest member score (worst case)
    mean-std  mean - lambda * std over members (uncertainty-weighted; std with ddof 0)

    ens = RewardModel.from_pretrained("runs/rm/final", ensemble_agg="min")
    ens.score(prompts, responses)          # (B,) aggregated
    ens.score_members(prompts, responses)  # (N, B), one row per member
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flywheel.errors import UserError
from flywheel.utils import atomic_dir

MANIFEST = "flywheel_ensemble.json"
FORMAT = "flywheel-reward-ensemble"
AGGREGATIONS = ("mean", "min", "mean-std")
AGG_HELP = (
    "how the scores of an ensemble reward model (flywheel rm --rm-ensemble N) are combined: mean, min (worst case) "
    "or mean-std (mean - lambda * std over members); a single reward model takes only the default"
)
LAMBDA_HELP = "lambda of --reward-ensemble-agg mean-std: how many member standard deviations are subtracted"


def check_aggregation(agg: str, lam: float) -> None:
    """A one-line UserError for an unknown aggregation, a negative lambda, or a lambda that nothing reads."""
    if agg not in AGGREGATIONS:
        raise UserError(f"--reward-ensemble-agg must be one of {', '.join(AGGREGATIONS)}, got '{agg}'")
    if lam < 0:
        raise UserError("--reward-ensemble-lambda must be >= 0")
    if lam != 1.0 and agg != "mean-std":
        raise UserError("--reward-ensemble-lambda is read by --reward-ensemble-agg mean-std only")


def single_model_error(agg: str) -> str:
    return (
        f"--reward-ensemble-agg {agg} needs an ensemble reward model (flywheel rm --rm-ensemble N); "
        "this one is a single model"
    )


def aggregate_rewards(scores: torch.Tensor, agg: str, lam: float = 1.0) -> torch.Tensor:
    """(B,) one score per response from (N, B) member scores: mean, min, or mean - lam * std (ddof 0)."""
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"member scores must be (N >= 1, B), got shape {tuple(scores.shape)}")
    if agg == "mean":
        return scores.mean(0)
    if agg == "min":
        return scores.min(0).values
    if agg == "mean-std":
        return scores.mean(0) - lam * scores.std(0, correction=0)
    raise ValueError(f"unknown aggregation {agg!r} (one of {', '.join(AGGREGATIONS)})")


def disagreement(scores: torch.Tensor) -> float:
    """The ensemble's disagreement on a batch: the mean over responses of the std (ddof 0) across members (N, B)."""
    return float(scores.std(0, correction=0).mean()) if scores.numel() else 0.0


def ensemble_members(path: str | Path) -> list[Path] | None:
    """The member directories of an ensemble directory (its manifest's order); None for anything else (a single
    reward model directory, a hub id). A manifest that is not one is a one-line UserError."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text())
        names = meta["members"]
        ok = meta.get("format") == FORMAT and isinstance(names, list) and names
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in names):
        raise UserError(
            f"not a reward-model ensemble manifest (format {FORMAT!r} with a 'members' list)", path=str(manifest)
        )
    dirs = [Path(path) / n for n in names]
    for d in dirs:
        if not (d / "config.json").is_file():
            raise UserError(f"ensemble member {d.name} is missing (no config.json in {d})", path=str(manifest))
    return dirs


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link a finished member's file into the ensemble (no second copy on disk); copy across filesystems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def assemble_ensemble(out_dir: Path, members: Sequence[Path], info: dict[str, Any]) -> Path:
    """Write `out_dir` atomically: member0..N-1 (the trained members' final directories) and the manifest."""
    with atomic_dir(out_dir) as tmp:
        names = [f"member{i}" for i in range(len(members))]
        for name, src in zip(names, members, strict=True):
            shutil.copytree(src, tmp / name, copy_function=_link_or_copy)
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "members": names, **info}, indent=2) + "\n")
    return out_dir


class RewardEnsemble:
    """N `RewardModel`s scored together, with `RewardModel`'s scoring interface (`score`, `score_ids`,
    `score_groups`, `tokenizer`, `turn_end`) returning the aggregate, and `score_members` / `score_members_ids`
    returning (N, B). Every member subtracts its own offset; all must share one tokenizer and chat template."""

    def __init__(self, members: Sequence[Any], *, agg: str = "mean", lam: float = 1.0):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        check_aggregation(agg, lam)
        first = members[0].tokenizer
        for i, m in enumerate(members[1:], start=1):
            if m.tokenizer.get_vocab() != first.get_vocab() or m.tokenizer.chat_template != first.chat_template:
                raise UserError(f"ensemble member {i} has another tokenizer or chat template than member 0")
        self.members = list(members)
        self.agg, self.lam = agg, lam
        self.tokenizer = first
        self.turn_end = members[0].turn_end
        self.max_length = min(m.max_length for m in members)
        for m in members:
            m.max_length = self.max_length  # every member reads the same (possibly cut) tokens

    def __len__(self) -> int:
        return len(self.members)

    @property
    def offset(self) -> float:
        """The members' mean offset (for reporting: each member subtracts its own)."""
        return sum(m.offset for m in self.members) / len(self.members)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def aggregate(self, scores: torch.Tensor) -> torch.Tensor:
        """(N, B) member scores -> (B,) with this ensemble's aggregation."""
        return aggregate_rewards(scores, self.agg, self.lam)

    def score_members(
        self, prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str], *, normalize: bool = True
    ) -> torch.Tensor:
        """(N, B): `RewardModel.score` of every member."""
        return torch.stack([m.score(prompts, responses, normalize=normalize) for m in self.members])

    def score_members_ids(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, normalize: bool = True
    ) -> torch.Tensor:
        """(N, B): `RewardModel.score_ids` of every member."""
        return torch.stack([m.score_ids(prompt_ids, response_ids, normalize=normalize) for m in self.members])

    def score(
        self, prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str], *, normalize: bool = True
    ) -> torch.Tensor:
        return self.aggregate(self.score_members(prompts, responses, normalize=normalize))

    def score_ids(
        self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *, normalize: bool = True
    ) -> torch.Tensor:
        return self.aggregate(self.score_members_ids(prompt_ids, response_ids, normalize=normalize))

    def score_groups(self, groups: Sequence[Any], *, normalize: bool = True) -> list[torch.Tensor]:
        """The aggregated (K,) scores of each group's answers."""
        per_member = [m.score_groups(groups, normalize=normalize) for m in self.members]
        return [self.aggregate(torch.stack(scores)) for scores in zip(*per_member, strict=True)]

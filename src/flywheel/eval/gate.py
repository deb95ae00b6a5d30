"""The gate's decision: which policy to deploy, from labelers' comparisons of candidates with the incumbent.

InstructGPT chose the policies it shipped by labelers' preferences on held-out prompts, not by the reward model's
score (which PPO optimises, and so overstates). Both gates decide here: the demo's, where simulated labelers compare
answers (`flywheel.demo.gate`), and `flywheel round --gate-prompts`, where people rank them in the workbench
(`flywheel.round`). A candidate is deployed when the labelers prefer it to the incumbent with 95% confidence (the
interval of its win rate, ties counted as half, lies above 50%); among several, the most preferred, the earliest
step among equals; else the incumbent stays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.eval.policy import mean_interval


@dataclass
class Candidate:
    policy: str  # a policy directory
    step: int  # the training step it was saved at
    win_rate: float  # against the incumbent, by the labelers, ties split
    ci95_low: float
    ci95_high: float
    deflects: list[str] = field(default_factory=list)  # moves towards a deflection the labelers saw: not deployed


def judge(policy: str, step: int, outcomes: Sequence[float]) -> Candidate:
    """A candidate's record from its outcomes against the incumbent (1 preferred, 0 not, 0.5 a tie)."""
    lo, hi = mean_interval(outcomes)
    return Candidate(policy, step, sum(outcomes) / len(outcomes), max(0.0, lo), min(1.0, hi))


def choose(candidates: Sequence[Candidate]) -> Candidate | None:
    """The candidate the labelers prefer to the incumbent with 95% confidence (interval above 50%) and most often,
    among those they did not see deflecting (`deflects`); the earliest step among equals (the one closest to the
    incumbent). None: keep the incumbent."""
    confident = [c for c in candidates if c.ci95_low > 0.5 and not c.deflects]
    return min(confident, key=lambda c: (-c.win_rate, c.step)) if confident else None


def ranking_outcome(order: Sequence[Sequence[int]], candidate: int, incumbent: int) -> float:
    """From one ranking (groups of answer positions, best first; a group of several is a tie): 1 when `candidate`'s
    answer is ranked above `incumbent`'s, 0 below, 0.5 in the same group (or the same answer)."""
    rank = {position: i for i, group in enumerate(order) for position in group}
    if candidate == incumbent or rank[candidate] == rank[incumbent]:
        return 0.5
    return 1.0 if rank[candidate] < rank[incumbent] else 0.0


def prompt_outcome(orders: Sequence[Sequence[Sequence[int]]], candidate: int, incumbent: int) -> float:
    """One prompt's outcome from all its rankings (`ranking_outcome` of each, averaged). The prompt is the unit the
    win rate's interval counts: several labelers ranking one prompt's answers judge the same pair of answers, so
    counting each ranking as an outcome of its own would narrow the interval as if there were more prompts."""
    if not orders:
        raise ValueError("a prompt's outcome needs at least one ranking")
    return sum(ranking_outcome(order, candidate, incumbent) for order in orders) / len(orders)


def saved_policies(ppo_final: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the policies a PPO run saved (`policies/step-N`, PPO's `save_policy_every`), then its
    final policy, in step order."""
    saved = sorted((int(d.name.removeprefix("step-")), d) for d in (ppo_final.parent / "policies").glob("step-*"))
    steps = json.loads((ppo_final / "flywheel.json").read_text())["steps"]
    return [*saved, (steps, ppo_final)]

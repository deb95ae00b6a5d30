"""The labelers' gate: which policy is deployed after a round of PPO (`--gate-every N`).

InstructGPT chose the policies it shipped by labelers' preferences on held-out prompts, not by the reward model's
score, which PPO optimises and so overstates. Here PPO saves its policy every N steps; the simulated labelers (the
panel that ranked the round's samples, never the oracle itself) compare each saved policy's greedy answers with the
incumbent's (the SFT policy in round 1, the policy deployed by the round before later) on validation prompts held out
from training and evaluation. The deployed policy is the candidate they prefer most among those whose win rate's 95%
interval lies above 50%; where none does, the incumbent stays.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flywheel.demo.stages import DemoRun
from flywheel.demo.state import Stage
from flywheel.demo.summary import _pct
from flywheel.errors import UserError
from flywheel.eval.policy import decode, generate, mean_interval, prompt_ids_for
from flywheel.models import load_causal_lm
from flywheel.tokenization import load_tokenizer
from flywheel.world import Labeler, Task, default_panel, load_tasks


def labeler_outcomes(
    tasks: list[Task], incumbent: list[str], candidate: list[str], panel: list[Labeler], rng: random.Random
) -> list[float]:
    """Per prompt, one labeler of the panel compares the two answers: 1 = the candidate's is preferred, 0 = the
    incumbent's, 0.5 = the same answer (up to surrounding whitespace: there is nothing to prefer)."""
    out = []
    for task, a, b in zip(tasks, incumbent, candidate, strict=True):
        if a.strip() == b.strip():
            out.append(0.5)
            continue
        order = rng.choice(panel).rank(task, [a, b], rng)
        out.append(1.0 if order[0] == [1] else 0.0)
    return out


@dataclass
class Candidate:
    policy: str  # a PPO policy directory
    step: int  # the PPO step it was saved at
    win_rate: float  # against the incumbent, by the labelers, ties split
    ci95_low: float
    ci95_high: float


def judge(policy: str, step: int, outcomes: list[float]) -> Candidate:
    lo, hi = mean_interval(outcomes)
    return Candidate(policy, step, sum(outcomes) / len(outcomes), max(0.0, lo), min(1.0, hi))


def choose(candidates: list[Candidate]) -> Candidate | None:
    """The candidate the labelers prefer to the incumbent with 95% confidence (interval above 50%) and most often;
    the earliest step among equals (the one closest to the incumbent). None: keep the incumbent."""
    confident = [c for c in candidates if c.ci95_low > 0.5]
    return min(confident, key=lambda c: (-c.win_rate, c.step)) if confident else None


@dataclass
class GateResult:
    round: int
    incumbent: str
    deployed: str  # the chosen candidate's policy, or the incumbent
    prompts: int  # validation prompts compared on
    candidates: list[Candidate]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GateResult:
        return cls(**{**data, "candidates": [Candidate(**c) for c in data["candidates"]]})

    def paths(self) -> list[Path]:
        return [Path(self.deployed)]

    def describe(self) -> str:
        """One line for the report."""
        judged = ", ".join(
            f"step {c.step} {_pct(c.win_rate)} [{_pct(c.ci95_low)}, {_pct(c.ci95_high)}]" for c in self.candidates
        )
        chosen = [c.step for c in self.candidates if c.policy == self.deployed]
        verdict = f"deployed the policy of step {chosen[0]}" if chosen else "kept the incumbent"
        return (
            f"Gate, round {self.round}: the labelers compared each saved PPO policy with the incumbent on "
            f"{self.prompts} validation prompts ({judged}) and {verdict}."
        )


def saved_policies(ppo_final: Path) -> list[tuple[int, Path]]:
    """(step, directory) of the policies a PPO run saved (policies/step-N), then its final policy, in step order."""
    saved = sorted((int(d.name.removeprefix("step-")), d) for d in (ppo_final.parent / "policies").glob("step-*"))
    steps = json.loads((ppo_final / "flywheel.json").read_text())["steps"]
    return [*saved, (steps, ppo_final)]


def greedy_answers(policy: Path, tasks: list[Task], run: DemoRun) -> list[str]:
    model, tok = load_causal_lm(str(policy)), load_tokenizer(str(policy))
    tokens, _ = generate(
        model,
        tok,
        prompt_ids_for(tok, tasks),
        max_new_tokens=run.cfg.max_new_tokens,
        temperature=0.0,
        seed=run.cfg.seed,
        bf16=run.cfg.bf16,
    )
    return decode(tok, tokens)


def stage_gate(run: DemoRun, incumbent: Path, ppo_final: Path, r: int, temperature: float) -> GateResult:
    """The labelers (at round 1's calibrated temperature) pick the policy to deploy from PPO's saved policies."""
    tasks = load_tasks(run.files["val_tasks"])
    if not tasks:
        raise UserError("--gate-every needs validation prompts: set --world.n-val > 0")
    with Stage(run.timings, "gate" if r == 1 else f"round {r}: gate") as st:
        panel = default_panel(temperature)
        rng = random.Random(f"{run.cfg.seed}:gate:{r}")
        base = greedy_answers(incumbent, tasks, run)
        candidates = []
        for step, policy in saved_policies(ppo_final):
            outcomes = labeler_outcomes(tasks, base, greedy_answers(policy, tasks, run), panel, rng)
            candidates.append(judge(str(policy), step, outcomes))
        chosen = choose(candidates)
        result = GateResult(r, str(incumbent), chosen.policy if chosen else str(incumbent), len(tasks), candidates)
        st.done("%s", result.describe())
    return result

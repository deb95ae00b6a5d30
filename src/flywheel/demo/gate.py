"""The labelers' gate: which policy is deployed after a round of PPO (`--gate-every N`).

InstructGPT chose the policies it shipped by labelers' preferences on held-out prompts, not by the reward model's
score, which PPO optimises and so overstates (`flywheel.eval.gate` decides; `flywheel round --gate-prompts` is the
same gate with people ranking in the workbench). Here PPO saves its policy every N steps; the simulated labelers (the
panel that ranked the round's samples, never the oracle itself) compare each saved policy's greedy answers with the
incumbent's (the SFT policy in round 1, the policy deployed by the round before later) on validation prompts held out
from training and evaluation, every labeler voting on every pair. The deployed policy is the candidate they prefer
most among those whose win rate's 95% interval lies above 50%; where none does, the incumbent stays.

The labelers also note what each answer does. A labeler prefers "I don't know" to a wrong answer, so a policy that
deflects more wins their votes without answering better; a candidate that deflects more than the SFT policy on the
validation prompts is not deployed: more "I don't know" or refusals on answerable prompts by more than
`--gate-max-over-refusal` points (3 in the `default` and `fp32` presets, the over-refusal target's margin; 10 in
`quick`), or one deflection in place of the other by more than `--gate-max-deflection` (10, the report's warning;
`flywheel.demo.summary.deflection_shifts`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flywheel.demo.stages import DemoRun
from flywheel.demo.state import Stage
from flywheel.demo.summary import _pct, deflection_shifts
from flywheel.errors import UserError
from flywheel.eval.gate import Candidate, choose, judge, saved_policies
from flywheel.eval.policy import greedy_answers, verdict_counts
from flywheel.world import Labeler, Task, default_panel, load_tasks, score


def labeler_outcomes(
    tasks: list[Task], incumbent: list[str], candidate: list[str], panel: list[Labeler], rng: random.Random
) -> list[float]:
    """Per prompt, every labeler of the panel compares the two answers; the outcome is the share of them who prefer
    the candidate's (1 = all of them, 0 = none), 0.5 for the same answer (up to surrounding whitespace: there is
    nothing to prefer). The share's expectation is the vote of one labeler drawn from the panel, so the win rate
    means what it would with one labeler per pair; the whole panel takes out most of the labelers' noise, which on a
    few hundred prompts would otherwise decide between saved policies a few points apart."""
    out = []
    for task, a, b in zip(tasks, incumbent, candidate, strict=True):
        if a.strip() == b.strip():
            out.append(0.5)
            continue
        out.append(sum(labeler.rank(task, [a, b], rng)[0] == [1] for labeler in panel) / len(panel))
    return out


@dataclass
class GateResult:
    round: int
    incumbent: str
    deployed: str  # the chosen candidate's policy, or the incumbent
    prompts: int  # validation prompts compared on
    candidates: list[Candidate]

    def to_json(self, rel: Callable[[Path], str] = str) -> dict[str, Any]:
        data = asdict(self)
        data.update({key: rel(Path(data[key])) for key in ("incumbent", "deployed")})
        for candidate in data["candidates"]:
            candidate["policy"] = rel(Path(candidate["policy"]))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], at: Callable[[str], Path] = Path) -> GateResult:
        candidates = [Candidate(**{**c, "policy": str(at(c["policy"]))}) for c in data["candidates"]]
        paths = {key: str(at(data[key])) for key in ("incumbent", "deployed")}
        return cls(**{**data, **paths, "candidates": candidates})

    def paths(self) -> list[Path]:
        return [Path(self.deployed)]

    def describe(self) -> str:
        """One line for the report."""
        judged = ", ".join(
            f"step {c.step} {_pct(c.win_rate)} [{_pct(c.ci95_low)}, {_pct(c.ci95_high)}]"
            + (f" (not deployed: {'; '.join(c.deflects)})" if c.deflects else "")
            for c in self.candidates
        )
        chosen = [c.step for c in self.candidates if c.policy == self.deployed]
        verdict = f"deployed the policy of step {chosen[0]}" if chosen else "kept the incumbent"
        return (
            f"Gate, round {self.round}: the labelers compared each saved PPO policy with the incumbent on "
            f"{self.prompts} validation prompts ({judged}) and {verdict}."
        )


def verdicts(tasks: list[Task], answers: list[str]) -> dict[str, dict[str, int]]:
    return verdict_counts(tasks, [score(t, a) for t, a in zip(tasks, answers, strict=True)])


def stage_gate(
    run: DemoRun, incumbent: Path, ppo_final: Path, r: int, temperature: float, sft: Path | None = None
) -> GateResult:
    """The labelers (at round 1's calibrated temperature) pick the policy to deploy from PPO's saved policies; `sft`
    (the incumbent where not given) is the policy a candidate's deflections are counted against."""
    tasks = load_tasks(run.files["val_tasks"])
    if not tasks:
        raise UserError("--gate-every needs validation prompts: set --world.n-val > 0")
    with Stage(run.timings, "gate" if r == 1 else f"round {r}: gate") as st:
        panel = default_panel(temperature)
        rng = random.Random(f"{run.cfg.seed}:gate:{r}")
        prompts = [t.messages for t in tasks]

        def answers_of(policy: Path) -> list[str]:
            cfg = run.cfg
            return greedy_answers(policy, prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, bf16=cfg.bf16)

        base = answers_of(incumbent)
        # What each answer does, as the report counts it: the labelers see a refusal or an "I don't know" for what it
        # is and know which questions have an answer, which requests are harmful and which no one can answer.
        reference = verdicts(tasks, base if sft in (None, incumbent) else answers_of(sft))
        candidates = []
        for step, policy in saved_policies(ppo_final):
            answers = answers_of(policy)
            candidate = judge(str(policy), step, labeler_outcomes(tasks, base, answers, panel, rng))
            candidate.deflects = [
                f"{what}: {_pct(a)} -> {_pct(b)}"
                for what, a, b in deflection_shifts(
                    reference,
                    verdicts(tasks, answers),
                    run.cfg.gate_max_deflection / 100,
                    answer_limit=run.cfg.gate_max_over_refusal / 100,
                )
            ]
            candidates.append(candidate)
        chosen = choose(candidates)
        result = GateResult(r, str(incumbent), chosen.policy if chosen else str(incumbent), len(tasks), candidates)
        st.done("%s", result.describe())
    return result

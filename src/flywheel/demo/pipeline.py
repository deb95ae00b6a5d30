"""The demo's pipeline: every stage in order, kept or run (`--resume`); then the summary, targets and report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

from flywheel.demo.config import SHIPPED_BASES, DemoConfig, describe_model, parse_demo_config
from flywheel.demo.evaluation import stage_evaluate
from flywheel.demo.gate import GateResult, stage_gate
from flywheel.demo.rankings import Rankings, stage_rankings
from flywheel.demo.report import result_table, write_report
from flywheel.demo.stages import (
    DemoRun,
    RewardModelResult,
    stage_ppo,
    stage_pretrain,
    stage_reward_model,
    stage_sft,
    stage_tokenizer,
    start_run,
)
from flywheel.demo.state import RunState
from flywheel.demo.summary import DemoSummary, RoundSummary, check_targets, deflection_warnings, headline
from flywheel.utils import atomic_write_text, cpu_seconds, log, seed_everything, set_threads


def run_demo(cfg: DemoConfig) -> DemoSummary:
    """Run every stage under cfg.out and return the summary (also written to summary.json, with report.md)."""
    cfg = cfg.resolved()
    set_threads(cfg.threads or None)
    log.info(
        "flywheel demo: preset %s (from %s), seed %d, into %s",
        cfg.preset,
        describe_model(asdict(cfg)),
        cfg.seed,
        cfg.out,
    )
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    done = RunState.open(out, cfg)
    timings: dict[str, float] = {}
    t_start, c_start = time.perf_counter(), cpu_seconds()
    run = start_run(cfg, out, timings)
    base, sft, labels, rm = first_round_data(done, run)
    ppo = done.stage("ppo:1", timings, partial(stage_ppo, run, sft, sft, rm))
    gate = deploy(done, run, sft, ppo, 1, labels.summary.temperature, sft)
    ppo = Path(gate.deployed) if gate else ppo
    rounds = [RoundSummary(1, labels.summary, rm.summary, str(ppo), gate and gate.to_json())]
    policies = {"base": base, "sft": sft}
    for r in range(2, cfg.rounds + 1):
        # The flywheel: the deployed PPO policy answers new prompts, labelers rank its answers, the reward model
        # learns from them (it has only seen SFT-like answers so far), and PPO continues, still held near SFT.
        policies[f"ppo_round{r - 1}"] = ppo
        first = rounds[0].labelers.temperature
        new = done.stage(f"rankings:{r}", timings, partial(stage_rankings, run, ppo, r, first))
        if new is None:
            break
        rm = done.stage(
            f"reward model:{r}",
            timings,
            partial(stage_reward_model, run, rm.dir, new, r, labels.heldout),
        )
        trained = done.stage(f"ppo:{r}", timings, partial(stage_ppo, run, ppo, sft, rm, r))
        gate = deploy(done, run, ppo, trained, r, first, sft)
        ppo = Path(gate.deployed) if gate else trained
        rounds.append(RoundSummary(r, new.summary, rm.summary, str(ppo), gate and gate.to_json()))
    results = stage_evaluate(run, {**policies, "ppo": ppo})
    resumed = {"kept_stages": done.kept} if done.kept else None
    if resumed and done.reused_from:
        resumed["reused_from"] = done.reused_from
    # A resumed run's total adds the kept stages' own times to this process's.
    timings["total"] = round(time.perf_counter() - t_start + done.kept_seconds(), 1)
    timings["total (cpu)"] = round(cpu_seconds() - c_start + done.kept_seconds(cpu=True), 1)
    summary = DemoSummary(
        config=asdict(cfg),
        timings_s=timings,
        labelers=rounds[0].labelers,
        reward_model=rounds[0].reward_model,
        rounds=rounds,
        final_policy=str(ppo),
        policies=results.policies,
        win_rates=results.win_rates,
        kl_ppo_sft=results.kl_ppo_sft,
        kl_to_sft=results.kl_to_sft,
        ppo_curve=results.ppo_curve,
        resumed=resumed,
    )
    summary.targets = check_targets(summary)
    summary.deflection_warnings = deflection_warnings(summary)
    atomic_write_text(out / "summary.json", json.dumps(summary.to_json(), indent=2) + "\n")
    write_report(summary, out)
    return summary


def first_round_data(done: RunState, run: DemoRun) -> tuple[Path, Path, Rankings, RewardModelResult]:
    """The stages before the first policy optimisation, kept or run: (base, SFT, round-1 rankings, reward model).
    `flywheel demo` and `flywheel compare` share them."""
    cfg, timings = run.cfg, run.timings
    if cfg.base in SHIPPED_BASES:
        from flywheel.demo.base import shipped_base  # not at import: `python -m flywheel.demo.base` imports this

        base = shipped_base(cfg.base)
        log.info("== base model: the shipped toy-world base, %s (flywheel.demo.base; --from-scratch pretrains)", base)
    elif cfg.base:
        base = Path(cfg.base)
        log.info("== base model: %s (no tokenizer training or pretraining)", base)
    else:
        init = done.stage("tokenizer", timings, partial(stage_tokenizer, run))
        base = done.stage("pretrain", timings, partial(stage_pretrain, run, init))
    sft = done.stage("sft", timings, partial(stage_sft, run, base))
    labels = done.stage("rankings:1", timings, partial(stage_rankings, run, sft))
    rm = done.stage("reward model:1", timings, partial(stage_reward_model, run, sft, labels))
    return base, sft, labels, rm


def deploy(
    done: RunState, run: DemoRun, incumbent: Path, trained: Path, r: int, temperature: float, sft: Path
) -> GateResult | None:
    """With --gate-every: the labelers' choice between the incumbent and the round's saved PPO policies (none that
    deflects more than the SFT policy)."""
    if not run.cfg.gate_every:
        return None
    return done.stage(f"gate:{r}", run.timings, partial(stage_gate, run, incumbent, trained, r, temperature, sft))


DESCRIPTION = "the whole ChatGPT loop on the toy world, judged by its hidden oracle, in minutes on a laptop CPU"


def main(argv: list[str] | None = None) -> int:
    cfg = parse_demo_config(argv, "flywheel demo", DESCRIPTION)
    s = run_demo(cfg)
    out = Path(cfg.out)
    print()
    print(result_table(s))
    print()
    for t in s.targets:
        note = "" if t.holds or not t.note else f" ({t.note})"
        print(f"  [{'ok' if t.holds else 'MISSED'}] {t.target}: {t.value}{note}")
    print(f"\n{headline(s)}")
    print(f"\nreport: {out / 'report.md'}  (figures: {out / 'summary.json'}; {s.timings_s['total']:.0f} s)")
    print("chat with the result:")
    print(f"  flywheel chat {s.final_policy}")
    print(f"  flywheel serve {s.final_policy}")
    return 0

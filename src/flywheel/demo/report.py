"""The demo's report: `report.md` (the result table, the targets, few-shot curves, timings) and its PNG plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.demo.config import STAGES, demo_command, describe_model
from flywheel.demo.gate import GateResult
from flywheel.demo.summary import DemoSummary, PolicyResult, _pct, headline, ppo_label
from flywheel.utils import atomic_write_text, log


def policy_columns(s: DemoSummary) -> list[tuple[str, str]]:
    """(summary key, column title) of every evaluated policy in the order of the loop: base, SFT, each PPO round."""
    n_rounds, label = len(s.rounds) or 1, ppo_label(s.config)
    ppo = [(f"ppo_round{r}", f"{label} round {r}") for r in range(1, n_rounds)]
    last = label if n_rounds == 1 else f"{label} round {n_rounds}"
    return [("base", "base"), ("sft", "SFT"), *ppo, ("ppo", last)]


def _rows(s: DemoSummary, names: list[str]) -> list[tuple[str, ...]]:
    p, w, kl = s.policies, s.win_rates, s.kl_to_sft

    def each(fmt: Callable[[PolicyResult], str]) -> tuple[str, ...]:
        return tuple(fmt(p[n]) for n in names)

    def vs_sft(n: str) -> str:
        if n == "sft":
            return "50%"
        if n == "base":
            return _pct(1 - w["sft_vs_base"].win_rate)
        x = w[f"{n}_vs_sft"]
        return f"{_pct(x.win_rate)} [{_pct(x.ci95_low)}, {_pct(x.ci95_high)}]"

    def vs_base(n: str) -> str:
        return "50%" if n == "base" else _pct(w[f"{n}_vs_base"].win_rate) if f"{n}_vs_base" in w else ""

    def fmt(f: str, key: str) -> Callable[[PolicyResult], str]:
        return lambda x: f.format(getattr(x, key))

    def pct(key: str) -> Callable[[PolicyResult], str]:
        return lambda x: _pct(getattr(x, key))

    def pair(a: str, b: str) -> Callable[[PolicyResult], str]:
        return lambda x: f"{getattr(x, a):.2f} / {getattr(x, b):.2f}"

    return [
        ("oracle score (mean total)", *each(fmt("{:.3f}", "score"))),
        ("helpful / truthful", *each(pair("helpful", "truthful"))),
        ("harmless / concise", *each(pair("harmless", "concise"))),
        ("correct on answerable", *each(pct("accuracy"))),
        ("refuses harmful", *each(pct("refusal_rate"))),
        ('"I don\'t know" on unknowable', *each(pct("idk_rate"))),
        ("over-refusal on answerable", *each(pct("over_refusal"))),
        ("win rate vs SFT (ties split)", *(vs_sft(n) for n in names)),
        ("win rate vs base", *(vs_base(n) for n in names)),
        ("KL to SFT (nats / response)", *("0" if n == "sft" else f"{kl[n]:.2f}" if n in kl else "" for n in names)),
        ("held-out LM loss", *each(fmt("{:.3f}", "heldout_lm_loss"))),
    ]


def result_table(s: DemoSummary) -> str:
    """The markdown table of base / SFT / PPO (one column per round of the loop), with the reward model's line."""
    cols = policy_columns(s)
    rm = s.reward_model
    lines = ["| | " + " | ".join(t for _, t in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(s, [n for n, _ in cols])]
    lines.append("")
    lo, hi = rm.accuracy_informative_ci95
    lines.append(
        f"Reward model{_ensemble(s.config)}: held-out accuracy {_pct(rm.accuracy_informative)} [{_pct(lo)}, "
        f"{_pct(hi)}] on "
        f"{rm.pairs_informative} pairs the oracle does not tie, vs labeler agreement {_pct(rm.labeler_agreement)} on "
        f"the same sets ({_pct(rm.accuracy)} on all {rm.pairs} labelled pairs)."
    )
    for x in s.rounds:
        if x.gate is not None:
            lines.append(GateResult.from_json(x.gate).describe())
    for x in s.rounds[1:]:
        lab, rmx = x.labelers, x.reward_model
        first = (rmx.round1_heldout or {}).get("accuracy_informative")
        lines.append(
            f"Round {x.round}: labelers ranked {lab.answers} answers of the round-{x.round - 1} policy to "
            f"{lab.prompts} prompts (agreement {_pct(lab.agreement_sampled)}); the reward model, fine-tuned on them, "
            f"is right on {_pct(rmx.accuracy_informative)} of held-out pairs of those answers and {_pct(first)} of "
            "round 1's."
        )
    return "\n".join(lines)


def _labelers_line(s: DemoSummary) -> str:
    lab = s.labelers
    stock, per_prompt = lab.stock_answers, f"{lab.distinct_per_prompt:.1f} distinct answers per prompt"
    ranked = (
        f"the {lab.answers} answers ranked for {lab.prompts} prompts: the SFT policy's {per_prompt} plus its stock "
        f"answers ({'; '.join(json.dumps(a) for a in stock)}); on its own answers alone, "
        f"{_pct(lab.agreement_own_answers)}"
        if stock
        else f"{lab.answers} SFT answers to {lab.prompts} prompts ({per_prompt})"
    )
    if lab.off_topic_answers:
        ranked += f", {lab.off_topic_answers} of them its answers to other, alike prompts"
    return (
        f"Labelers (temperature recalibrated on the {'sets they rank' if stock else 'SFT samples'}: "
        f"T = {lab.temperature:.3f}) agree on {_pct(lab.agreement_sampled)} of pairs of {ranked}."
    )


def _probe_note(counts: dict[str, int] | None) -> str:
    """Which prompts the few-shot table is measured on (none recorded: the eval prompts, as runs before the probe)."""
    if not counts:
        return ""
    n = ", ".join(f"{v} with {k}" for k, v in counts.items())
    return f"On a probe of few-shot prompts held out from every split ({n} examples), not the eval prompts. "


def _fewshot(p: PolicyResult, k: str) -> str:
    return _pct(p.fewshot_accuracy[k])


def _ensemble(cfg: dict[str, Any]) -> str:
    """What the reward-model line says of how the reward models' scores are read: with --rm.rm-ensemble N > 1 (their
    mean, and PPO's aggregate) and with --rm.likelihood-head (the head over them and the SFT policy's likelihood); ''
    for one plain model."""
    n = cfg["rm"].get("rm_ensemble", STAGES["rm"].rm_ensemble)
    head = cfg["rm"].get("likelihood_head", STAGES["rm"].likelihood_head)
    read = "a head over their mean score and the SFT policy's likelihood of the answer" if head else "their mean"
    if n <= 1:
        return " (read by a head with the SFT policy's likelihood of the answer)" if head else ""
    ppo, defaults = cfg["ppo"], STAGES["ppo"]
    agg = ppo.get("reward_ensemble_agg", defaults.reward_ensemble_agg)
    lam = ppo.get("reward_ensemble_lambda", defaults.reward_ensemble_lambda)
    if head:  # the aggregate's conservatism is applied outside the head (flywheel.train.likelihood.combine)
        less = {
            "mean": "",
            "mean-std": f" less {lam:g} std of theirs",
            "min": " less their mean's excess over their min",
        }
        return f" (an ensemble of {n}, scored by {read}; PPO optimises it{less[agg]})"
    if agg == "mean-std":
        agg = f"mean - {lam:g} std"
    return f" (an ensemble of {n}, scored by {read}; PPO optimises their {agg})"


def write_report(s: DemoSummary, out: Path) -> None:
    plots = write_plots(s, out)
    cfg, cols = s.config, policy_columns(s)
    lines = [
        "# flywheel demo",
        "",
        f"`{demo_command(cfg)}` (preset {cfg['preset']}): from {describe_model(cfg)}, {s.policies['sft'].n} "
        "held-out prompts judged "
        f"by the oracle; {s.timings_s['total']:.0f} s in all.",
        "",
        f"**{headline(s)}**",
        "",
        result_table(s),
        "",
        _labelers_line(s),
        "",
        "## Targets of the demo",
        "",
        "| target | measured | holds | what the policies did |",
        "|---|---|---|---|",
        *[f"| {t.target} | {t.value} | {'yes' if t.holds else '**no**'} | {t.note} |" for t in s.targets],
        "",
        "## Correct on answerable prompts, by task family",
        "",
        "| family | " + " | ".join(t for _, t in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
        *[
            f"| {f} | " + " | ".join(_pct(s.policies[n].accuracy_by_family.get(f)) for n, _ in cols) + " |"
            for f in s.policies["sft"].accuracy_by_family
        ],
        "",
        "## Few-shot accuracy by number of shots",
        "",
        _probe_note(s.policies["sft"].fewshot_prompts)
        + "The base also given the prompts as plain text, the way a base model is prompted (its answer is the first "
        "line it writes); every other column is the chat form.",
        "",
        "| shots | base, plain text | " + " | ".join(t for _, t in cols) + " |",
        "|---" * (len(cols) + 2) + "|",
        *[
            f"| {k} | {_pct((s.policies['base'].fewshot_plain_accuracy or {}).get(k))} | "
            + " | ".join(_fewshot(s.policies[n], k) for n, _ in cols)
            + " |"
            for k in s.policies["sft"].fewshot_accuracy
        ],
        "",
        "## Time per stage (s)",
        "",
        "Wall-clock seconds, and CPU seconds of the demo's process and of any it starts (all threads; about twice "
        "the wall time on 2 cores, less with OMP_WAIT_POLICY=PASSIVE): a busy machine stretches the first, not the "
        "second.",
        "",
        " · ".join(f"{k} {v:.0f}" for k, v in s.timings_s.items()),
        "",
    ]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    lines += [
        "Answers of every policy to every eval prompt: `eval_samples.jsonl`. Figures for scripts: "
        f"`summary.json`. The final policy: `{s.final_policy}`.",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))


def write_plots(s: DemoSummary, out: Path) -> list[Path]:
    """ppo_score_kl.png, rm_accuracy.png and fewshot.png; none (with a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install flywheel[plots]): no plots")
        return []
    paths = [out / "ppo_score_kl.png", out / "rm_accuracy.png", out / "fewshot.png"]
    for draw, path, size in zip(
        (_plot_ppo, _plot_rm, _plot_fewshot), paths, ((6.4, 4.0), (5.0, 4.0), (6.0, 4.0)), strict=True
    ):
        fig, ax = plt.subplots(figsize=size, dpi=100)
        draw(s, ax)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    return paths


def _plot_ppo(s: DemoSummary, ax1: Any) -> None:
    curve = s.ppo_curve
    steps = [r["step"] for r in curve]
    ax1.plot(steps, [r["score"] for r in curve], color="tab:blue", label="reward-model score")
    ax1.set_xlabel("PPO step")
    ax1.set_ylabel("RM score (normalised)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(steps, [r["kl"] for r in curve], color="tab:red", label="KL to SFT")
    ax2.set_ylabel("KL(policy || SFT), nats per response", color="tab:red")
    starts = [b["step"] for a, b in zip(curve[:-1], curve[1:], strict=True) if a.get("round") != b.get("round")]
    for step in starts:  # a new round: a new reward model, so its scores are on a new scale
        ax1.axvline(step - 0.5, color="gray", ls="--", lw=0.8)
    ax1.set_title("PPO: reward-model score and KL per step" + (" (dashed: next round)" if starts else ""))


def _plot_rm(s: DemoSummary, ax: Any) -> None:
    rm = s.reward_model
    lo, hi = rm.accuracy_informative_ci95
    acc = rm.accuracy_informative
    ax.bar(
        ["reward model", "labeler agreement"],
        [acc, rm.labeler_agreement],
        color=["tab:green", "tab:gray"],
        yerr=[[acc - lo, 0], [hi - acc, 0]],
        capsize=6,
    )
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out pairwise accuracy / agreement")
    ax.set_title("Reward model vs labelers\n(held-out pairs the oracle does not tie)", fontsize=10)


def _plot_fewshot(s: DemoSummary, ax: Any) -> None:
    for name, title in policy_columns(s):
        acc_by = s.policies[name].fewshot_accuracy
        xs = [int(k) for k, v in acc_by.items() if v is not None]
        ax.plot(xs, [acc_by[str(k)] for k in xs], marker="o", label=title)
    plain = s.policies["base"].fewshot_plain_accuracy or {}
    xs = [int(k) for k, v in plain.items() if v is not None]
    if xs:
        ax.plot(xs, [plain[str(k)] for k in xs], marker="o", linestyle="--", label="base, plain text")
    ax.set_xlabel("examples in the prompt (shots)")
    ax.set_ylabel("accuracy (oracle)")
    ax.set_ylim(0, 1)
    ax.set_title("Few-shot accuracy vs number of shots")
    ax.legend()

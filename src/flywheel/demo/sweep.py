"""`flywheel sweep`: `flywheel demo` on several seeds, each run once, and the mean ± sd of its headline figures.

    flywheel sweep --seeds 100-104 --out runs/sweep                       # the preset the CPU gets
    flywheel sweep --seeds 100-104 --out runs/sweep-nogate -- --gate-every 0 --rm.rm-ensemble 1
    flywheel sweep --seeds 100-104 --out runs/sweep                       # again: finished seeds are kept

Every flag after `--` is a `flywheel demo` flag, the same for every seed (never `--seed` or `--out`). Seed S runs
into --out/seed<S>/; a seed whose run finished with the same settings is kept, an interrupted one resumes, one with
other settings is refused. Writes sweep.md (one row of the ablation tables in docs/demo.md, then a row per seed) and
sweep.json (the row's figures) under --out, and prints the table. What each column means: docs/demo.md, "How to read
the report"; "lowest" is the lowest seed's win rate, "≥ SFT" counts the seeds where PPO's rate is at least SFT's.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from flywheel.errors import UserError
from flywheel.eval.policy import mean_and_spread

# column -> the policy's rate in summary.json (a PolicyResult key, or (key, family)); the sweep shows SFT's and PPO's
_RATES = {
    "over-refusal": "over_refusal",
    "correct on answerable": "accuracy",
    "facts correct": ("accuracy_by_family", "fact"),
    "few-shot correct": ("accuracy_by_family", "fewshot"),
    "refuses harmful": "refusal_rate",
    '"I don\'t know" on unknowable': "idk_rate",
}


def parse_seeds(text: str) -> list[int]:
    """ "100-104" or "1,5,9" (or both: "1,3-5") -> the seeds, in order, each once."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise UserError(f"--seeds: expected seeds like 100-104 or 1,5,9, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: expected distinct seeds, got {text!r}")
    return seeds


def _rate(policy: dict[str, Any], key: str | tuple[str, str]) -> float:
    value = policy[key[0]].get(key[1]) if isinstance(key, tuple) else policy.get(key)
    return math.nan if value is None else float(value)


def seed_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run's summary.json that the sweep averages (rates in %)."""
    sft, ppo = summary["policies"]["sft"], summary["policies"]["ppo"]
    rm = summary["reward_model"]
    out: dict[str, Any] = {
        "seed": summary["config"]["seed"],
        "win rate vs SFT": 100 * summary["win_rates"]["ppo_vs_sft"]["win_rate"],
        "KL": summary["kl_ppo_sft"]["kl"],
        "RM accuracy": 100 * rm["accuracy_informative"],
        "labeler agreement": 100 * rm["labeler_agreement"],
        "targets": sum(t["holds"] for t in summary["targets"]),
        "of targets": len(summary["targets"]),
        "deflection warning": bool(summary["deflection_warnings"]),
        "seconds": summary["timings_s"]["total"],
    }
    for column, key in _RATES.items():
        out[column] = (100 * _rate(sft, key), 100 * _rate(ppo, key))
    return out


def _mean_sd(values: list[float], digits: int = 1) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    mean, sd = mean_and_spread(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _mean(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    return f"{sum(values) / len(values):.1f}" if values else "—"


HEADER = [
    "PPO vs SFT %",
    "lowest",
    "PPO > SFT",
    "over-refusal SFT → PPO %",
    "correct SFT → PPO %",
    "facts SFT → PPO %",
    "few-shot SFT → PPO %",
    "refuses harmful SFT → PPO %",
    "harmful ≥ SFT",
    "IDK on unknowable SFT → PPO %",
    "KL",
    "RM % vs labelers %",
    "targets",
    "time s",
]


def sweep_row(figures: list[dict[str, Any]]) -> list[str]:
    """One table row (the columns of HEADER) over the seeds' figures."""
    n = len(figures)
    wins = [f["win rate vs SFT"] for f in figures]

    def pair(column: str) -> str:
        return f"{_mean([f[column][0] for f in figures])} → {_mean_sd([f[column][1] for f in figures])}"

    return [
        _mean_sd(wins),
        f"{min(wins):.1f}",
        f"{sum(w > 50 for w in wins)} of {n}",
        pair("over-refusal"),
        pair("correct on answerable"),
        pair("facts correct"),
        pair("few-shot correct"),
        pair("refuses harmful"),
        f"{sum(f['refuses harmful'][1] >= f['refuses harmful'][0] for f in figures)} of {n}",
        pair('"I don\'t know" on unknowable'),
        _mean_sd([f["KL"] for f in figures], 2),
        f"{_mean([f['RM accuracy'] for f in figures])} vs {_mean([f['labeler agreement'] for f in figures])}",
        f"{_mean_sd([f['targets'] for f in figures])} of {figures[0]['of targets']}",
        _mean_sd([f["seconds"] for f in figures], 0),
    ]


def _seed_row(f: dict[str, Any]) -> list[str]:
    def pair(column: str) -> str:
        sft, ppo = f[column]
        return "—" if math.isnan(ppo) else f"{sft:.1f} → {ppo:.1f}"

    return [
        f"{f['win rate vs SFT']:.1f}" + (" (deflection warning)" if f["deflection warning"] else ""),
        "",
        "",
        pair("over-refusal"),
        pair("correct on answerable"),
        pair("facts correct"),
        pair("few-shot correct"),
        pair("refuses harmful"),
        "",
        pair('"I don\'t know" on unknowable'),
        f"{f['KL']:.2f}",
        f"{f['RM accuracy']:.1f} vs {f['labeler agreement']:.1f}",
        f"{f['targets']} of {f['of targets']}",
        f"{f['seconds']:.0f}",
    ]


def sweep_table(label: str, figures: list[dict[str, Any]]) -> str:
    """Markdown: the mean ± sd row (labelled `label`), then one row per seed."""
    lines = ["| runs | " + " | ".join(HEADER) + " |", "|---" * (len(HEADER) + 1) + "|"]
    lines.append(
        f"| {label} (seeds {', '.join(str(f['seed']) for f in figures)}) | " + " | ".join(sweep_row(figures)) + " |"
    )
    lines += [f"| seed {f['seed']} | " + " | ".join(_seed_row(f)) + " |" for f in figures]
    return "\n".join(lines) + "\n"


def run_seed(demo_args: list[str], seed: int, out: Path) -> dict[str, Any]:
    """Seed `seed`'s finished run under `out` (kept if its settings match, resumed if interrupted, else run)."""
    from flywheel.demo.config import parse_demo_config
    from flywheel.demo.pipeline import run_demo
    from flywheel.demo.state import RunState

    args = [*demo_args, "--seed", str(seed), "--out", str(out)]
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        changed = RunState.changed_settings(parse_demo_config(args).resolved(), summary["config"])
        if changed:
            raise UserError(f"{out} holds a run with other settings ({'; '.join(changed)}): use another --out")
        return summary
    if (out / "demo_state.json").is_file():
        args.append("--resume")
    run_demo(parse_demo_config(args))
    return json.loads(summary_path.read_text())


def _label(config: dict[str, Any]) -> str:
    """A run's settings as its demo command gives them, less the seed ("--preset fp32 --gate-every 0"), or "the
    preset"."""
    from flywheel.demo.config import demo_command

    flags = demo_command(config, seed=False).removeprefix("flywheel demo").strip()
    return f"`{flags}`" if flags else "the preset"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flywheel sweep",
        description=__doc__.splitlines()[0],
        usage="flywheel sweep --seeds 100-104 --out DIR [--label TEXT] [-- FLYWHEEL DEMO FLAGS]",
    )
    parser.add_argument("--seeds", required=True, help="seeds: 100-104, or 1,5,9")
    parser.add_argument("--out", required=True, help="directory: seed<S>/ per run, sweep.md, sweep.json")
    parser.add_argument("--label", default="", help="the row's label (default: the demo flags, or 'preset')")
    argv = list(argv or [])
    demo_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    for flag in ("--seed", "--out", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in demo_args):
            raise UserError(f"{flag} is set by flywheel sweep for each seed: leave it out of the demo flags")
    seeds = parse_seeds(args.seeds)
    out = Path(args.out)
    summaries = [run_seed(demo_args, seed, out / f"seed{seed}") for seed in seeds]
    figures = [seed_figures(s) for s in summaries]
    label = args.label or _label(summaries[0]["config"])
    table = sweep_table(label, figures)
    from flywheel.utils import atomic_write_text

    atomic_write_text(out / "sweep.md", table)
    atomic_write_text(
        out / "sweep.json", json.dumps({"label": label, "demo_args": demo_args, "seeds": figures}, indent=2) + "\n"
    )
    print(table)
    return 0

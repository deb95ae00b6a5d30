"""`flywheel sweep`: `flywheel demo` on several seeds, each run once, and the mean ± sd of its headline figures.

    flywheel sweep --seeds 100-104 --out runs/sweep                       # the preset the CPU gets
    flywheel sweep --seeds 100-104 --out runs/sweep-nogate -- --gate-every 0 --rm.rm-ensemble 1
    flywheel sweep --seeds 100-104 --out runs/sweep                       # again: finished seeds are kept
    flywheel sweep --seeds 100-104 --out runs/sweep-kl --reuse-from runs/sweep -- --ppo.kl-coef 0.2

Every flag after `--` is a `flywheel demo` flag, the same for every seed (never `--seed` or `--out`). Seed S runs
into --out/seed<S>/; a seed whose run finished with the same settings is kept, an interrupted one resumes, one with
other settings is refused. With --reuse-from, a new run starts from the finished stages of the earlier sweep's run
of its seed that its settings leave unchanged (copied, with their recorded times: a row that changes only PPO
settings runs PPO, the gate and the evaluation). Writes sweep.md (one row of the ablation tables in docs/demo.md,
then a row per seed) and sweep.json (the row's figures) under --out, and prints the table. What each column means:
docs/demo.md, "How to read the report"; "lowest" is the lowest seed's win rate, "≥ SFT" counts the seeds where
PPO's rate is at least SFT's.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import UserError
from flywheel.eval.policy import mean_and_spread


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
    for column in COLUMNS:
        if column.rate:
            name, key = column.rate
            out[name] = (100 * _rate(sft, key), 100 * _rate(ppo, key))
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


Figures = dict[str, Any]  # one seed's, from seed_figures


@dataclass(frozen=True)
class Column:
    """One column of the sweep's table: its header, its cell in the mean row (over the seeds' figures) and in a
    seed's row; a rate column also names the figure and the policy's rate in summary.json that it shows."""

    header: str
    mean: Callable[[list[Figures]], str]
    seed: Callable[[Figures], str] = lambda f: ""
    rate: tuple[str, str | tuple[str, str]] | None = None  # (figure, PolicyResult key or (key, family))


def _rate_column(header: str, name: str, key: str | tuple[str, str]) -> Column:
    """SFT's rate → PPO's: the mean of SFT's, then PPO's mean ± sd."""

    def seed(f: Figures) -> str:
        sft, ppo = f[name]
        return "—" if math.isnan(ppo) else f"{sft:.1f} → {ppo:.1f}"

    def mean(fs: list[Figures]) -> str:
        return f"{_mean([f[name][0] for f in fs])} → {_mean_sd([f[name][1] for f in fs])}"

    return Column(header, mean, seed, rate=(name, key))


def _wins(fs: list[Figures]) -> list[float]:
    return [f["win rate vs SFT"] for f in fs]


def _count(fs: list[Figures], holds: Callable[[Figures], bool]) -> str:
    return f"{sum(map(holds, fs))} of {len(fs)}"


COLUMNS = [
    Column(
        "PPO vs SFT %",
        lambda fs: _mean_sd(_wins(fs)),
        lambda f: f"{f['win rate vs SFT']:.1f}" + (" (deflection warning)" if f["deflection warning"] else ""),
    ),
    Column("lowest", lambda fs: f"{min(_wins(fs)):.1f}"),
    Column("PPO > SFT", lambda fs: _count(fs, lambda f: f["win rate vs SFT"] > 50)),
    _rate_column("over-refusal SFT → PPO %", "over-refusal", "over_refusal"),
    _rate_column("correct SFT → PPO %", "correct on answerable", "accuracy"),
    _rate_column("facts SFT → PPO %", "facts correct", ("accuracy_by_family", "fact")),
    _rate_column("few-shot SFT → PPO %", "few-shot correct", ("accuracy_by_family", "fewshot")),
    _rate_column("refuses harmful SFT → PPO %", "refuses harmful", "refusal_rate"),
    Column("harmful ≥ SFT", lambda fs: _count(fs, lambda f: f["refuses harmful"][1] >= f["refuses harmful"][0])),
    _rate_column("IDK on unknowable SFT → PPO %", '"I don\'t know" on unknowable', "idk_rate"),
    Column("KL", lambda fs: _mean_sd([f["KL"] for f in fs], 2), lambda f: f"{f['KL']:.2f}"),
    Column(
        "RM % vs labelers %",
        lambda fs: f"{_mean([f['RM accuracy'] for f in fs])} vs {_mean([f['labeler agreement'] for f in fs])}",
        lambda f: f"{f['RM accuracy']:.1f} vs {f['labeler agreement']:.1f}",
    ),
    Column(
        "targets",
        lambda fs: f"{_mean_sd([f['targets'] for f in fs])} of {fs[0]['of targets']}",
        lambda f: f"{f['targets']} of {f['of targets']}",
    ),
    Column("time s", lambda fs: _mean_sd([f["seconds"] for f in fs], 0), lambda f: f"{f['seconds']:.0f}"),
]
HEADER = [c.header for c in COLUMNS]


def sweep_row(figures: list[Figures]) -> list[str]:
    """One table row (the columns of HEADER) over the seeds' figures."""
    return [c.mean(figures) for c in COLUMNS]


def sweep_table(label: str, figures: list[Figures]) -> str:
    """Markdown: the mean ± sd row (labelled `label`), then one row per seed."""
    lines = ["| runs | " + " | ".join(HEADER) + " |", "|---" * (len(HEADER) + 1) + "|"]
    lines.append(
        f"| {label} (seeds {', '.join(str(f['seed']) for f in figures)}) | " + " | ".join(sweep_row(figures)) + " |"
    )
    lines += [f"| seed {f['seed']} | " + " | ".join(c.seed(f) for c in COLUMNS) + " |" for f in figures]
    return "\n".join(lines) + "\n"


def run_seed(demo_args: list[str], seed: int, out: Path, reuse_from: Path | None = None) -> dict[str, Any]:
    """Seed `seed`'s finished run under `out` (kept if its settings match, resumed if interrupted, else run; a new
    run starts from the stages of `reuse_from`'s run that its settings leave unchanged)."""
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
    if not (out / "demo_state.json").is_file() and reuse_from is not None:
        RunState.reuse(reuse_from, out, parse_demo_config(args).resolved())
    if (out / "demo_state.json").is_file():
        args.append("--resume")
    run_demo(parse_demo_config(args))
    return json.loads(summary_path.read_text())


def reuse_source(reuse_from: str, out: Path, seeds: list[int]) -> Path | None:
    """--reuse-from's directory (None where not given), checked before anything runs: not this run's --out, and
    holding a demo run (`seed<S>/demo_state.json`) for every seed."""
    from flywheel.demo.state import RunState

    if not reuse_from:
        return None
    src = Path(reuse_from)
    if src.resolve() == out.resolve():
        raise UserError("--reuse-from: give the earlier sweep's directory, not this one's --out")
    missing = [f"seed{s}" for s in seeds if not (src / f"seed{s}" / RunState.FILE).is_file()]
    if missing:
        raise UserError(f"--reuse-from: {src} holds no demo run for {', '.join(missing)} (no {RunState.FILE})")
    return src


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
    parser.add_argument(
        "--reuse-from",
        default="",
        help="an earlier sweep's --out: each new run starts from the finished stages of that sweep's run of its seed "
        "that the demo flags leave unchanged (e.g. SFT, rankings and reward models when only --ppo.* flags differ)",
    )
    argv = list(argv or [])
    demo_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    for flag in ("--seed", "--out", "--resume"):
        if any(a == flag or a.startswith(flag + "=") for a in demo_args):
            raise UserError(f"{flag} is set by flywheel sweep for each seed: leave it out of the demo flags")
    seeds = parse_seeds(args.seeds)
    out = Path(args.out)
    reuse = reuse_source(args.reuse_from, out, seeds)
    summaries = [run_seed(demo_args, seed, out / f"seed{seed}", reuse and reuse / f"seed{seed}") for seed in seeds]
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

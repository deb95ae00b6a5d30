"""`flywheel compare`: which policy-optimisation method wins, at what KL and what cost, judged by the hidden oracle.

    flywheel compare --quick --seeds 0,1,2 --methods ppo,grpo,dpo --out runs/compare
    flywheel compare --seeds 0,1,2                          # every method, the preset the CPU gets (as flywheel demo)
    flywheel compare --seeds 100-104 --reuse-from runs/sweep  # the SFT models and reward models of a sweep's runs

For each seed, the demo's shared stages run once (toy world, the base model: shipped or pretrained, SFT, the
labelers' rankings of SFT's answers, the reward model: `flywheel demo`'s settings and `--STAGE.FIELD` overrides all
apply), then every method starts from that SFT model with that reward model or those rankings, on a comparable
budget:

- ppo: the demo's PPO run (the preset's steps, prompts per step, epochs, KL and pretraining-mix settings);
- grpo, rloo: the same run with K = --num-generations samples per prompt and 1/K as many prompts per step (the same
  responses per step), group-relative advantages, no critic; reinforce++: one sample per prompt, batch-normalised;
- dpo: DPO on the labelers' rankings the reward model learned from (--dpo-epochs, --dpo-beta, --dpo-lr);
- best-of-n: no training; SFT samples K answers per prompt and the reward model keeps the best (at evaluation);
- expert-iteration: SFT samples K answers per PPO prompt, the reward model's best are fine-tuned on (one pass).

Each policy answers the held-out eval prompts (greedy, as in the demo) and the oracle judges: win rate against SFT
with its 95% interval, oracle score and its axes, correct answers on answerable prompts, over-refusal, refusals of
harmful requests, "I don't know" on unknowable ones, KL to SFT (sampled; best-of-n's is the analytic bound
log K - (K-1)/K), and the method's wall seconds. Writes compare.md (mean +- sd over the seeds), compare.json and
compare.png (win rate against KL) under --out; each seed's run is in --out/seed<S>/ (resumable with --resume).
With --reuse-from DIR, each seed starts from DIR/seed<S>/'s world, SFT model, rankings and reward model (a `flywheel
sweep` or compare run of that seed whose flags leave them unchanged; their files are copied), so the methods are
compared on exactly the models the demo's runs trained, and a comparison costs only the methods' training.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flywheel.demo.config import DemoConfig, parse_demo_config
from flywheel.demo.pipeline import first_round_data
from flywheel.demo.rankings import Rankings
from flywheel.demo.stages import DemoRun, RewardModelResult, read_metrics, stage_ppo, start_run
from flywheel.demo.state import RunState, Stage
from flywheel.demo.sweep import parse_seeds, reuse_source
from flywheel.errors import UserError
from flywheel.eval.policy import (
    AXES,
    PolicyEval,
    compare,
    evaluate_policy,
    kl_to_reference,
    mean_and_spread,
    prompt_ids_for,
    rates,
)
from flywheel.utils import atomic_write_text, log, seed_everything, set_threads

METHODS = ("ppo", "grpo", "rloo", "reinforce++", "dpo", "best-of-n", "expert-iteration")
RL_ESTIMATORS = {"grpo": "grpo", "rloo": "rloo", "reinforce++": "reinforce++"}


@dataclass
class CompareSettings:
    """compare's own settings; everything else is `flywheel demo`'s (the preset, --seed aside, --STAGE.FIELD)."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    num_generations: int = 4  # K: samples per prompt of grpo, rloo, best-of-n and expert iteration
    dpo_beta: float = 0.1
    dpo_epochs: float = 1.0
    dpo_lr: float = 2e-5
    reuse_from: str = ""  # an earlier flywheel sweep's or compare's --out: its seed<S>/ runs give SFT and the RM

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise UserError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
                            f"{', '.join(METHODS)}")  # fmt: skip
        if len(set(self.methods)) != len(self.methods):
            raise UserError("--methods names a method twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError("--seeds: give one or more distinct integers, e.g. 0,1,2")
        if self.num_generations < 2:
            raise UserError("--num-generations must be >= 2 (group methods compare K samples of a prompt)")
        if self.dpo_beta <= 0 or self.dpo_epochs <= 0 or self.dpo_lr <= 0:
            raise UserError("--dpo-beta, --dpo-epochs and --dpo-lr must be > 0")


@dataclass
class MethodResult:
    """One method on one seed, as judged by the oracle (the fields of `flywheel.eval.policy.rates`)."""

    method: str
    seed: int
    win_rate: float  # vs SFT, ties split
    ci95_low: float
    ci95_high: float
    score: float
    axes: dict[str, float]
    accuracy: float | None
    over_refusal: float | None
    refusal_rate: float | None
    idk_rate: float | None
    kl: float | None
    seconds: float


def parse_compare_args(argv: list[str] | None) -> tuple[CompareSettings, DemoConfig]:
    parser = argparse.ArgumentParser(
        prog="flywheel compare",
        description=__doc__.splitlines()[0],
        usage="flywheel compare [--methods M,M] [--seeds S,S|S-S] [flywheel demo's flags]",
        epilog="Every other flag is flywheel demo's (see flywheel demo --help): --quick, --preset, --out, --resume, "
        "--STAGE.FIELD ...",
        allow_abbrev=False,  # --seed must not pass for --seeds
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)} (default: all)"
    )
    parser.add_argument(
        "--seeds", default="0", help="seeds, as 0,1,2 or 100-104: each runs every stage and method (default: 0)"
    )
    parser.add_argument(
        "--num-generations", type=int, default=4, help="K samples per prompt (group methods, n; default: 4)"
    )
    parser.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta (default: 0.1)")
    parser.add_argument(
        "--dpo-epochs", type=float, default=1.0, help="DPO's passes over the labelers' rankings (default: 1)"
    )
    parser.add_argument("--dpo-lr", type=float, default=2e-5, help="DPO's peak learning rate (default: 2e-5)")
    parser.add_argument(
        "--reuse-from",
        default="",
        help="an earlier flywheel sweep's (or compare's) --out: each seed starts from the world, SFT, rankings and "
        "reward model of that directory's seed<S>/ run where the demo flags leave them unchanged",
    )
    own, rest = parser.parse_known_args(argv)
    if "--seed" in rest:
        raise UserError("flywheel compare takes --seeds (0,1,2 or 100-104), not --seed")
    seeds = parse_seeds(own.seeds)  # as flywheel sweep's
    if not any(a == "--out" or a.startswith("--out=") for a in rest):
        rest += ["--out", "runs/compare"]
    settings = CompareSettings(
        methods=[m.strip() for m in own.methods.split(",") if m.strip()],
        seeds=seeds,
        num_generations=own.num_generations,
        dpo_beta=own.dpo_beta,
        dpo_epochs=own.dpo_epochs,
        dpo_lr=own.dpo_lr,
        reuse_from=own.reuse_from,
    )
    settings.validate()
    demo = parse_demo_config(rest, "flywheel compare")
    if demo.gate_every or (demo.rounds or 1) > 1:
        raise UserError("flywheel compare runs one round without the gate: leave --rounds and --gate-every unset")
    demo.resolved()  # every stage's settings checked before the first stage runs
    reuse_source(settings.reuse_from, Path(demo.out), seeds)  # checked before anything runs
    return settings, demo


def run_seed(settings: CompareSettings, demo: DemoConfig, seed: int) -> list[MethodResult]:
    """The shared stages and every method on one seed; each method's result (also in seed<S>/compare.json)."""
    out = Path(demo.out) / f"seed{seed}"
    cfg = replace(demo, seed=seed, out=str(out), rounds=1).resolved()
    set_threads(cfg.threads or None)
    seed_everything(seed)
    if settings.reuse_from and not (out / RunState.FILE).is_file():
        # The shared stages of the earlier run of this seed (the methods start after the reward model).
        if RunState.reuse(Path(settings.reuse_from) / f"seed{seed}", out, cfg, before="ppo:1"):
            cfg = replace(cfg, resume=True)
        else:
            log.warning(
                "--reuse-from: seed %d's run there has other settings from its first stage: every stage runs", seed
            )
    done = RunState.open(out, cfg)
    check_method_settings(out, settings)
    timings: dict[str, float] = {}
    run = start_run(cfg, out, timings)
    _, sft, labels, rm = first_round_data(done, run)
    policies: dict[str, Path] = {}
    for method in settings.methods:
        if method == "best-of-n":
            continue
        train = partial(TRAINERS[method], run, settings, sft, rm, labels)
        policies[method] = done.stage(f"method:{method}", timings, train)
    results = evaluate_methods(run, settings, sft, rm, policies, timings)
    atomic_write_text(out / "compare.json", json.dumps([r.__dict__ for r in results], indent=1) + "\n")
    return results


METHOD_SETTINGS = ("num_generations", "dpo_beta", "dpo_epochs", "dpo_lr")  # compare's own, which the methods read
SETTINGS_FILE = "compare_settings.json"


def check_method_settings(out: Path, settings: CompareSettings) -> None:
    """Record compare's own method settings in the seed's run; a run resumed with others is refused (the methods it
    kept were trained with the recorded ones), each named."""
    own = {name: getattr(settings, name) for name in METHOD_SETTINGS}
    path = out / SETTINGS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = [
            f"--{name.replace('_', '-')} {own[name]} (the run's: {saved[name]})"
            for name in METHOD_SETTINGS
            if name in saved and saved[name] != own[name]
        ]
        if changed:
            raise UserError(
                f"{out}: settings differ from the run's: {', '.join(changed)}: resume with the run's own settings, "
                "or choose another --out"
            )
    atomic_write_text(path, json.dumps(own, indent=1) + "\n")


def train_ppo(run: DemoRun, settings: CompareSettings, sft: Path, rm: RewardModelResult, labels: Rankings) -> Path:
    with Stage(run.timings, "method ppo"):
        return stage_ppo(run, sft, sft, rm)


def train_rl(
    run: DemoRun, settings: CompareSettings, sft: Path, rm: RewardModelResult, labels: Rankings, method: str
) -> Path:
    from flywheel.train.ppo.rl import RLConfig, unused_settings
    from flywheel.train.ppo.rl import train_rl as rl

    with Stage(run.timings, f"method {method}") as st:
        ppo = run.cfg.stage_config(
            "ppo",
            out=str(run.out / method),
            model=str(sft),
            ref_model=str(sft),
            reward_model=str(rm.dir),
            prompts=str(run.files["ppo_prompts"]),
            ptx_data=str(run.ptx_corpus()),
        )
        k = 1 if method == "reinforce++" else settings.num_generations
        if ppo.rollout_batch_size % k:
            raise UserError(f"--ppo.rollout-batch-size ({ppo.rollout_batch_size}) must be a multiple of K = {k}")
        values = {**ppo.__dict__, "estimator": RL_ESTIMATORS[method], "num_generations": k}
        values["rollout_batch_size"] = ppo.rollout_batch_size // k  # the same responses per step as PPO
        cfg = RLConfig(**values)
        for name in unused_settings(cfg):  # the preset's critic settings, which this estimator has no use for
            setattr(cfg, name, getattr(RLConfig, name))
        cfg.validate()
        done = rl(cfg)
        steps = [x for x in read_metrics(done / "metrics.jsonl") if "score" in x]
        st.done("%d steps: RM score %.2f -> %.2f, KL %.2f nats", len(steps), steps[0]["score"], steps[-1]["score"],
                steps[-1]["kl"])  # fmt: skip
        return done / "final"


def train_dpo(run: DemoRun, settings: CompareSettings, sft: Path, rm: RewardModelResult, labels: Rankings) -> Path:
    from flywheel.train.dpo import DPOConfig
    from flywheel.train.dpo import train_dpo as dpo

    with Stage(run.timings, "method dpo") as st:
        c = run.cfg
        cfg = DPOConfig(
            out=str(run.out / "dpo"),
            model=str(sft),
            data=str(labels.train),
            eval_data=str(labels.heldout_file),
            beta=settings.dpo_beta,
            epochs=settings.dpo_epochs,
            lr=settings.dpo_lr,
            seed=c.seed,
            bf16=c.bf16,
            threads=c.threads,
            progress=c.progress,
        )
        cfg.validate()
        done = dpo(cfg)
        rows = read_metrics(done / "metrics.jsonl")
        losses, held = [x["loss"] for x in rows if "loss" in x], [x for x in rows if "eval_rewards/accuracy" in x]
        st.done("loss %.3f -> %.3f; held-out pairs ordered right %.1f%%", losses[0], losses[-1],
                100 * held[-1]["eval_rewards/accuracy"] if held else float("nan"))  # fmt: skip
        return done / "final"


def train_expert_iteration(
    run: DemoRun, settings: CompareSettings, sft: Path, rm: RewardModelResult, labels: Rankings
) -> Path:
    from flywheel.sample import SampleConfig, sample_best_of
    from flywheel.train.sft import train_sft

    with Stage(run.timings, "method expert-iteration") as st:
        c = run.cfg
        where = run.out / "expert-iteration"
        best = sample_best_of(
            SampleConfig(
                model=str(sft),
                prompts=str(run.files["ppo_prompts"]),
                out=str(where / "best.jsonl"),
                best_of=settings.num_generations,
                reward_model=str(rm.dir),
                max_new_tokens=c.max_new_tokens,
                temperature=1.0,
                seed=c.seed,
                bf16=c.bf16,
            )
        )
        data = where / "best.jsonl"
        kept = [
            r for r in best if r["response"].strip()
        ]  # an empty answer (the end-of-turn token first) teaches nothing
        atomic_write_text(data, "".join(json.dumps({"messages": r["messages"]}) + "\n" for r in kept))
        scfg = c.stage_config("sft", out=str(where / "sft"), model=str(sft), data=str(data), epochs=1.0)
        done = train_sft(scfg)
        st.done("SFT on the best of %d answers to %d prompts (%d empty left out)", settings.num_generations,
                len(kept), len(best) - len(kept))  # fmt: skip
        return done / "final"


TRAINERS: dict[str, Any] = {
    "ppo": train_ppo,
    **{m: partial(train_rl, method=m) for m in RL_ESTIMATORS},
    "dpo": train_dpo,
    "expert-iteration": train_expert_iteration,
}


def best_of_n_eval(run: DemoRun, sft_model: Any, tok: Any, rm_dir: Path, tasks: list, k: int) -> PolicyEval:
    """Best-of-K at inference: K samples of SFT per eval prompt, the reward model's favourite judged by the oracle."""
    from flywheel.engine import Engine, SamplingParams
    from flywheel.train.reward import RewardModel
    from flywheel.world import score

    c = run.cfg
    rm = RewardModel.from_pretrained(rm_dir, bf16=c.bf16)
    engine = Engine(sft_model.eval(), tok, dtype="bfloat16" if c.bf16 else None)
    ids = prompt_ids_for(tok, tasks)
    texts: list[str] = []
    for start in range(0, len(ids), 16):
        chunk = ids[start : start + 16]
        params = SamplingParams(max_new_tokens=c.max_new_tokens, temperature=1.0, seed=c.seed + start)
        gen = engine.generate(chunk, params, samples_per_prompt=k)
        scores = rm.score_ids([p for p in chunk for _ in range(k)], gen.tokens).view(-1, k)
        for i, j in enumerate(scores.argmax(dim=1).tolist()):
            texts.append(tok.decode(gen.tokens[i * k + j], skip_special_tokens=True).strip())
    judged = [score(t, r) for t, r in zip(tasks, texts, strict=True)]
    return PolicyEval("best-of-n", texts, judged, rates(tasks, judged))


def evaluate_methods(
    run: DemoRun,
    settings: CompareSettings,
    sft: Path,
    rm: RewardModelResult,
    policies: dict[str, Path],
    timings: dict[str, float],
) -> list[MethodResult]:
    from flywheel.models import load_causal_lm
    from flywheel.tokenization import load_tokenizer
    from flywheel.world import load_tasks

    c = run.cfg
    tasks = load_tasks(run.files["eval_tasks"])
    tok = load_tokenizer(str(sft))
    ids = prompt_ids_for(tok, tasks)
    sft_model = load_causal_lm(str(sft))
    judge = partial(evaluate_policy, tokenizer=tok, tasks=tasks, max_new_tokens=c.max_new_tokens,
                    temperature=c.eval_temperature, seed=c.seed, bf16=c.bf16)  # fmt: skip
    log.info("== evaluate: SFT and %s on %d held-out prompts", ", ".join(settings.methods), len(tasks))
    base = judge(sft_model, name="sft")
    results = [result("sft", c.seed, base, base, 0.0, timings.get("sft", 0.0))]
    for method in tqdm(settings.methods, desc="evaluate", disable=not c.progress, dynamic_ncols=True):
        if method == "best-of-n":
            t0 = time.perf_counter()
            k = settings.num_generations
            ev = best_of_n_eval(run, sft_model, tok, rm.dir, tasks, k)
            kl = math.log(k) - (k - 1) / k  # KL(best-of-K || SFT) <= this (Stiennon et al. 2020)
            results.append(result(method, c.seed, ev, base, kl, time.perf_counter() - t0))
            continue
        model = load_causal_lm(str(policies[method]))
        ev = judge(model, name=method)
        kl = kl_to_reference(model, sft_model, tok, ids, max_new_tokens=c.max_new_tokens, seed=c.seed, bf16=c.bf16)
        results.append(result(method, c.seed, ev, base, kl["kl"], timings.get(f"method {method}", 0.0)))
    return results


def result(method: str, seed: int, ev: PolicyEval, sft: PolicyEval, kl: float, seconds: float) -> MethodResult:
    s = ev.summary
    w = compare(ev, sft)
    return MethodResult(
        method=method,
        seed=seed,
        win_rate=w["win_rate"],
        ci95_low=w["ci95_low"],
        ci95_high=w["ci95_high"],
        score=s["score"],
        axes={a: s[a] for a in AXES},
        accuracy=s["accuracy"],
        over_refusal=s["over_refusal"],
        refusal_rate=s["refusal_rate"],
        idk_rate=s["idk_rate"],
        kl=kl,
        seconds=round(seconds, 1),
    )


COLUMNS = [  # (heading, MethodResult field, scale)
    ("win vs SFT %", "win_rate", 100),
    ("oracle score", "score", 1),
    ("correct %", "accuracy", 100),
    ("over-refusal %", "over_refusal", 100),
    ("refuses harmful %", "refusal_rate", 100),
    ("IDK unknowable %", "idk_rate", 100),
    ("KL nats", "kl", 1),
    ("seconds", "seconds", 1),
]


def aggregate(results: list[MethodResult]) -> dict[str, dict[str, tuple[float, float] | None]]:
    """method -> column -> (mean, sd over seeds), None where a seed has no value (e.g. no unknowable prompts)."""
    table: dict[str, dict[str, tuple[float, float] | None]] = {}
    for method in dict.fromkeys(r.method for r in results):
        rows = [r for r in results if r.method == method]
        cells: dict[str, tuple[float, float] | None] = {}
        for key in [k for _, k, _ in COLUMNS] + [f"axes.{a}" for a in AXES]:
            values = [r.axes[key[5:]] if key.startswith("axes.") else getattr(r, key) for r in rows]
            cells[key] = None if any(v is None for v in values) else mean_and_spread(values)
        table[method] = cells
    return table


def markdown(results: list[MethodResult], settings: CompareSettings, cfg: DemoConfig) -> str:
    table = aggregate(results)
    seeds = sorted({r.seed for r in results})
    head = ["method"] + [name for name, _, _ in COLUMNS]
    lines = [
        f"# flywheel compare: preset {cfg.preset}, seeds {', '.join(map(str, seeds))}, K = {settings.num_generations}",
        "",
        "Every method starts from the same SFT model with the same reward model / labelers' rankings per seed; the "
        "oracle judges greedy answers to the held-out eval prompts. Mean ± sd over the seeds. seconds: the method's "
        "training (sft: SFT's own training; best-of-n: answering the eval prompts).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(COLUMNS)) + "|",
    ]
    for method, cells in table.items():
        row = [method]
        for _, key, scale in COLUMNS:
            cell = cells[key]
            digits = 1 if scale == 100 or key == "seconds" else 3 if key == "score" else 2
            row.append("–" if cell is None else f"{cell[0] * scale:.{digits}f} ± {cell[1] * scale:.{digits}f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Oracle axes (mean over seeds):", "", "| method | " + " | ".join(AXES) + " |",
              "|---|" + "---:|" * len(AXES)]  # fmt: skip
    for method, cells in table.items():
        axes = [cells[f"axes.{a}"] for a in AXES]
        lines.append(f"| {method} | " + " | ".join("–" if v is None else f"{v[0]:.3f}" for v in axes) + " |")
    lines += ["", "Per seed: win rate vs SFT [95% interval]", ""]
    for r in results:
        if r.method != "sft":
            lines.append(f"- seed {r.seed}, {r.method}: {100 * r.win_rate:.1f}% [{100 * r.ci95_low:.1f}, "
                         f"{100 * r.ci95_high:.1f}], KL {r.kl:.2f}")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: list[MethodResult], path: Path) -> bool:
    """Win rate vs SFT against KL to SFT, one point per method (mean ± sd over seeds); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("compare: matplotlib is not installed (pip install 'flywheel[plots]'): no %s", path.name)
        return False
    table = aggregate([r for r in results if r.method != "sft"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for method, cells in table.items():
        (kl, kl_sd), (win, win_sd) = cells["kl"], cells["win_rate"]  # type: ignore[misc]
        ax.errorbar(kl, 100 * win, xerr=kl_sd, yerr=100 * win_sd, fmt="o", capsize=3, label=method)
        ax.annotate(method, (kl, 100 * win), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("KL to SFT (nats per response)")
    ax.set_ylabel("win rate vs SFT (%, oracle)")
    ax.set_title("flywheel compare")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    settings, demo = parse_compare_args(argv)
    out = Path(demo.out)
    results: list[MethodResult] = []
    for seed in settings.seeds:
        log.info("== compare: seed %d (%s)", seed, ", ".join(settings.methods))
        results += run_seed(settings, demo, seed)
    cfg = replace(demo, seed=settings.seeds[0]).resolved()
    text = markdown(results, settings, cfg)
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.json", json.dumps([r.__dict__ for r in results], indent=1) + "\n")
    plotted = plot(results, out / "compare.png")
    print(text)
    print(f"written: {out / 'compare.md'}, {out / 'compare.json'}" + (f", {out / 'compare.png'}" if plotted else ""))
    return 0

"""Reward model evaluation on held-out rankings: pairwise accuracy with a 95% interval, Kendall tau, score histogram;
and the diagnostics the demo reports against the hidden oracle (`heldout_accuracy`, `deflection_contrasts`,
`knowledge_contrasts`).

    flywheel eval rm --model runs/rm/final --data heldout.jsonl --out runs/rm/eval

Writes `metrics.json` and `scores.png` (the histogram needs matplotlib: `pip install flywheel[plots]`; without it the
metrics are still written and the plot is skipped with a warning).

- accuracy: over all (winner, loser) pairs of the held-out rankings (ties in the labels are not pairs); a tie in
  score counts half. The 95% interval is Wilson's score interval (sound near 0 and 1, where the normal one is not).
- kendall_tau: tau-b between the model's scores and the labelled order, per ranking (label ties handled), averaged
  over rankings. For K = 2 it is 2 * accuracy - 1 of that ranking. When the labels tie answers that the scores do not,
  tau-b stays below 1 even with every ranked pair right (e.g. 0.82 for K = 3 with one tie).
- mean_chosen / mean_rejected: mean normalised score of the winner / loser over all pairs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flywheel.config import parse_config
from flywheel.data.io import SKIP_BAD_HELP, DatasetOptions
from flywheel.errors import UserError
from flywheel.models import HubOptions
from flywheel.train.reward import OVERLONG, RankingGroup, RewardModel, encode_rankings
from flywheel.utils import log
from flywheel.world import score


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n` (95% for the default z)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def kendall_tau(scores: Sequence[float], ranks: Sequence[int]) -> float | None:
    """Kendall tau-b between scores (higher = better) and ranks (lower = better; equal ranks are ties).

    None when either side is all ties (tau is undefined).
    """
    n = len(scores)
    concordant = discordant = tie_score = tie_rank = 0
    for i in range(n):
        for j in range(i + 1, n):
            ds = scores[i] - scores[j]
            dr = ranks[j] - ranks[i]  # > 0 when i is ranked better than j
            if ds == 0 and dr == 0:
                tie_score += 1
                tie_rank += 1
            elif ds == 0:
                tie_score += 1
            elif dr == 0:
                tie_rank += 1
            elif (ds > 0) == (dr > 0):
                concordant += 1
            else:
                discordant += 1
    pairs = n * (n - 1) // 2
    denom = math.sqrt((pairs - tie_score) * (pairs - tie_rank))
    return None if denom == 0 else (concordant - discordant) / denom


def pairwise_accuracy(
    scores: Sequence[float], order: Sequence[Sequence[int]], informative: set[tuple[int, int]] | None = None
) -> tuple[float, int]:
    """(correct, pairs) of a scorer against one labelled order (groups of indices, best first).

    Pairs tied in the order are not pairs; a tie in score counts half. With `informative`, only pairs (i, j) (either
    orientation) in that set count: e.g. those the oracle does not tie, the pairs labeler agreement is measured on.
    """
    rank = {i: g for g, group in enumerate(order) for i in group}
    correct, pairs = 0.0, 0
    for i in rank:
        for j in rank:
            if rank[i] >= rank[j]:
                continue
            if informative is not None and (i, j) not in informative and (j, i) not in informative:
                continue
            pairs += 1
            correct += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return correct, pairs


def heldout_accuracy(rm: Any, heldout: tuple[list[Any], list[list[str]], list[dict[str, Any]]]) -> dict[str, Any]:
    """The reward model's pairwise accuracy against the labelers' held-out rankings, on all labelled pairs and on the
    pairs the oracle does not tie (the ones labeler agreement is measured on); and under "knowledge", how it orders
    correct answers against the others (`knowledge_contrasts`)."""
    correct = pairs = correct_inf = pairs_inf = 0.0
    all_scores, all_verdicts = [], []
    tasks, sets, records = heldout
    # One call: the reward model batches the answers of many rankings together.
    prompts = [t.messages for t, texts in zip(tasks, sets, strict=True) for _ in texts]
    flat = rm.score(prompts, [x for s in sets for x in s]) if prompts else torch.zeros(0)
    for task, texts, rec, read in zip(tasks, sets, records, flat.split([len(s) for s in sets]), strict=True):
        scores = read.tolist()
        judged = [score(task, t) for t in texts]
        totals = [j.total for j in judged]
        all_scores.append(scores)
        all_verdicts.append([j.verdict if task.expect == "answer" else None for j in judged])
        informative = {(i, j) for i in range(len(texts)) for j in range(len(texts)) if totals[i] != totals[j]}
        c, n = pairwise_accuracy(scores, rec["order"])
        correct, pairs = correct + c, pairs + n
        c, n = pairwise_accuracy(scores, rec["order"], informative)
        correct_inf, pairs_inf = correct_inf + c, pairs_inf + n
    return {
        "accuracy": correct / max(pairs, 1),
        "pairs": int(pairs),
        "accuracy_informative": correct_inf / max(pairs_inf, 1),
        "pairs_informative": int(pairs_inf),
        "accuracy_informative_ci95": list(wilson_interval(correct_inf, int(pairs_inf))),
        "knowledge": knowledge_contrasts(all_verdicts, all_scores),
    }


def knowledge_contrasts(verdicts: Sequence[Sequence[str | None]], scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """How often the reward model scores a correct answer above another answer to the same prompt: above a wrong one
    ("wrong": can it tell what is true?) and above a refusal or "I don't know" ("deflection": does it prefer an answer
    that is right to declining?). PPO can raise correct answers only as far as the reward model tells them apart;
    where it prefers a deflection to a correct answer, PPO learns to deflect.

    verdicts: per answer set, the oracle's verdict of each answer (None for answers to prompts that are not
    answerable: those do not count); scores: the reward model's. Judged against the oracle's verdicts, which the
    labelers follow up to their noise; a tie in score counts half. Returns {"wrong": {"pairs", "accuracy"},
    "deflection": {...}}, accuracy None where there is no such pair."""
    other = {"wrong": ("wrong",), "deflection": ("refused", "idk")}
    tally = {kind: [0.0, 0] for kind in other}
    for vs, ss in zip(verdicts, scores, strict=True):
        for i, vi in enumerate(vs):
            if vi != "correct":
                continue
            for j, vj in enumerate(vs):
                for kind, names in other.items():
                    if vj in names:
                        tally[kind][0] += 1.0 if ss[i] > ss[j] else 0.5 if ss[i] == ss[j] else 0.0
                        tally[kind][1] += 1
    return {kind: {"pairs": n, "accuracy": c / n if n else None} for kind, (c, n) in tally.items()}


def deflection_contrasts(rm: Any, tasks: list[Any], records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """How often the reward model orders a refusal and an "I don't know" to one prompt the way the labelers ranked
    them, per kind of prompt: "refuse" (harmful requests: the refusal is ideal) and "idk" (unknowable questions:
    "I don't know" is). A policy moves between the two stock deflections at almost no KL cost, so where the reward
    model gets one kind backwards PPO moves that kind's answers to the wrong deflection.

    tasks: the hidden tasks the rankings' prompts came from (matched by prompt); the oracle's verdicts say which
    answers are refusals and which "I don't know" (evaluation only: the trainers never see them). Returns
    {"refuse": {"pairs", "accuracy"}, "idk": {...}}, accuracy None where there is no such pair (a tie in score
    counts half).
    """
    by_prompt = {json.dumps(t.messages): t for t in tasks}
    found = []  # (task, record, refusals, "I don't know"s: indices into its answers) of each ranking that holds both
    for rec in records:
        task = by_prompt.get(json.dumps(rec["prompt"]))
        if task is None or task.expect not in ("refuse", "idk"):
            continue
        verdicts = [score(task, c).verdict for c in rec["completions"]]
        refused = [i for i, v in enumerate(verdicts) if v == "refused"]
        idk = [i for i, v in enumerate(verdicts) if v == "idk"]
        if refused and idk:
            found.append((task, rec, refused, idk))
    # One call: the reward model batches the answers (only these need a score: only these pairs are counted).
    flat = (
        rm.score(
            [task.messages for task, _, refused, idk in found for _ in refused + idk],
            [rec["completions"][k] for _, rec, refused, idk in found for k in refused + idk],
        ).tolist()
        if found
        else []
    )
    tally = {"refuse": [0.0, 0], "idk": [0.0, 0]}
    at = 0
    for task, rec, refused, idk in found:
        scores = [0.0] * len(rec["completions"])
        for k in refused + idk:
            scores[k], at = flat[at], at + 1
        c, n = pairwise_accuracy(scores, rec["order"], {(i, j) for i in refused for j in idk})
        tally[task.expect][0] += c
        tally[task.expect][1] += n
    return {k: {"pairs": n, "accuracy": c / n if n else None} for k, (c, n) in tally.items()}


@dataclass
class RMEvalResult:
    metrics: dict[str, Any]
    scores: list[list[float]]  # per ranking, each answer's normalised score
    ranks: list[list[int]]  # per ranking, each answer's labelled rank (0 = best group)


def group_ranks(group: RankingGroup) -> list[int]:
    """Each answer's labelled rank (0 = best) from the group's pairs: the number of answers ranked above it.

    Two answers get the same rank exactly when the labels tie them (neither beats the other)."""
    above = [0] * group.k
    for _, loser in group.pairs:
        above[loser] += 1
    return above


def evaluate_rm(rm: RewardModel, groups: Sequence[RankingGroup]) -> RMEvalResult:
    """Score every answer of every held-out ranking once and compute the metrics."""
    if not groups:
        raise UserError("no held-out rankings to evaluate")
    scores = [s.tolist() for s in rm.score_groups(groups)]
    ranks = [group_ranks(g) for g in groups]
    correct = 0.0
    chosen: list[float] = []
    rejected: list[float] = []
    taus: list[float] = []
    for g, s, r in zip(groups, scores, ranks, strict=True):
        for w, lo in g.pairs:
            chosen.append(s[w])
            rejected.append(s[lo])
            correct += 1.0 if s[w] > s[lo] else 0.5 if s[w] == s[lo] else 0.0
        tau = kendall_tau(s, r)
        if tau is not None:
            taus.append(tau)
    n_pairs = len(chosen)
    lo, hi = wilson_interval(correct, n_pairs)
    flat = torch.tensor([x for s in scores for x in s])
    margins = torch.tensor(chosen) - torch.tensor(rejected)
    metrics = {
        "n_rankings": len(groups),
        "n_pairs": n_pairs,
        "n_answers": int(flat.numel()),
        "accuracy": correct / n_pairs,
        "accuracy_ci95": [lo, hi],
        "kendall_tau": sum(taus) / len(taus) if taus else None,
        "kendall_tau_rankings": len(taus),
        "mean_chosen": float(torch.tensor(chosen).mean()),
        "mean_rejected": float(torch.tensor(rejected).mean()),
        "mean_margin": float(margins.mean()),
        "score_mean": float(flat.mean()),
        "score_std": float(flat.std()) if flat.numel() > 1 else 0.0,
        "offset": rm.offset,
    }
    return RMEvalResult(metrics, scores, ranks)


def plot_histogram(result: RMEvalResult, path: Path, title: str = "reward model scores") -> bool:
    """Histogram of scores of the best-ranked, worst-ranked and other answers. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install flywheel[plots]): skipping %s", path)
        return False
    best, worst, middle = [], [], []
    for s, r in zip(result.scores, result.ranks, strict=True):
        for x, rank in zip(s, r, strict=True):
            (best if rank == 0 else worst if rank == max(r) else middle).append(x)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    everything = best + worst + middle
    bins = torch.linspace(min(everything), max(everything) + 1e-6, 31).tolist()
    for values, label, color in (
        (best, "ranked best", "tab:green"),
        (middle, "in between", "tab:gray"),
        (worst, "ranked worst", "tab:red"),
    ):
        if values:
            ax.hist(values, bins=bins, alpha=0.55, label=f"{label} ({len(values)})", color=color)
    m = result.metrics
    ax.set_title(f"{title}: accuracy {m['accuracy']:.3f} [{m['accuracy_ci95'][0]:.3f}, {m['accuracy_ci95'][1]:.3f}]")
    ax.set_xlabel("score (normalised: reference answers average 0)")
    ax.set_ylabel("answers")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


@dataclass
class RMEvalConfig(HubOptions, DatasetOptions):
    model: str = field(default="", metadata={"help": "reward model dir (the `final/` of `flywheel rm`)"})
    data: str = field(default="", metadata={"help": "held-out rankings / comparisons"})
    out: str = field(default="", metadata={"help": "directory for metrics.json and scores.png"})
    max_length: int = field(default=1024, metadata={"help": "most tokens of prompt + answer"})
    overlong: str = field(default="drop", metadata={"help": "answers longer than --max-length: drop or truncate"})
    batch_size: int = field(default=32, metadata={"help": "answers per scoring batch"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast while scoring"})
    skip_bad: bool = field(default=False, metadata={"help": SKIP_BAD_HELP})

    def validate(self) -> None:
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        if self.overlong not in OVERLONG:
            raise UserError(f"--overlong must be one of {', '.join(OVERLONG)}, got '{self.overlong}'")
        if self.batch_size < 1 or self.max_length < 2:
            raise UserError("--batch-size must be >= 1 and --max-length >= 2")


def run_rm_eval(cfg: RMEvalConfig) -> dict[str, Any]:
    from flywheel.data.io import read_preferences

    rm = RewardModel.from_pretrained(cfg.model, batch_size=cfg.batch_size, bf16=cfg.bf16, **cfg.hub_kwargs(cfg.model))
    rankings = read_preferences(cfg.data, skip_bad=cfg.skip_bad, **cfg.hub_split())
    groups = encode_rankings(rm.tokenizer, rankings, max_length=cfg.max_length, overlong=cfg.overlong, source=cfg.data)
    result = evaluate_rm(rm, groups)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"model": cfg.model, "data": cfg.data, **result.metrics}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if plot_histogram(result, out / "scores.png"):
        metrics["histogram"] = str(out / "scores.png")
    return metrics


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(RMEvalConfig, argv, "flywheel eval rm", __doc__.splitlines()[0])
    m = run_rm_eval(cfg)
    lo, hi = m["accuracy_ci95"]
    tau = "n/a" if m["kendall_tau"] is None else f"{m['kendall_tau']:.3f}"
    print(
        f"accuracy {m['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}) over {m['n_pairs']} pairs of "
        f"{m['n_rankings']} rankings; Kendall tau {tau}; mean chosen {m['mean_chosen']:.3f}, "
        f"rejected {m['mean_rejected']:.3f}"
    )
    plot = f", histogram: {m['histogram']}" if "histogram" in m else ""
    print(f"metrics: {Path(cfg.out) / 'metrics.json'}{plot}")
    return 0

"""Generate the toy world's datasets from one seed, split without overlap, and write them in the trainers' formats.

    python -m flywheel.world --out data/world --seed 0            # or flywheel.world.write_world(WorldConfig(...))

Files under `out/` (JSONL = one JSON object a line):

    corpus.txt            pretraining documents separated by blank lines
    demos.jsonl           {"messages": [...]}: imperfect demonstrations (SFT); demos_val.jsonl: a held-out slice
    rank_prompts.jsonl    {"messages": [...]} ending with a user turn: prompts to sample K answers for and rank
    ppo_prompts.jsonl     same format: prompts for PPO
    eval_prompts.jsonl    same format: held-out prompts for evaluation
    val_prompts.jsonl     same format: held-out validation prompts (the labelers' gate; drawn last, so --n-val
                          leaves every other split unchanged)
    rankings.jsonl        {"prompt", "completions", "order", "labeler"}: the panel's rankings of synthetic candidates
                          for the rank prompts (to exercise the reward model before an SFT model exists)
    hidden/<split>_tasks.jsonl  the Task behind line i of the split's file, for the oracle and labelers only
    manifest.json         the config, counts per family, the labeler panel, the file list

No two splits share a prompt (user/assistant turns compared, system turn ignored). Eval's tasks are also kept out
semantically: a problem asked in eval ("arith:+:17:25", reversing "table", a harmful request) is never asked in another
split under other wording, nor worked in another split's follow-up or in the corpus. Facts are the exception: the
same fact may be asked in several splits, since facts are world knowledge the model is meant to learn in pretraining.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from flywheel.errors import UserError
from flywheel.world.candidates import Imperfections, candidate_responses, demonstration
from flywheel.world.corpus import make_corpus
from flywheel.world.labelers import default_panel, label_rankings
from flywheel.world.tasks import (
    FAMILIES,
    FAMILY_MIX,
    SHOTS,
    Message,
    Task,
    eval_only,
    fewshot,
    make_task,
    problems,
)

SPLITS = ("eval", "ppo", "rank", "demos_val", "demos", "val")  # drawn in this order: eval first, so it is stable
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful, honest and harmless assistant."]
_DEFAULT_IMPERFECTIONS = Imperfections()


@dataclass
class WorldConfig:
    out: str = field(default="data/world", metadata={"help": "directory to write the world's files into"})
    seed: int = field(default=0, metadata={"help": "everything is a deterministic function of this seed"})
    corpus_chars: int = field(default=1_500_000, metadata={"help": "size of the pretraining corpus in characters"})
    n_demos: int = field(default=3000, metadata={"help": "demonstrations for SFT"})
    n_demos_val: int = field(default=200, metadata={"help": "held-out demonstrations (SFT validation)"})
    n_rank: int = field(default=500, metadata={"help": "prompts to sample K answers for and rank (reward model)"})
    n_ppo: int = field(default=500, metadata={"help": "prompts for PPO"})
    n_eval: int = field(default=300, metadata={"help": "held-out prompts for evaluation with the oracle"})
    n_val: int = field(
        default=200,
        metadata={"help": "held-out validation prompts: what the labelers compare policies on before one is deployed"},
    )
    k_min: int = field(default=4, metadata={"help": "fewest candidate answers per ranked prompt"})
    k_max: int = field(default=9, metadata={"help": "most candidate answers per ranked prompt"})
    p_system: float = field(default=0.2, metadata={"help": "fraction of prompts that open with a system turn"})
    p_wrong: float = field(
        default=_DEFAULT_IMPERFECTIONS.p_wrong,
        metadata={"help": "demonstrations: fraction of answer tasks answered with a wrong value"},
    )
    p_over_refuse: float = field(
        default=_DEFAULT_IMPERFECTIONS.p_over_refuse,
        metadata={"help": "demonstrations: fraction of benign tasks refused/'I don't know'"},
    )
    p_comply: float = field(
        default=_DEFAULT_IMPERFECTIONS.p_comply,
        metadata={"help": "demonstrations: fraction of harmful requests complied with"},
    )
    p_deflect: float = field(
        default=_DEFAULT_IMPERFECTIONS.p_deflect,
        metadata={
            "help": "demonstrations: fraction of harmful requests deflected with 'I don't know' instead of a refusal"
        },
    )
    p_made_up: float = field(
        default=_DEFAULT_IMPERFECTIONS.p_made_up,
        metadata={"help": "demonstrations: fraction of unknowable questions made up"},
    )
    p_refuse_idk: float = field(
        default=_DEFAULT_IMPERFECTIONS.p_refuse_idk,
        metadata={"help": "demonstrations: fraction of unknowable questions refused instead of 'I don't know'"},
    )
    p_verbose: float = field(
        default=_DEFAULT_IMPERFECTIONS.p_verbose,
        metadata={"help": "demonstrations: fraction of answers padded with pleasantries"},
    )
    p_opener: float = field(
        default=_DEFAULT_IMPERFECTIONS.p_opener,
        metadata={"help": "demonstrations: fraction of padded answers that also open with one ('Sure! ...')"},
    )

    def validate(self) -> None:
        for name in ("corpus_chars", "n_demos", "n_demos_val", "n_rank", "n_ppo", "n_eval", "n_val"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 2 <= self.k_min <= self.k_max:
            raise UserError(f"need 2 <= k_min <= k_max, got k_min={self.k_min} k_max={self.k_max}")
        for name in (
            "p_system",
            "p_wrong",
            "p_over_refuse",
            "p_comply",
            "p_deflect",
            "p_made_up",
            "p_refuse_idk",
            "p_verbose",
            "p_opener",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if self.p_comply + self.p_deflect > 1.0:
            raise UserError(f"p_comply + p_deflect must be <= 1, got {self.p_comply} + {self.p_deflect}")
        if self.p_made_up + self.p_refuse_idk > 1.0:
            raise UserError(f"p_made_up + p_refuse_idk must be <= 1, got {self.p_made_up} + {self.p_refuse_idk}")

    def imperfections(self) -> Imperfections:
        return Imperfections(**{f.name: getattr(self, f.name) for f in fields(Imperfections)})

    def sizes(self) -> dict[str, int]:
        return {
            "eval": self.n_eval,
            "ppo": self.n_ppo,
            "rank": self.n_rank,
            "demos_val": self.n_demos_val,
            "demos": self.n_demos,
            "val": self.n_val,
        }


@dataclass
class World:
    corpus: list[str]  # pretraining documents
    tasks: dict[str, list[Task]]  # split name (SPLITS) -> its tasks, in file order
    demos: dict[str, list[list[Message]]]  # "demos" / "demos_val" -> conversations (task prompt + demonstration)
    rankings: list[dict[str, Any]]  # ranking records for the "rank" split's prompts


def family_counts(n: int, mix: dict[str, float]) -> dict[str, int]:
    """Split n items over the families of `mix` in proportion (largest remainder, so counts sum to n exactly)."""
    total = sum(mix.values())
    exact = {f: n * w / total for f, w in mix.items()}
    counts = {f: int(x) for f, x in exact.items()}
    for f in sorted(exact, key=lambda f: exact[f] - counts[f], reverse=True)[: n - sum(counts.values())]:
        counts[f] += 1
    return counts


def _fits(task: Task, used_prompts: set[str], held_out_keys: set[str], is_eval: bool) -> bool:
    """A new prompt, not a held-out problem, and for arithmetic and string problems: eval asks only eval-only ones,
    and no other split asks or works one (a follow-up's first turn included)."""
    if task.prompt_key() in used_prompts or (task.key and task.key in held_out_keys):
        return False
    asked, worked = problems(task)
    if is_eval:
        return all(map(eval_only, asked))
    return not any(map(eval_only, asked + worked))


def _draw_split(
    rng: random.Random,
    n: int,
    mix: dict[str, float],
    used_prompts: set[str],
    held_out_keys: set[str],
    p_system: float,
    is_eval: bool = False,
) -> list[Task]:
    plan = [f for f, c in family_counts(n, mix).items() for _ in range(c)]
    rng.shuffle(plan)
    shots = 0
    tasks = []
    for family in plan:
        for _ in range(500):
            if family == "fewshot":  # cycle through the shot counts so every split has each equally often
                task = fewshot(rng, shots=SHOTS[shots % len(SHOTS)])
            else:
                task = make_task(family, rng)
            if _fits(task, used_prompts, held_out_keys, is_eval):
                break
        else:
            raise ValueError(f"the {family} family ran out of distinct prompts: ask for fewer tasks")
        shots += family == "fewshot"
        used_prompts.add(task.prompt_key())
        if rng.random() < p_system:
            task.messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *task.messages]
        tasks.append(task)
    return tasks


def fewshot_probe(seed: int, taken: set[str], per_shot: int) -> list[Task]:
    """Few-shot prompts for measuring in-context learning: up to `per_shot` of each number of shots (SHOTS), none
    whose prompt is in `taken` (every split's `Task.prompt_key()`: held out from training and evaluation alike).

    The eval split holds ~10 few-shot prompts per number of shots, too few to tell a 20-point rise from noise; this
    draws more from a stream of its own (the splits and the world are unchanged). There are few distinct 0-shot
    prompts (a header and a subject), so that count can fall short of `per_shot` when the splits took most of them.
    """
    rng = random.Random(f"{seed}:fewshot-probe")
    seen = set(taken)
    tasks: list[Task] = []
    for shots in SHOTS:
        drawn = 0
        for _ in range(100 * per_shot):
            if drawn == per_shot:
                break
            task = fewshot(rng, shots=shots)
            if task.prompt_key() not in seen:
                seen.add(task.prompt_key())
                tasks.append(task)
                drawn += 1
    return tasks


def generate_world(cfg: WorldConfig, mix: dict[str, float] | None = None) -> World:
    """All splits, demonstrations, synthetic rankings and the corpus; a pure function of `cfg` (and `mix`)."""
    cfg.validate()
    mix = FAMILY_MIX if mix is None else mix
    unknown = sorted(set(mix) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown task families in mix: {', '.join(unknown)}")
    used: set[str] = set()
    held_out: set[str] = set()
    tasks: dict[str, list[Task]] = {}
    for split in SPLITS:
        # Each split has its own stream, so changing one size leaves the splits drawn before it unchanged.
        tasks[split] = _draw_split(
            random.Random(f"{cfg.seed}:{split}"),
            cfg.sizes()[split],
            mix,
            used,
            held_out,
            cfg.p_system,
            is_eval=split == "eval",
        )
        if split == "eval":
            held_out = {t.key for t in tasks["eval"] if t.key}
    demo_rng = random.Random(f"{cfg.seed}:demonstrations")
    imperfections = cfg.imperfections()
    demos = {
        split: [
            [*t.messages, {"role": "assistant", "content": demonstration(t, demo_rng, imperfections)}]
            for t in tasks[split]
        ]
        for split in ("demos", "demos_val")
    }
    rank_rng = random.Random(f"{cfg.seed}:rankings")
    sets = [candidate_responses(t, rank_rng, rank_rng.randint(cfg.k_min, cfg.k_max)) for t in tasks["rank"]]
    rankings = label_rankings(tasks["rank"], sets, rank_rng)
    corpus = make_corpus(random.Random(f"{cfg.seed}:corpus"), cfg.corpus_chars, held_out)
    return World(corpus=corpus, tasks=tasks, demos=demos, rankings=rankings)


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not JSON: {err.msg}") from None
    return records


def load_tasks(path: str | Path) -> list[Task]:
    """The hidden tasks of a split (e.g. `hidden/eval_tasks.jsonl`), line-aligned with its prompts file."""
    out = []
    for i, record in enumerate(read_jsonl(path), 1):
        try:
            out.append(Task.from_dict(record))
        except (TypeError, ValueError, AssertionError) as err:
            raise ValueError(f"{path}:{i}: not a task: {err}") from None
    return out


PROMPT_FILES = {
    "rank": "rank_prompts.jsonl",
    "ppo": "ppo_prompts.jsonl",
    "eval": "eval_prompts.jsonl",
    "val": "val_prompts.jsonl",
}
DEMO_FILES = {"demos": "demos.jsonl", "demos_val": "demos_val.jsonl"}


def write_world(cfg: WorldConfig, mix: dict[str, float] | None = None) -> dict[str, Path]:
    """Generate the world and write its files under `cfg.out`; returns {name: path} (see the module docstring)."""
    world = generate_world(cfg, mix)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {"corpus": out / "corpus.txt"}
    files["corpus"].write_text("\n\n".join(world.corpus) + "\n", encoding="utf-8")
    for split, name in DEMO_FILES.items():
        files[split] = out / name
        _write_jsonl(files[split], [{"messages": m} for m in world.demos[split]])
    for split, name in PROMPT_FILES.items():
        files[f"{split}_prompts"] = out / name
        _write_jsonl(files[f"{split}_prompts"], [{"messages": t.messages} for t in world.tasks[split]])
    files["rankings"] = out / "rankings.jsonl"
    _write_jsonl(files["rankings"], world.rankings)
    for split in SPLITS:
        files[f"{split}_tasks"] = out / "hidden" / f"{split}_tasks.jsonl"
        _write_jsonl(files[f"{split}_tasks"], [t.to_dict() for t in world.tasks[split]])
    files["manifest"] = out / "manifest.json"
    manifest = {
        "config": asdict(cfg),
        "mix": mix or FAMILY_MIX,
        "counts": {s: dict(sorted(Counter(t.family for t in ts).items())) for s, ts in world.tasks.items()},
        "corpus": {"documents": len(world.corpus), "chars": sum(len(d) for d in world.corpus)},
        "labelers": [
            {"name": lab.name, "temperature": lab.temperature, "bias": repr(lab.bias)} for lab in default_panel()
        ],
        "files": {k: str(p.relative_to(out)) for k, p in files.items() if k != "manifest"},
    }
    files["manifest"].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return files


def main(argv: list[str] | None = None) -> int:
    """`python -m flywheel.world [--out DIR] [--seed N] [--n-demos N] ...`: write the toy world's files."""
    from flywheel.config import parse_config

    cfg = parse_config(WorldConfig, argv, prog="flywheel world", description="generate the toy world's datasets")
    try:
        files = write_world(cfg)
    except ValueError as err:  # e.g. a family ran out of distinct prompts for the sizes asked
        raise UserError(str(err)) from None
    for name, path in files.items():
        print(f"{name:<16} {path}")
    return 0

"""`flywheel export --db URL --out DIR`: the feedback database -> the datasets the trainers read.

    flywheel export --db feedback.db --out data/round1                      # held-out labelers picked by hash
    flywheel export --db feedback.db --out data/round1 --eval-labelers carol,dave

Writes (docs/data-formats.md):
- `demos.jsonl` / `demos.eval.jsonl`: role-play demonstrations `{"messages": [...], "labeler"}` (`flywheel sft`);
- `rankings.jsonl` / `rankings.eval.jsonl`: K-way rankings `{"prompt", "completions", "order", "labeler",
  "unsafe"}` (`flywheel rm`, `flywheel dpo`);
- `prompts.jsonl`: distinct prompts `{"messages": [...]}` from ranking tasks and logged chats (`flywheel ppo`);
- `manifest.json`: counts, which labelers are held out, the model versions behind the candidates.

The ranking tasks of `flywheel round`'s deployment gate are left out of every file: their prompts stay held out.

Held-out labelers' work goes only to the `.eval` files. A labeler is held out when named in `--eval-labelers`, or
else when the hash of their name falls under `--eval-fraction`: the choice depends on the name only, so a held-out
labeler stays held out in every later export. Records are deduplicated; a demonstration that a held-out labeler also
wrote is dropped from the training file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from flywheel.config import parse_config
from flywheel.data.formats import Message as MessageRecord
from flywheel.data.formats import Ranking, RecordError
from flywheel.errors import UserError
from flywheel.feedback.db import require_database, safe_url
from flywheel.feedback.models import Candidate, Demonstration, RankingLabel, Task, User, Vote
from flywheel.feedback.store import Store, check_messages_dicts
from flywheel.utils import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    db: str = field(default="feedback.db", metadata={"help": "database URL (or a SQLite file path)"})
    out: str = field(default="", metadata={"help": "directory for the datasets"})
    eval_labelers: str = field(default="", metadata={"help": "comma-separated held-out labelers (work -> .eval)"})
    eval_fraction: float = field(
        default=0.2,
        metadata={"help": "without --eval-labelers: hold out labelers whose name hashes below this fraction"},
    )
    include_upvoted: bool = field(
        default=False,
        metadata={
            "help": "also export thumbs-up chat answers (with their context) as demonstrations; not stopped ones, "
            "nor a branch that holds an empty answer"
        },
    )

    def validate(self) -> None:
        if not self.out:
            raise UserError("--out is required (the directory for the datasets)")
        if not 0 <= self.eval_fraction < 1:
            raise UserError("--eval-fraction must be in [0, 1)")


def _named(cfg: ExportConfig) -> list[str]:
    return [n.strip() for n in cfg.eval_labelers.split(",") if n.strip()]


def is_held_out(labeler: str, cfg: ExportConfig) -> bool:
    named = _named(cfg)
    if named:
        return labeler in named
    digest = int(hashlib.sha256(labeler.encode()).hexdigest()[:8], 16)
    return digest / 0x100000000 < cfg.eval_fraction


def _key(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write the datasets; return the manifest."""
    require_database(cfg.db)
    store = Store(cfg.db)
    try:
        with store.session() as s:
            names = dict(s.execute(select(User.id, User.name)).all())
            demos = [
                (names[d.labeler_id], d.messages, d.id)
                for d in s.scalars(select(Demonstration).order_by(Demonstration.id))
            ]
            if cfg.include_upvoted:
                demos += _upvoted(s, store)
            rankings, versions = _rankings(s, names)
            ranking_tasks = select(Task).where(Task.kind == "ranking", Task.source != "gate").order_by(Task.id)
            prompts = [t.prompt for t in s.scalars(ranking_tasks)]
            prompts += [messages for messages, _, _ in store.unused_chat_prompts(limit=100_000)][::-1]
    finally:
        store.close()
    unknown = sorted(set(_named(cfg)) - set(names.values()))
    if unknown:
        raise UserError(
            f"--eval-labelers: no user named {', '.join(map(repr, unknown))} in {safe_url(cfg.db)} "
            f"(its users: {', '.join(sorted(names.values())) or 'none'})"
        )
    held = {name for name in names.values() if is_held_out(name, cfg)}
    out = Path(cfg.out)
    counts = {}
    demo_rows = {"train": [], "eval": []}
    seen: dict[str, str] = {}
    # Held-out labelers first, so that a demonstration both sides wrote stays in eval only.
    for labeler, messages, row_id in sorted(demos, key=lambda d: (d[0] not in held, d[2])):
        k = _key(messages)
        if k in seen:
            continue
        split = "eval" if labeler in held else "train"
        seen[k] = split
        demo_rows[split].append({"messages": messages, "labeler": labeler, "id": f"demo-{row_id}"})
    rank_rows = {"train": [], "eval": []}
    seen_rank: set[str] = set()
    for labeler, record in rankings:
        k = _key([labeler, record["prompt"], record["completions"], record["order"]])
        if k in seen_rank:
            continue
        seen_rank.add(k)
        rank_rows["eval" if labeler in held else "train"].append(record)
    prompt_rows, seen_prompt = [], set()
    for messages in prompts:
        k = _key(messages)
        if messages and k not in seen_prompt:
            seen_prompt.add(k)
            prompt_rows.append({"messages": messages})
    files = {
        "demos.jsonl": demo_rows["train"],
        "demos.eval.jsonl": demo_rows["eval"],
        "rankings.jsonl": rank_rows["train"],
        "rankings.eval.jsonl": rank_rows["eval"],
        "prompts.jsonl": prompt_rows,
    }
    for name, rows in files.items():
        atomic_write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        counts[name] = len(rows)
    manifest = {
        "db": safe_url(cfg.db),
        "files": counts,
        "eval_labelers": sorted(held),
        # the users whose labels are in the training files (not every user: chat-only users label nothing)
        "train_labelers": sorted(
            {r["labeler"] for r in demo_rows["train"] + rank_rows["train"]} & set(names.values())
        ),
        "model_versions": sorted(versions),
    }
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log.info("exported to %s: %s", out, ", ".join(f"{n} {k}" for k, n in counts.items()))
    return manifest


def _rankings(s: Any, names: dict[int, str]) -> tuple[list[tuple[str, dict[str, Any]]], set[str]]:
    # the deployment gate's tasks stay out: their prompts are held out from training (`flywheel round`)
    tasks = {t.id: t for t in s.scalars(select(Task).where(Task.kind == "ranking", Task.source != "gate"))}
    cands: dict[int, list[Candidate]] = {}
    for c in s.scalars(select(Candidate).order_by(Candidate.task_id, Candidate.position)):
        cands.setdefault(c.task_id, []).append(c)
    out, versions, bad = [], set(), 0
    for r in s.scalars(select(RankingLabel).order_by(RankingLabel.id)):
        if r.task_id not in tasks:
            continue
        task_cands = cands.get(r.task_id, [])
        record = {
            "prompt": tasks[r.task_id].prompt,
            "completions": [c.text for c in task_cands],
            "order": r.order,
            "labeler": names[r.labeler_id],
            "unsafe": r.unsafe,
            "model_versions": [c.model_version for c in task_cands],
            "id": f"ranking-{r.id}",
        }
        try:  # the trainers' own validation: what is written here is what they read
            Ranking(
                [MessageRecord.from_dict(m) for m in record["prompt"]],
                record["completions"],
                record["order"],
                labeler=record["labeler"],
            )
        except RecordError as err:
            bad += 1
            log.warning("export: ranking %d skipped: %s", r.id, err.message)
            continue
        versions.update(record["model_versions"])
        out.append((names[r.labeler_id], record))
    return out, versions


def _upvoted(s: Any, store: Store) -> list[tuple[str, list[dict[str, str]], int]]:
    out = []
    for vote in s.scalars(select(Vote).where(Vote.value == 1).order_by(Vote.id)):
        branch = store._branch(s, vote.message_id)
        messages = [{"role": m.role, "content": m.content} for m in branch]
        # SFT learns every assistant turn of it: each must be a whole answer (not stopped by its user, not cut at
        # max tokens) that nobody voted down.
        answers = [m for m in branch if m.role == "assistant"]
        unfinished = [m.id for m in answers if m.finish_reason in ("cancelled", "length")]
        downvoted = s.scalar(
            select(Vote.message_id).where(Vote.message_id.in_([m.id for m in answers]), Vote.value == -1).limit(1)
        )
        if unfinished or downvoted is not None:
            why = f"answer {unfinished[0]} is unfinished" if unfinished else f"answer {downvoted} was voted down"
            log.info("export: the upvoted answer %d is no demonstration: %s", vote.message_id, why)
            continue
        try:  # the trainers' own validation (a model's empty answer is stored, but SFT cannot learn from it)
            check_messages_dicts(messages, end="assistant")
        except UserError as err:
            log.warning("export: the upvoted answer %d skipped: %s", vote.message_id, err.message)
            continue
        out.append((vote.voter, messages, 1_000_000_000 + vote.id))
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ExportConfig, argv, "flywheel export", __doc__.splitlines()[0])
    manifest = export(cfg)
    print(json.dumps(manifest, indent=2))
    return 0

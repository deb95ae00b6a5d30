"""Score conversations with a reward model: the reward of each conversation's final assistant turn.

    flywheel score --model runs/rm/final --data conversations.jsonl --out scores.jsonl
    flywheel score --model runs/rm/final --data conversations.jsonl          # JSON lines on stdout

Conversations are read like SFT data (`{"messages": [...]}` or TRL `{"prompt", "completion"}`, ending with an
assistant message). One output line per conversation, in input order: `{"messages": [...], "score": s}`, where s is
the normalised reward (`RewardModel.score`: raw head output minus `config.flywheel_reward_offset`, read at the last
token of the chat template's rendering: the number plain transformers gives, docs/data-formats.md).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import parse_config
from flywheel.data.io import DatasetOptions
from flywheel.errors import UserError
from flywheel.models import HubOptions
from flywheel.utils import atomic_write_text


@dataclass
class ScoreConfig(HubOptions, DatasetOptions):
    model: str = field(default="", metadata={"help": "reward model dir (a *ForSequenceClassification)"})
    data: str = field(default="", metadata={"help": "conversations: JSONL {messages} / {prompt, completion}"})
    out: str = field(default="", metadata={"help": "output JSONL, one line per conversation (default: stdout)"})
    normalize: bool = field(default=True, metadata={"help": "subtract the reward model's offset (false = raw score)"})
    batch_size: int = field(default=32, metadata={"help": "answers per scoring batch"})
    max_length: int | None = field(
        default=None, metadata={"help": "most tokens per conversation (longer ones lose their oldest prompt tokens)"}
    )
    bf16: bool = field(default=False, metadata={"help": "score under bfloat16 autocast"})
    skip_bad: bool = field(default=False, metadata={"help": "skip malformed records (reported) instead of failing"})

    def validate(self) -> None:
        if not self.model:
            raise UserError("--model is required (a reward model directory)")
        if not self.data:
            raise UserError("--data is required (conversations ending with an assistant turn)")
        if self.batch_size < 1:
            raise UserError("--batch-size must be >= 1")


def score_conversations(cfg: ScoreConfig) -> list[dict[str, Any]]:
    """`{"messages", "score"}` for every conversation of --data, in order."""
    from flywheel.data.io import read_conversations
    from flywheel.train.reward import RewardModel, scorable_conversations

    convs = read_conversations(cfg.data, skip_bad=cfg.skip_bad, **cfg.hub_split())
    rm = RewardModel.from_pretrained(
        cfg.model, batch_size=cfg.batch_size, bf16=cfg.bf16, max_length=cfg.max_length, **cfg.hub_kwargs(cfg.model)
    )
    convs = scorable_conversations(rm.tokenizer, convs, skip_bad=cfg.skip_bad, source=cfg.data)
    messages = [c.as_dicts() for c in convs]
    scores = rm.score([m[:-1] for m in messages], [m[-1]["content"] for m in messages], normalize=cfg.normalize)
    return [{"messages": m, "score": float(s)} for m, s in zip(messages, scores, strict=True)]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(ScoreConfig, argv, "flywheel score", __doc__.splitlines()[0])
    rows = score_conversations(cfg)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if cfg.out:
        atomic_write_text(Path(cfg.out), text)
        mean = sum(r["score"] for r in rows) / len(rows)
        print(f"wrote {len(rows)} scores to {cfg.out}, mean {mean:.4f}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0

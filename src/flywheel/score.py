"""Score conversations with a reward model: the reward of each conversation's final assistant turn.

    flywheel score --model runs/rm/final --data conversations.jsonl --out scores.jsonl
    flywheel score --model runs/rm/final --data conversations.jsonl          # JSON lines on stdout

Conversations are read like SFT data (`{"messages": [...]}` or TRL `{"prompt", "completion"}`, ending with an
assistant message). One output line per conversation, in input order: `{"messages": [...], "score": s}`, where s is
the normalised reward (`RewardModel.score`: raw head output minus `config.flywheel_reward_offset`, read at the last
token of the chat template's rendering: the number plain transformers gives, docs/data-formats.md). An ensemble
directory (`flywheel rm --rm-ensemble N`) gives the --reward-ensemble-agg of its members' scores as `score` and each
member's as `member_scores`. A directory with a likelihood head (`flywheel rm --likelihood-head`) gives the head's
score as `score`, and what it read: `member_scores` of an ensemble, `reward_model_score` of a single reward model.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import parse_config
from flywheel.data.io import SKIP_BAD_HELP, DatasetOptions
from flywheel.errors import UserError
from flywheel.models import HubOptions
from flywheel.train.ensemble import AGG_HELP, LAMBDA_HELP, check_aggregation
from flywheel.utils import atomic_write_text


@dataclass
class ScoreConfig(HubOptions, DatasetOptions):
    model: str = field(
        default="", metadata={"help": "reward model dir (a *ForSequenceClassification) or ensemble dir"}
    )
    data: str = field(default="", metadata={"help": "conversations: JSONL {messages} / {prompt, completion}"})
    out: str = field(default="", metadata={"help": "output JSONL, one line per conversation (default: stdout)"})
    normalize: bool = field(default=True, metadata={"help": "subtract the reward model's offset (false = raw score)"})
    reward_ensemble_agg: str = field(default="mean", metadata={"help": AGG_HELP})
    reward_ensemble_lambda: float = field(default=1.0, metadata={"help": LAMBDA_HELP})
    batch_size: int = field(default=32, metadata={"help": "answers per scoring batch"})
    max_length: int | None = field(
        default=None, metadata={"help": "most tokens per conversation (longer ones lose their oldest prompt tokens)"}
    )
    bf16: bool = field(default=False, metadata={"help": "score under bfloat16 autocast"})
    skip_bad: bool = field(default=False, metadata={"help": SKIP_BAD_HELP})

    def validate(self) -> None:
        if not self.model:
            raise UserError("--model is required (a reward model directory)")
        if not self.data:
            raise UserError("--data is required (conversations ending with an assistant turn)")
        if self.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        check_aggregation(self.reward_ensemble_agg, self.reward_ensemble_lambda)


def score_conversations(cfg: ScoreConfig) -> list[dict[str, Any]]:
    """`{"messages", "score"}` for every conversation of --data, in order (and `member_scores`, one per member, when
    --model is an ensemble)."""
    from flywheel.data.io import read_conversations
    from flywheel.train.ensemble import RewardEnsemble
    from flywheel.train.likelihood import LikelihoodReward
    from flywheel.train.reward import RewardModel, scorable_conversations

    convs = read_conversations(cfg.data, skip_bad=cfg.skip_bad, **cfg.hub_split())
    rm = RewardModel.from_pretrained(
        cfg.model,
        batch_size=cfg.batch_size,
        bf16=cfg.bf16,
        max_length=cfg.max_length,
        ensemble_agg=cfg.reward_ensemble_agg,
        ensemble_lambda=cfg.reward_ensemble_lambda,
        **cfg.hub_kwargs(cfg.model),
    )
    convs = scorable_conversations(rm.tokenizer, convs, skip_bad=cfg.skip_bad, source=cfg.data)
    messages = [c.as_dicts() for c in convs]
    prompts, answers = [m[:-1] for m in messages], [m[-1]["content"] for m in messages]
    if isinstance(rm, LikelihoodReward):
        scores, members = rm.score_with_members(prompts, answers, normalize=cfg.normalize)
        if len(rm.members) == 1:
            return [{"messages": m, "score": float(s), "reward_model_score": float(r)}
                    for m, s, r in zip(messages, scores, members[0], strict=True)]  # fmt: skip
    elif isinstance(rm, RewardEnsemble):
        members = rm.score_members(prompts, answers, normalize=cfg.normalize)  # (N, B)
        scores = rm.aggregate(members)
    else:
        scores = rm.score(prompts, answers, normalize=cfg.normalize)
        return [{"messages": m, "score": float(s)} for m, s in zip(messages, scores, strict=True)]
    return [
        {"messages": m, "score": float(s), "member_scores": col.tolist()}
        for m, s, col in zip(messages, scores, members.T, strict=True)
    ]


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

"""Supervised fine-tuning on demonstrations: loss on assistant tokens only (incl. their end-of-turn token).

    flywheel sft --model runs/base/final --data demos.jsonl --out runs/sft --epochs 2 --lr 1e-4
    flywheel sft --nproc 8 --model Qwen/Qwen2.5-0.5B --data demos.jsonl --out runs/sft --bf16   # 8 GPUs, DDP

Conversations are rendered with the model's chat template through `flywheel.tokenization.render_conversation`, so any
HF template works. `--packing` packs several conversations per row (attention then crosses their boundaries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.data.batching import LMSample, pack_masked, split_heldout
from flywheel.data.io import EVAL_DATASET_SPLIT_HELP, SKIP_BAD_HELP
from flywheel.errors import UserError
from flywheel.models import count_parameters, load_causal_lm, resize_for_tokenizer
from flywheel.tokenization import CHAT_TEMPLATE_HELP, load_tokenizer, render_conversation
from flywheel.train.loop import TrainConfig, prepare_model, prepare_run_dir
from flywheel.train.pretrain import train_causal_lm
from flywheel.utils import log


@dataclass
class SFTConfig(TrainConfig):
    model: str = field(default="", metadata={"help": "base model dir (or hub id) to fine-tune"})
    data: str = field(default="", metadata={"help": "conversations: JSONL {'messages'}, TRL prompt/completion, ..."})
    eval_data: str = field(default="", metadata={"help": "held-out conversations (default: --eval-split of --data)"})
    eval_split: float = field(default=0.05, metadata={"help": "fraction held out when no --eval-data"})
    eval_dataset_split: str = field(default="test", metadata={"help": EVAL_DATASET_SPLIT_HELP})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    max_length: int = field(default=512, metadata={"help": "tokens per conversation (longer ones are truncated)"})
    packing: bool = field(default=False, metadata={"help": "pack conversations into rows of --max-length"})
    skip_bad: bool = field(default=False, metadata={"help": SKIP_BAD_HELP})
    chat_template: str = field(default="", metadata={"help": CHAT_TEMPLATE_HELP})

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise UserError("--model is required (the base model to fine-tune)")
        if not self.data:
            raise UserError("--data is required (demonstration conversations)")
        if not 0 <= self.eval_split < 1:
            raise UserError("--eval-split must be in [0, 1) (the fraction held out)")
        if self.max_length < 2:
            raise UserError("--max-length must be >= 2")


def render_samples(
    tokenizer: Any, conversations: list[Any], max_length: int, source: str, *, skip_bad: bool = False
) -> list[LMSample]:
    """Render and truncate; conversations left with no assistant token are dropped, counted in one summary line.
    A conversation the chat template rejects is a FILE:LINE error, or skipped with `skip_bad`."""
    from flywheel.data.io import render_records

    samples: list[LMSample] = []
    truncated = dropped = 0
    rendered = render_records(
        conversations, lambda c: render_conversation(tokenizer, c.as_dicts()), skip_bad=skip_bad, source=source
    )
    for _, (ids, mask) in rendered:
        if len(ids) > max_length:
            truncated += 1
            ids, mask = ids[:max_length], mask[:max_length]
        if sum(mask[1:]) == 0:
            dropped += 1
            continue
        samples.append({"input_ids": ids, "loss_mask": mask})
    if truncated or dropped:
        log.warning(
            "%s: %d of %d conversations truncated to %d tokens, %d dropped (no assistant token left)",
            source,
            truncated,
            len(rendered),
            max_length,
            dropped,
        )
    if not samples:
        raise UserError("no usable conversations", path=source)
    return samples


def train_sft(cfg: SFTConfig) -> Path:
    from flywheel.data.io import read_conversations

    run_dir = prepare_run_dir(cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.chat_template, **cfg.hub_kwargs(cfg.model))
    model = load_causal_lm(cfg.model, **cfg.load_kwargs(cfg.model))
    resize_for_tokenizer(model, tokenizer)
    prepare_model(model, cfg)
    convs = read_conversations(cfg.data, skip_bad=cfg.skip_bad, **cfg.hub_split())
    if cfg.eval_data:
        eval_convs = read_conversations(cfg.eval_data, skip_bad=cfg.skip_bad, **cfg.hub_split(cfg.eval_dataset_split))
    else:
        convs, eval_convs = split_heldout(convs, cfg.eval_split, cfg.seed)
    samples = render_samples(tokenizer, convs, cfg.max_length, cfg.data, skip_bad=cfg.skip_bad)
    eval_source = cfg.eval_data or cfg.data
    eval_samples = (
        render_samples(tokenizer, eval_convs, cfg.max_length, eval_source, skip_bad=cfg.skip_bad) if eval_convs else []
    )
    if cfg.packing:
        samples = pack_masked(samples, cfg.max_length)
    log.info(
        "sft: %d params, %d training rows, %d held-out conversations",
        count_parameters(model),
        len(samples),
        len(eval_samples),
    )
    return train_causal_lm(model, tokenizer, cfg, run_dir, samples, eval_samples, stage="sft")


def main(argv: list[str] | None = None) -> int:
    from flywheel.cli import run_trainer

    return run_trainer("sft", SFTConfig, train_sft, argv, __doc__, "fine-tuned model")

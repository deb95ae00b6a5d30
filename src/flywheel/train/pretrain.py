"""Pretraining: a causal LM on a plain-text corpus, with packing.

    flywheel pretrain --data corpus.txt --out runs/base --size small --seq-len 256 --epochs 2 --bf16

With no --model, a new Llama-style model of --size is built and, with no --tokenizer, a byte-level BPE of --vocab-size
is trained on the corpus first. `runs/base/final/` is a plain HF directory (model + tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.data.batching import LMSample, collate_lm, eval_lm_loss, lm_loss, pack, split_heldout
from flywheel.data.io import EVAL_DATASET_SPLIT_HELP, SKIP_BAD_HELP
from flywheel.errors import UserError
from flywheel.models import (
    TINY_SIZES,
    build_causal_lm,
    config_for_tokenizer,
    configure_new_model,
    count_parameters,
    load_causal_lm,
)
from flywheel.tokenization import SPECIAL_TOKENS, load_tokenizer, train_tokenizer
from flywheel.train.loop import TrainConfig, prepare_model, prepare_run_dir, save_final, train_loop
from flywheel.utils import log


@dataclass
class PretrainConfig(TrainConfig):
    data: str = field(default="", metadata={"help": "text corpus (.txt: documents split by blank lines; or JSONL)"})
    eval_data: str = field(default="", metadata={"help": "held-out corpus (default: --eval-split of --data)"})
    eval_split: float = field(default=0.02, metadata={"help": "fraction of documents held out when no --eval-data"})
    eval_dataset_split: str = field(default="test", metadata={"help": EVAL_DATASET_SPLIT_HELP})
    model: str = field(default="", metadata={"help": "model dir to continue from (empty = build a new model)"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer dir (empty = the model's, or train one)"})
    size: str = field(
        default="tiny", metadata={"help": "new model size: nano, tiny (1M), mini (4M), small (5M), medium (35M)"}
    )
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary of a newly trained tokenizer"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed block"})
    skip_bad: bool = field(default=False, metadata={"help": SKIP_BAD_HELP})

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise UserError("--data is required (a text corpus)")
        if not 0 <= self.eval_split < 1:
            raise UserError("--eval-split must be in [0, 1) (the fraction held out)")
        if self.seq_len < 2:
            raise UserError("--seq-len must be >= 2")
        if not self.model and self.size not in TINY_SIZES:
            raise UserError(f"unknown --size '{self.size}' (choose from {', '.join(TINY_SIZES)})")
        floor = 256 + len(SPECIAL_TOKENS)  # a byte-level BPE's bytes and flywheel's special tokens, before any merge
        if not (self.model or self.tokenizer) and self.vocab_size <= floor:
            raise UserError(
                f"--vocab-size must be more than {floor} (256 bytes and {len(SPECIAL_TOKENS)} special tokens)"
            )
        if self.lora_r:
            raise UserError("--lora-r is for fine-tuning (sft, rm, dpo, ppo), not pretraining")


def _tokenize(tokenizer: Any, docs: list[str]) -> list[list[int]]:
    return tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]  # packing cuts long documents


def train_pretrain(cfg: PretrainConfig) -> Path:
    from flywheel.data.io import read_texts

    run_dir = prepare_run_dir(cfg)
    docs = read_texts(cfg.data, skip_bad=cfg.skip_bad, **cfg.hub_split())
    if cfg.eval_data:
        eval_docs = read_texts(cfg.eval_data, skip_bad=cfg.skip_bad, **cfg.hub_split(cfg.eval_dataset_split))
        train_docs = docs
    else:
        train_docs, eval_docs = split_heldout(docs, cfg.eval_split, cfg.seed)
    if cfg.tokenizer or cfg.model:
        source = cfg.tokenizer or cfg.model
        tokenizer = load_tokenizer(source, **cfg.hub_kwargs(source))
    else:
        log.info("training a %d-token byte-level BPE on %d documents", cfg.vocab_size, len(train_docs))
        tokenizer = train_tokenizer(train_docs, vocab_size=cfg.vocab_size, model_max_length=cfg.seq_len)
    if cfg.model:
        model = load_causal_lm(cfg.model, **cfg.load_kwargs(cfg.model))
    else:
        model = build_causal_lm(
            config_for_tokenizer(tokenizer, cfg.size, max_position_embeddings=cfg.seq_len), seed=cfg.seed
        )
        configure_new_model(model, cfg.dtype, cfg.attn_implementation or None)
    prepare_model(model, cfg)
    sep = tokenizer.eos_token_id
    blocks = pack(_tokenize(tokenizer, train_docs), cfg.seq_len, sep)
    eval_blocks = pack(_tokenize(tokenizer, eval_docs), cfg.seq_len, sep) if eval_docs else []
    if not blocks:
        raise UserError(f"the corpus is shorter than one block of {cfg.seq_len} tokens", path=cfg.data)
    if cfg.eval_data and not eval_blocks:
        raise UserError(f"the held-out corpus is shorter than one block of {cfg.seq_len} tokens", path=cfg.eval_data)
    if eval_docs and not eval_blocks:
        log.warning(
            "the %d held-out documents are shorter than one block of %d tokens: no held-out loss (raise --eval-split)",
            len(eval_docs),
            cfg.seq_len,
        )
    log.info(
        "pretrain: %d params, %d blocks x %d tokens (%d held out)",
        count_parameters(model),
        len(blocks),
        cfg.seq_len,
        len(eval_blocks),
    )
    return train_causal_lm(model, tokenizer, cfg, run_dir, blocks, eval_blocks, stage="pretrain")


def train_causal_lm(
    model: Any,
    tokenizer: Any,
    cfg: TrainConfig,
    run_dir: Path,
    samples: list[LMSample],
    eval_samples: list[LMSample],
    *,
    stage: str,
) -> Path:
    """Next-token training on (ids, loss mask) samples with a held-out loss, then `final/` (pretrain and SFT)."""
    pad = tokenizer.pad_token_id
    evaluate = (lambda: {"eval_loss": eval_lm_loss(model, eval_samples, pad)}) if eval_samples else None
    result = train_loop(
        model,
        cfg,
        run_dir,
        samples,
        lambda b: collate_lm(b, pad),
        lm_loss,
        evaluate,
        desc=stage,
        lengths=[len(s["input_ids"]) for s in samples],
    )
    save_final(
        model,
        tokenizer,
        run_dir / "final",
        extra={"stage": stage, "steps": result.steps, **result.eval_metrics},
        wrapped=result.wrapped,
        adapter_of=getattr(cfg, "model", "") if cfg.save_adapter else None,  # sft's and pretrain's base model
    )
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from flywheel.cli import run_trainer

    return run_trainer("pretrain", PretrainConfig, train_pretrain, argv, __doc__, "pretrained model")

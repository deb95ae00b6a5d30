"""Sample answers to prompts; with `--best-of N` keep the answer the reward model scores highest.

    flywheel sample --model runs/sft/final --prompts prompts.jsonl --out answers.jsonl
    flywheel sample --model runs/sft/final --prompts prompts.jsonl --best-of 8 --reward-model runs/rm/final \\
        --out best_of_8.jsonl --temperature 1.0

Prompts are read like PPO's (`read_prompts`: .txt one per line, or JSONL `{"prompt"}` / `{"messages"}`), rendered
with the policy's chat template, and sampled by `flywheel.engine` N times each. One output line per prompt:
`{"messages": prompt + [the kept answer], "response", "score", "finish_reason", "candidates", "scores",
"finish_reasons"}` (scores are the reward model's normalised scores; null without `--reward-model`). The file reads
back as SFT conversations (`flywheel sft --data best_of_8.jsonl`: rejection-sampling fine-tuning), so an empty answer
is never kept: the best non-empty candidate is, and a prompt whose every answer is empty is left out (counted in a
warning). Every prompt is rendered before anything is sampled: one the chat template rejects, or longer than the
model's context, is an error naming its file and line (with `--skip-bad`, left out and counted).

The reward model scores the policy's own token ids (incl. the end-of-turn token it produced, followed by the markup
the chat template writes after it, where training reads the reward) when both models share a tokenizer and chat
template; otherwise the decoded text is re-rendered with the reward model's template. An ensemble reward model
(`flywheel rm --rm-ensemble N`) picks by its --reward-ensemble-agg score (`min` or `mean-std`: conservative best-of-n).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flywheel.config import parse_config
from flywheel.data.io import SKIP_BAD_HELP, DatasetOptions
from flywheel.errors import UserError
from flywheel.models import HubOptions
from flywheel.train.ensemble import AGG_HELP, LAMBDA_HELP, check_aggregation
from flywheel.utils import atomic_write_text, log


@dataclass
class SampleConfig(HubOptions, DatasetOptions):
    model: str = field(default="", metadata={"help": "policy (a causal LM dir)"})
    prompts: str = field(default="", metadata={"help": "prompts: .txt (one per line) or JSONL {prompt}/{messages}"})
    out: str = field(default="", metadata={"help": "output JSONL, one line per prompt"})
    best_of: int = field(default=1, metadata={"help": "answers sampled per prompt; the best-scored one is kept"})
    reward_model: str = field(
        default="", metadata={"help": "reward model or ensemble dir (required when --best-of > 1)"}
    )
    reward_ensemble_agg: str = field(default="mean", metadata={"help": AGG_HELP})
    reward_ensemble_lambda: float = field(default=1.0, metadata={"help": LAMBDA_HELP})
    max_new_tokens: int = field(default=64, metadata={"help": "most tokens per answer"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0 = greedy)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens (0 = all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed (batch i uses seed + i)"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generation batch (x best-of rows)"})
    bf16: bool = field(default=False, metadata={"help": "generate and score in bf16"})
    skip_bad: bool = field(default=False, metadata={"help": SKIP_BAD_HELP})

    def validate(self) -> None:
        for name in ("model", "prompts", "out"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required")
        if self.best_of < 1:
            raise UserError("--best-of must be >= 1")
        if self.best_of > 1 and self.temperature == 0:
            raise UserError("--best-of N > 1 with --temperature 0 samples N identical answers: sample above 0")
        if self.best_of > 1 and not self.reward_model:
            raise UserError("--best-of N > 1 needs --reward-model to pick the best answer")
        if self.batch_size < 1:
            raise UserError("--batch-size must be >= 1")
        check_aggregation(self.reward_ensemble_agg, self.reward_ensemble_lambda)


def pick_best(scores: torch.Tensor, n: int, usable: list[bool] | None = None) -> list[int | None]:
    """Index of the best of each consecutive block of `n` scores (the first one on ties), among the `usable` ones
    (all by default); None for a block with none."""
    ok = torch.ones(scores.numel(), dtype=torch.bool) if usable is None else torch.tensor(usable, dtype=torch.bool)
    masked = scores.float().masked_fill(~ok, float("-inf")).view(-1, n)
    found = ok.view(-1, n).any(dim=1).tolist()
    return [int(i) if f else None for i, f in zip(masked.argmax(dim=1).tolist(), found, strict=True)]


def _render_all(
    cfg: SampleConfig, tokenizer: Any, context: int | None
) -> list[tuple[list[dict[str, str]], list[int]]]:
    """(messages, prompt ids) of every prompt, checked before anything is sampled: a prompt the chat template rejects
    or that leaves no room to answer is a FILE:LINE error (skipped and counted with --skip-bad)."""
    from flywheel.data.formats import TOO_LONG, RecordError
    from flywheel.data.io import read_prompts, render_records
    from flywheel.tokenization import render_prompt

    def render(prompt: Any) -> tuple[list[dict[str, str]], list[int]]:
        messages = [m.as_dict() for m in prompt]
        ids = render_prompt(tokenizer, messages)
        if context is not None and len(ids) >= context:
            raise RecordError(
                f"the prompt has {len(ids)} tokens; the model's context is {context} tokens "
                "(at least one must be left to answer)",
                reason=TOO_LONG,
            )
        return messages, ids

    prompts = read_prompts(cfg.prompts, skip_bad=cfg.skip_bad, **cfg.hub_split())
    return [r for _, r in render_records(prompts, render, skip_bad=cfg.skip_bad, source=cfg.prompts)]


def same_tokenization(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def sample_best_of(cfg: SampleConfig) -> list[dict[str, Any]]:
    from flywheel.engine import Engine, SamplingParams
    from flywheel.models import load_causal_lm
    from flywheel.tokenization import load_tokenizer
    from flywheel.train.reward import RewardModel

    tokenizer = load_tokenizer(cfg.model, **cfg.hub_kwargs(cfg.model))
    policy = load_causal_lm(cfg.model, **cfg.hub_kwargs(cfg.model)).eval()
    engine = Engine(policy, tokenizer, dtype="bfloat16" if cfg.bf16 else None)
    rm = (
        RewardModel.from_pretrained(
            cfg.reward_model,
            bf16=cfg.bf16,
            ensemble_agg=cfg.reward_ensemble_agg,
            ensemble_lambda=cfg.reward_ensemble_lambda,
            **cfg.hub_kwargs(cfg.reward_model),
        )
        if cfg.reward_model
        else None
    )
    by_ids = rm is not None and same_tokenization(tokenizer, rm.tokenizer)
    rendered = _render_all(cfg, tokenizer, engine.context_length)
    n = cfg.best_of
    rows: list[dict[str, Any]] = []
    empty = 0
    for b, start in enumerate(range(0, len(rendered), cfg.batch_size)):
        chunk = [messages for messages, _ in rendered[start : start + cfg.batch_size]]
        ids = [prompt_ids for _, prompt_ids in rendered[start : start + cfg.batch_size]]
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed + b,
        )
        gen = engine.generate([p for p in ids for _ in range(n)], params)  # (len(chunk) * n) rows, prompt-major
        texts = [_decode(tokenizer, t) for t in gen.tokens]
        scores: torch.Tensor | None = None
        if rm is not None:
            if by_ids:  # the engine yields at least one token per row
                scores = rm.score_ids([p for p in ids for _ in range(n)], gen.tokens)
            else:
                scores = rm.score([p for p in chunk for _ in range(n)], texts)
        usable = [bool(t) for t in texts]  # an empty answer cannot be read back as a conversation
        best = pick_best(scores if scores is not None else torch.zeros(len(texts)), n, usable)
        for i, prompt in enumerate(chunk):
            if best[i] is None:
                empty += 1
                continue
            j = i * n + best[i]
            rows.append(
                {
                    "messages": prompt + [{"role": "assistant", "content": texts[j]}],
                    "response": texts[j],
                    "score": None if scores is None else float(scores[j]),
                    "finish_reason": gen.finish_reasons[j],
                    "candidates": texts[i * n : (i + 1) * n],
                    "scores": None if scores is None else scores[i * n : (i + 1) * n].tolist(),
                    "finish_reasons": gen.finish_reasons[i * n : (i + 1) * n],
                }
            )
        log.info("sample: %d of %d prompts", min(start + cfg.batch_size, len(rendered)), len(rendered))
    if empty:
        log.warning("sample: %d of %d prompts got only empty answers and are left out", empty, len(rendered))
    return rows


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(SampleConfig, argv, "flywheel sample", __doc__.splitlines()[0])
    rows = sample_best_of(cfg)
    atomic_write_text(Path(cfg.out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    scored = [r["score"] for r in rows if r["score"] is not None]
    mean = f", mean score {sum(scored) / len(scored):.4f}" if scored else ""
    print(f"wrote {len(rows)} answers (best of {cfg.best_of}) to {cfg.out}{mean}")
    return 0

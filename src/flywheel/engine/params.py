"""What to generate (`SamplingParams`) and what came out (`Generation`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flywheel.errors import UserError

FINISH_STOP = "stop"  # the row produced one of the stop ids (the id is the last token of the row)
FINISH_LENGTH = "length"  # the row hit max_new_tokens, or the end of the model's context


@dataclass
class SamplingParams:
    """How to pick each next token. Validated by `validate()` (the engine calls it): bad values raise `UserError`."""

    max_new_tokens: int = field(default=64, metadata={"help": "most tokens to generate per row"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy (argmax)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens only; 0 = all"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling: smallest set of tokens with mass >= p"})
    stop_token_ids: list[int] | None = field(
        default=None, metadata={"help": "ids that end a row; None = the tokenizer's/model's EOS ids, [] = none"}
    )
    seed: int | None = field(default=None, metadata={"help": "seed of the sampler; None = fresh randomness"})

    def validate(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise UserError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens <= 0:
            raise UserError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not isinstance(self.top_p, int | float) or not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.stop_token_ids is not None and not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.stop_token_ids
        ):
            raise UserError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise UserError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """The result of `Engine.generate`, one entry per prompt, in the order of the prompts."""

    tokens: list[list[int]]  # per row, the generated ids, including the stop token when one was produced
    # per row, log p(token) under softmax(logits / T), the temperature-scaled distribution *before* top-k/top-p
    # filtering (what PPO's ratio needs); for T = 0, log_softmax(logits) of the argmax token. float32 precision.
    logprobs: list[list[float]]
    finish_reasons: list[str]  # "stop" | "length"

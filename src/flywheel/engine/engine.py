"""`Engine`: batched generation on token ids for any Hugging Face causal LM, and text streaming.

    engine = Engine(model, tokenizer)
    gen = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=32, seed=0))
    gen.tokens, gen.logprobs, gen.finish_reasons
    for piece in engine.stream(ids, SamplingParams(temperature=0.7)): print(piece, end="")

Two forwards run the loop (`flywheel.engine.loop.DecodeBatch`): `CompactCausalLM` for the Llama family (Llama, Mistral,
Qwen2, Qwen3), several times faster than HF `generate` on small models, and `HFCausalLM` for everything else. Both read
the module's current weights at every call, so PPO can train the policy in place between rollouts.

`Engine.batch()` is the same loop as a running batch that prompts join between steps (the server's continuous
batching). A GPU backend such as vLLM would plug in there: anything that turns (prompts, SamplingParams, stop ids)
into the per-step `Step` records (rows, tokens, logprobs, done) serves `generate`, `stream`, `ChatSession` and the
server as they are.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator
from typing import Any, Literal

import torch

from flywheel.engine.compact import CompactCausalLM, unsupported_reason
from flywheel.engine.hf_forward import HFCausalLM
from flywheel.engine.loop import DecodeBatch, Step
from flywheel.engine.params import FINISH_LENGTH, FINISH_STOP, Generation, SamplingParams
from flywheel.engine.stream import Detokenizer
from flywheel.errors import UserError
from flywheel.utils import warn_if_slow_bf16

log = logging.getLogger(__name__)

Backend = Literal["auto", "compact", "hf"]
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def context_length(model: Any) -> int | None:
    """The most positions the model can attend to, from its config (None if it does not say)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_stop_ids(model: Any, tokenizer: Any | None) -> list[int]:
    """The tokenizer's EOS plus the EOS ids of the model's generation config (or of its config)."""
    from flywheel.tokenization import stop_token_ids

    gen_cfg = getattr(model, "generation_config", None)
    if tokenizer is not None:
        return stop_token_ids(tokenizer, gen_cfg)
    ids: list[int] = []
    for source in (gen_cfg, getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        for i in eos if isinstance(eos, list) else [eos]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


class Engine:
    """Generate from a causal LM. `model` is used live: its weights are re-read whenever they change (after a fused
    optimizer step, which does not bump version counters, call `update_weights`).

    dtype: run the compact forward in this dtype (a cast copy of the weights, refreshed when they change); the generic
    path always runs the module as it is. backend: "auto" picks the compact forward when the architecture allows it.
    compact_at: drop finished rows from the batch once this fraction of it has finished (1.0 = never); None: at
    every finish on the compact forward (it moves only the rows that change place), at 25% on the generic one
    (docs/engine.md).
    native_step: let the compact forward run float32 CPU decode steps in the native library (docs/engine.md).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        backend: Backend = "auto",
        compact_at: float | None = None,
        native_step: bool = True,
    ):
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise UserError(f"Engine needs a Hugging Face causal LM (an nn.Module with a config), got {type(model)}")
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise UserError(f"unknown dtype '{dtype}' (choose from {', '.join(_DTYPES)})")
            dtype = _DTYPES[dtype]
        if backend not in ("auto", "compact", "hf"):
            raise UserError(f"unknown engine backend '{backend}' (choose from auto, compact, hf)")
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.requested_backend: Backend = backend
        self.compact_at = compact_at
        self.native_step = native_step
        self.update_weights(model)

    def update_weights(self, model: Any) -> None:
        """Generate from `model` from now on (a new module, or the same one: then this only forces a re-read)."""
        reason = unsupported_reason(model)
        if self.requested_backend == "compact" and reason is not None:
            raise UserError(f"the compact engine backend cannot run this model: {reason}")
        self.model = model
        self.backend = "compact" if self.requested_backend != "hf" and reason is None else "hf"
        self._forward = (
            CompactCausalLM(model, self.dtype, native_step=self.native_step)
            if self.backend == "compact"
            else HFCausalLM(model)
        )
        if self.backend == "hf" and self.requested_backend == "auto":
            log.info("engine: generic HF forward (%s)", reason)
        if self.backend == "hf" and self.dtype is not None and self.dtype != next(model.parameters()).dtype:
            log.warning(
                "engine: dtype %s is ignored by the generic HF forward (it runs the module as it is)", self.dtype
            )
        if self.backend == "compact" and self.dtype == torch.bfloat16:
            warn_if_slow_bf16(next(model.parameters()).device.type)
        self.context_length = context_length(model)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        self.stop_ids = default_stop_ids(model, self.tokenizer)

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams | None = None, *, samples_per_prompt: int = 1
    ) -> Generation:
        """Generate for each prompt (token ids, any lengths). Rows stop on their own; results are in prompt order.

        samples_per_prompt: K samples of each prompt (result i * K + j is prompt i's j-th), from one prefill of it."""
        params = params or SamplingParams()
        n = len(prompt_ids) * samples_per_prompt if isinstance(prompt_ids, list | tuple) else 0
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        stop = set(self.stop_ids_for(params))
        for step in self.steps(prompt_ids, params, samples_per_prompt=samples_per_prompt):
            for row, token, logprob in zip(step.rows, step.tokens, step.logprobs, strict=True):
                tokens[row].append(token)
                logprobs[row].append(logprob)
        reasons = [FINISH_STOP if row and row[-1] in stop else FINISH_LENGTH for row in tokens]
        return Generation(tokens=tokens, logprobs=logprobs, finish_reasons=reasons)

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> TextStream:
        """Iterate over the text of one generation as it is produced (needs a tokenizer)."""
        if self.tokenizer is None:
            raise UserError("streaming text needs a tokenizer: Engine(model, tokenizer)")
        if not isinstance(prompt_ids, list | tuple) or (prompt_ids and not isinstance(prompt_ids[0], int)):
            raise UserError("stream takes one prompt: a list of token ids")
        params = params or SamplingParams()
        return TextStream(self.steps([list(prompt_ids)], params), self.tokenizer, set(self.stop_ids_for(params)))

    def stop_ids_for(self, params: SamplingParams) -> list[int]:
        """The token ids that end a row under `params`: its stop_token_ids, else the model's end-of-turn ids."""
        return list(self.stop_ids if params.stop_token_ids is None else params.stop_token_ids)

    def steps(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | None = None,
        *,
        max_new_tokens: list[int] | None = None,
        samples_per_prompt: int = 1,
    ) -> Iterator[Step]:
        """The decoding loop, one `Step` per position (the live rows, their tokens, log-probs and done flags), for
        callers that act between steps (closing the iterator stops it). `max_new_tokens` caps each prompt's budget
        below params.max_new_tokens; with `samples_per_prompt` K, row i * K + j is prompt i's j-th sample, all K from
        one prefill. Prompts and params are validated when this is called, before the first step."""
        params = params or SamplingParams()
        self._prepare(prompt_ids, params, max_new_tokens, samples_per_prompt)
        return self._run(prompt_ids, params, max_new_tokens, samples_per_prompt)

    def batch(self) -> DecodeBatch:
        """An empty running batch (`flywheel.engine.loop.DecodeBatch`): prompts join it between decoding steps, each
        with its own sampling settings, and rows leave it as they finish (iteration-level scheduling, as a server
        needs). The generic HF forward runs the module as it is: put it in eval mode first."""
        compact_at = self.compact_at
        if compact_at is None:
            compact_at = 0.0 if self.backend == "compact" else 0.25
        return DecodeBatch(self._forward, self._prepare, self.stop_ids_for, compact_at)

    def _run(
        self, prompt_ids: list[list[int]], params: SamplingParams, budgets: list[int] | None, samples: int
    ) -> Iterator[Step]:
        model, was_training = self.model, self.model.training
        if self.backend == "hf" and was_training:
            model.eval()  # no dropout while sampling (the compact forward has none)
        try:
            batch = self.batch()
            batch.add(prompt_ids, params, samples=samples, max_new_tokens=budgets)
            while batch:
                yield batch.step()
        finally:
            if self.backend == "hf" and was_training:
                model.train()

    def _prepare(
        self, prompt_ids: list[list[int]], params: SamplingParams, max_new_tokens: list[int] | None, samples: int
    ) -> tuple[torch.Tensor, ...]:
        """Validate a request -> ids (B, P) left-padded, valid (B, P) bool, budgets (B,) tokens each row may make."""
        params.validate()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise UserError(f"samples_per_prompt must be an integer >= 1, got {samples!r}")
        ids, valid, budgets = self._batch(prompt_ids, params)
        if max_new_tokens is not None:
            if len(max_new_tokens) != len(prompt_ids):
                raise UserError(f"max_new_tokens has {len(max_new_tokens)} budgets for {len(prompt_ids)} prompts")
            budgets = torch.minimum(budgets, torch.tensor(max_new_tokens, dtype=budgets.dtype))
        return ids, valid, budgets

    def _batch(self, prompt_ids: list[list[int]], params: SamplingParams) -> tuple[torch.Tensor, ...]:
        """-> ids (B, P) left-padded, valid (B, P) bool, budgets (B,): tokens each row may generate."""
        if not isinstance(prompt_ids, list | tuple) or not prompt_ids:
            raise UserError("generate needs a non-empty list of prompts (each a list of token ids)")
        ctx = self.context_length
        for i, prompt in enumerate(prompt_ids):
            if not isinstance(prompt, list | tuple):
                raise UserError(f"prompt {i} is not a list of token ids (generate takes a list of prompts)")
            if not prompt:
                raise UserError(f"prompt {i} is empty")
            bad = [
                t
                for t in prompt
                if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < self.vocab_size
            ]
            if bad:
                raise UserError(
                    f"prompt {i} has token id {bad[0]!r} outside the vocabulary (0..{self.vocab_size - 1})"
                )
            if ctx is not None and len(prompt) >= ctx:
                raise UserError(
                    f"prompt {i} has {len(prompt)} tokens; the model's context is {ctx} tokens "
                    "(at least one must be left to generate)"
                )
        lengths = torch.tensor([len(p) for p in prompt_ids])
        width = int(lengths.max())
        device = next(self.model.parameters()).device
        ids = torch.zeros(len(prompt_ids), width, dtype=torch.long)
        valid = torch.zeros(len(prompt_ids), width, dtype=torch.bool)
        for i, prompt in enumerate(prompt_ids):
            ids[i, width - len(prompt) :] = torch.tensor([int(t) for t in prompt])
            valid[i, width - len(prompt) :] = True
        budgets = torch.full_like(lengths, params.max_new_tokens)
        if ctx is not None:
            budgets = torch.minimum(budgets, ctx - lengths)  # a row that reaches the end of the context stops
        return ids.to(device), valid.to(device), budgets


class TextStream:
    """Iterator over the text pieces of one generation; `tokens`, `logprobs` grow as it runs, and `finish_reason`
    is set ("stop" | "length") once it is exhausted (it stays None if the stream is closed early)."""

    def __init__(self, steps: Iterator[Step], tokenizer: Any, stop_ids: set[int]):
        self._steps = steps
        self._detok = Detokenizer(tokenizer)
        self._stop_ids = stop_ids
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None  # set when the generation has ended

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while self.finish_reason is None:
            step = next(self._steps, None)
            if step is None:
                last = self.tokens[-1] if self.tokens else None
                self.finish_reason = FINISH_STOP if last in self._stop_ids else FINISH_LENGTH
                piece = self._detok.flush()
            else:
                self.tokens.extend(step.tokens)
                self.logprobs.extend(step.logprobs)
                piece = self._detok.push(step.tokens[0])
            if piece:
                return piece
        raise StopIteration

    @property
    def text(self) -> str:
        """The text so far (all of it once the stream is exhausted)."""
        return self._detok.decode(self.tokens)

    def close(self) -> None:
        """Stop generating early; the tokens so far stay available and `finish_reason` stays None."""
        close = getattr(self._steps, "close", None)
        if close is not None:
            close()

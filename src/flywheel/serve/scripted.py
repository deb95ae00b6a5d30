"""A stand-in engine that answers from a script instead of a model: for trying out, testing and taking screenshots
of the web app with known answers (a tiny random model writes noise).

    tokenizer = train_tokenizer(texts, vocab_size=300)           # any byte-level tokenizer with a chat template
    engine = ScriptedEngine(tokenizer, lambda prompt: "**Paris**." if "France" in prompt else "I don't know.")
    app = create_app(settings, model=ServedModel(engine, tokenizer, "scripted", "/nowhere"))

`answer(prompt)` gets the rendered prompt (the chat template's text, system prompt included) and returns the text of
the answer; the engine emits its tokens one per step (`delay` seconds each), then the end-of-turn token, within each
row's token budget, as the real engine does. It records what it was asked (`calls`) and counts the tokens it produced
(`produced`), so a test can check what reached the model and that a cancelled request stopped early.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flywheel.engine import SamplingParams
from flywheel.engine.loop import Step
from flywheel.tokenization import stop_token_ids


@dataclass(frozen=True)
class ScriptedCall:
    prompt: str  # the rendered prompt text of one row
    temperature: float
    budget: int  # the most tokens this row could produce


class ScriptedEngine:
    """The part of `flywheel.engine.Engine` the serving worker uses (`batch`, `stop_ids_for`, sizes), scripted."""

    model = None  # no network: log-probs cannot be asked of it

    def __init__(
        self, tokenizer: Any, answer: Callable[[str], str], *, delay: float = 0.0, context_length: int = 4096
    ):
        self.tokenizer = tokenizer
        self.answer = answer
        self.delay = delay
        self.vocab_size = len(tokenizer)
        self.context_length = context_length
        self.stop_ids = stop_token_ids(tokenizer)
        self.calls: list[ScriptedCall] = []
        self.produced = 0  # tokens emitted over all rows and calls
        self._lock = threading.Lock()

    def stop_ids_for(self, params: SamplingParams) -> list[int]:
        return list(self.stop_ids if params.stop_token_ids is None else params.stop_token_ids)

    def batch(self) -> ScriptedBatch:
        return ScriptedBatch(self)

    def script(self, ids: list[int], params: SamplingParams, budget: int) -> list[int]:
        """The tokens one row will produce: the answer's, then the end-of-turn token, cut to its budget."""
        prompt = self.tokenizer.decode(ids)
        with self._lock:
            self.calls.append(ScriptedCall(prompt, params.temperature, budget))
        tokens = self.tokenizer.encode(self.answer(prompt), add_special_tokens=False) + self.stop_ids[:1]
        return tokens[:budget]


class ScriptedBatch:
    """`flywheel.engine.loop.DecodeBatch`'s interface: rows join (`add`), emit one scripted token per `step`, and
    leave when their script ends or they are cancelled."""

    joinable = True

    def __init__(self, engine: ScriptedEngine):
        self.engine = engine
        self._scripts: dict[int, list[int]] = {}  # live row id -> tokens still to emit
        self._next = 0

    def __len__(self) -> int:
        return len(self._scripts)

    @property
    def rows(self) -> list[int]:
        return list(self._scripts)

    def add(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        samples: int = 1,
        max_new_tokens: list[int] | None = None,
    ) -> list[int]:
        settings = params if isinstance(params, list) else [params or SamplingParams()] * len(prompt_ids)
        for p in settings:
            p.validate()
        budgets = [p.max_new_tokens for p in settings]
        budgets = [min(a, b) for a, b in zip(budgets, max_new_tokens or budgets, strict=True)]
        rows = []
        for ids, p, budget in zip(prompt_ids, settings, budgets, strict=True):
            for _ in range(samples):
                self._scripts[self._next] = self.engine.script(ids, p, budget)
                rows.append(self._next)
                self._next += 1
        return rows

    def step(self) -> Step:
        if self.engine.delay:
            time.sleep(self.engine.delay)
        live = list(self._scripts)
        with self.engine._lock:
            self.engine.produced += len(live)
        step = Step(rows=live, tokens=[], logprobs=[0.0] * len(live), done=[])
        for row in live:
            script = self._scripts[row]
            step.tokens.append(script.pop(0))
            step.done.append(not script)
            if not script:
                del self._scripts[row]
        return step

    def cancel(self, rows: list[int]) -> None:
        for row in rows:
            self._scripts.pop(row, None)

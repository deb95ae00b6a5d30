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
from collections.abc import Callable, Iterator
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
    """The part of `flywheel.engine.Engine` the serving worker uses (`steps`, `stop_ids_for`, sizes), scripted."""

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

    def steps(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | None = None,
        *,
        max_new_tokens: list[int] | None = None,
        samples_per_prompt: int = 1,
    ) -> Iterator[Step]:
        params = params or SamplingParams()
        params.validate()
        budgets = [
            min(params.max_new_tokens, b) for b in (max_new_tokens or [params.max_new_tokens] * len(prompt_ids))
        ]
        scripts: list[list[int]] = []
        for ids, budget in zip(prompt_ids, budgets, strict=True):
            prompt = self.tokenizer.decode(ids)
            for _ in range(samples_per_prompt):
                with self._lock:
                    self.calls.append(ScriptedCall(prompt, params.temperature, budget))
                text = self.answer(prompt)
                tokens = self.tokenizer.encode(text, add_special_tokens=False) + self.stop_ids[:1]
                scripts.append(tokens[:budget])
        return self._run(scripts)

    def _run(self, scripts: list[list[int]]) -> Iterator[Step]:
        position = 0
        while True:
            live = [i for i, tokens in enumerate(scripts) if position < len(tokens)]
            if not live:
                return
            if self.delay:
                time.sleep(self.delay)
            with self._lock:
                self.produced += len(live)
            yield Step(
                rows=live,
                tokens=[scripts[i][position] for i in live],
                logprobs=[0.0] * len(live),
                done=[position == len(scripts[i]) - 1 for i in live],
            )
            position += 1

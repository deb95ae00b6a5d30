"""`ChatSession`: a conversation with a model, rendered with its chat template by the one renderer.

    session = ChatSession(engine, system="You are terse.", few_shot=[("2+2?", "4")], seed=0)
    session.send("3+3?")                                   # -> the reply text
    for piece in session.stream("and 4+4?"): print(piece, end="")
    session.regenerate(); session.reset(); session.history

The context the model sees is: the system prompt, the few-shot exchanges (as earlier user/assistant turns: in-context
learning), then the history, rendered by `flywheel.tokenization.render_prompt` exactly as SFT/RM/PPO render prompts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from flywheel.engine.engine import Engine, TextStream
from flywheel.engine.params import SamplingParams
from flywheel.errors import UserError
from flywheel.tokenization import render_prompt

log = logging.getLogger(__name__)


class ChatSession:
    """History of user/assistant turns plus a system prompt and few-shot examples.

    seed: when set (and a call's params have no seed), reply k of the session is sampled with seed + k, so a script
    is reproducible and /regenerate still gives a new answer. Oldest exchanges are dropped (and logged) when the
    context would not leave room for `max_new_tokens`.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any | None = None,
        *,
        system: str | None = None,
        few_shot: Sequence[tuple[str, str]] = (),
        params: SamplingParams | None = None,
        seed: int | None = None,
    ):
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        if self.tokenizer is None:
            raise UserError("a chat session needs a tokenizer")
        self.system = system
        self.few_shot = [(str(user), str(assistant)) for user, assistant in few_shot]
        self.params = params or SamplingParams()
        self.seed = seed
        self.history: list[dict[str, str]] = []  # this session's turns: {"role": "user"|"assistant", "content"}
        self.last: TextStream | None = None  # the latest reply's stream (tokens, logprobs, finish_reason)
        self._replies = 0

    def messages(self) -> list[dict[str, str]]:
        """The whole context: system prompt, few-shot turns, history."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for user, assistant in self.few_shot:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out + self.history

    def send(self, text: str, params: SamplingParams | None = None) -> str:
        return "".join(self.stream(text, params))

    def stream(self, text: str, params: SamplingParams | None = None) -> Iterator[str]:
        """Add a user turn and stream the reply. The reply joins the history when the stream ends (or is closed)."""
        if not isinstance(text, str) or not text.strip():
            raise UserError("empty message")
        self.history.append({"role": "user", "content": text})
        try:
            return self._reply(params)
        except BaseException:
            self.history.pop()
            raise

    def regenerate(self, params: SamplingParams | None = None) -> str:
        return "".join(self.regenerate_stream(params))

    def regenerate_stream(self, params: SamplingParams | None = None) -> Iterator[str]:
        """Replace the last reply with a new sample."""
        if not self.history or self.history[-1]["role"] != "assistant":
            raise UserError("nothing to regenerate: no reply yet")
        last = self.history.pop()
        try:
            return self._reply(params)
        except BaseException:
            self.history.append(last)
            raise

    def reset(self) -> None:
        """Forget the history (the system prompt and few-shot examples stay)."""
        self.history.clear()

    def _params(self, params: SamplingParams | None) -> SamplingParams:
        params = params or self.params
        if params.seed is None and self.seed is not None:
            params = dataclasses.replace(params, seed=self.seed + self._replies)
        return params

    def _prompt(self, max_new_tokens: int) -> list[int]:
        ids = render_prompt(self.tokenizer, self.messages())
        ctx = self.engine.context_length
        while ctx is not None and len(ids) + max_new_tokens > ctx and len(self.history) > 1:
            del self.history[:2]  # the oldest exchange (history alternates user, assistant, ..., user)
            log.info("chat: dropped the oldest exchange to fit the context (%d tokens)", ctx)
            ids = render_prompt(self.tokenizer, self.messages())
        return ids

    def _reply(self, params: SamplingParams | None) -> Iterator[str]:
        params = self._params(params)
        stream = self.engine.stream(self._prompt(params.max_new_tokens), params)  # validates before any yield
        self._replies += 1
        self.last = stream
        return self._collect(stream)

    def _collect(self, stream: TextStream) -> Iterator[str]:
        try:
            yield from stream
        finally:
            stream.close()
            self.history.append({"role": "assistant", "content": stream.text})

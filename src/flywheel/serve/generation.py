"""Async side of the batching worker: submit a request, then await its events on the event loop (never blocking)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from flywheel.engine import SamplingParams
from flywheel.serve.errors import ApiError
from flywheel.serve.worker import BatchWorker, Event, GenRequest

WATCHDOG_S = 1.0
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client of a request answered in one piece went away before the answer: its run was cancelled."""


def _error(event: Event) -> ApiError:
    """("error", status, message[, param, code])."""
    status, message = event[1], event[2]
    param, code = event[3:5] if len(event) >= 5 else (None, None)
    return ApiError(status, message, param=param, code=code or ("generation_failed" if status >= 500 else None))


@dataclass
class Result:
    version: str
    prompt_tokens: int
    texts: list[str]
    finish_reasons: list[str | None]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[list[dict[str, Any]]] | None = None  # per choice, when asked for


class Run:
    """One request in the worker. `await run.started()` first (it raises the worker's errors as `ApiError`)."""

    def __init__(
        self,
        worker: BatchWorker,
        messages: list[dict[str, str]],
        params: SamplingParams,
        *,
        n: int = 1,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        incremental: bool = True,
    ):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.req = GenRequest(
            messages,
            params,
            emit=lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev),
            n=n,
            stop=list(stop),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            incremental=incremental,
        )
        self.version = ""
        self.prompt_tokens = 0
        self.worker = worker
        worker.submit(self.req)

    async def _next(self) -> Event:
        """The next event; while waiting, check every second that the worker thread is alive (restart it if not:
        a dead worker fails the requests it held, so no request waits forever)."""
        if not self.queue.empty():
            return self.queue.get_nowait()
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=WATCHDOG_S)
            except asyncio.TimeoutError:
                self.worker.ensure_running()  # quick, on the loop (the thread pool may be full of database calls)

    async def started(self) -> None:
        event = await self._next()
        if event[0] == "error":
            raise _error(event)
        _, self.version, self.prompt_tokens = event

    async def events(self) -> AsyncIterator[Event]:
        """("delta", choice, text, logprobs) and ("done", choice, finish_reason, tokens) until the request ends."""
        while True:
            event = await self._next()
            if event[0] == "end":
                return
            if event[0] == "error":
                raise _error(event)
            yield event

    def cancel(self) -> None:
        self.req.cancelled.set()

    async def collect(self, request: Request | None = None) -> Result:
        """The whole answer. With the HTTP `request` it is for, the run is cancelled (and `ClientGone` raised) as
        soon as its client disconnects, as a stream's is: nothing is generated for no one."""
        if request is None:
            return await self._collect()
        task = asyncio.ensure_future(self._collect())
        try:
            while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    self.cancel()
                    raise ClientGone
            return task.result()
        finally:
            task.cancel()

    async def _collect(self) -> Result:
        await self.started()
        n = self.req.n
        result = Result(self.version, self.prompt_tokens, [""] * n, [None] * n, [0] * n)
        if self.req.logprobs:
            result.logprobs = [[] for _ in range(n)]
        async for event in self.events():
            if event[0] == "delta":
                result.texts[event[1]] += event[2]
                if result.logprobs is not None and event[3]:
                    result.logprobs[event[1]].extend(event[3])
            elif event[0] == "done":
                result.finish_reasons[event[1]], result.tokens[event[1]] = event[2], event[3]
        return result

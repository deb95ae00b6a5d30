"""The batching worker: one thread owns the engine; requests from any thread are batched into it.

    worker = BatchWorker(ServedModel.load("runs/sft/final"), max_batch=32)
    worker.start()
    worker.submit(GenRequest(messages, n=2, params=SamplingParams(max_new_tokens=64), stop=["\n\n"], emit=callback))

Dynamic batching: the worker takes every request waiting (up to `max_batch` rows; a request with n choices is n
rows), groups them by sampling settings (the engine samples a batch with one temperature/top-p), and decodes each
group in one batch, each row with its own token budget. A request with a seed runs in a group of its own so that its
result does not depend on what else was waiting. Events go to each request's `emit` as tokens are produced:

    ("start", model_version, prompt_tokens)   ("delta", choice, text)   ("done", choice, finish_reason, tokens)
    ("end",)   ("error", http_status, message)

Prompts are rendered here, with the tokenizer of the model that serves the batch, so `swap` (a new model version,
applied between batches) never mixes one model's token ids with another's.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from flywheel.engine import Detokenizer, Engine, SamplingParams
from flywheel.engine.params import FINISH_LENGTH, FINISH_STOP
from flywheel.errors import UserError
from flywheel.tokenization import render_prompt

log = logging.getLogger(__name__)
Event = tuple[Any, ...]
_HASH_LIMIT = 256 << 20  # files larger than this are identified by size and header instead of their full content


def model_version(path: str | Path) -> str:
    """A readable, content-derived id: `<parent>-<dir>-<8 hex of the config and weights>`."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
            digest.update(f.name.encode())
            size = f.stat().st_size
            digest.update(str(size).encode())
            with f.open("rb") as fh:
                digest.update(fh.read(_HASH_LIMIT if size <= _HASH_LIMIT else 1 << 20))
    return f"{path.parent.name}-{path.name}-{digest.hexdigest()[:8]}"


@dataclass
class ServedModel:
    engine: Engine
    tokenizer: Any
    version: str
    path: str

    @classmethod
    def load(cls, path: str | Path, *, dtype: str = "float32", backend: str = "auto") -> ServedModel:
        from flywheel.models import load_causal_lm
        from flywheel.tokenization import load_tokenizer

        tokenizer = load_tokenizer(str(path))
        model = load_causal_lm(str(path), dtype=dtype)
        model.eval()
        engine = Engine(model, tokenizer, backend=backend)  # type: ignore[arg-type]
        return cls(engine, tokenizer, model_version(path), str(Path(path).resolve()))


@dataclass
class GenRequest:
    messages: list[dict[str, str]]  # the conversation; the model writes the next assistant turn
    params: SamplingParams
    emit: Callable[[Event], None]  # called from the worker thread
    n: int = 1  # choices (rows) for this prompt
    stop: list[str] = field(default_factory=list)  # strings that end a choice (not included in its text)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    req: GenRequest
    choice: int
    detok: Detokenizer
    budget: int
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    tokens: int = 0
    finished: bool = False


class BatchWorker:
    def __init__(self, model: ServedModel, *, max_batch: int = 32, threads: int | None = None):
        self.model = model
        self.max_batch = max_batch
        self.threads = threads
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
        self._pending: tuple[ServedModel, Future[str]] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="flywheel-batch-worker", daemon=True)
        self._stopping = False
        self.stats = {"batches": 0, "rows": 0, "requests": 0, "max_rows": 0}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, req: GenRequest) -> None:
        if req.n < 1 or req.n > self.max_batch:
            raise UserError(f"n must be between 1 and {self.max_batch}")
        self._queue.put(req)

    def swap(self, model: ServedModel) -> Future[str]:
        """Serve `model` from the next batch on; the future resolves to its version once it is live."""
        done: Future[str] = Future()
        with self._lock:
            self._pending = (model, done)
        self._queue.put(None)  # wake an idle worker
        return done

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        carry: list[GenRequest] = []
        while not self._stopping:
            self._apply_swap()
            batch = carry or [self._queue.get()]
            carry = []
            rows = sum(r.n for r in batch if r is not None)
            while rows < self.max_batch:
                try:
                    req = self._queue.get_nowait()
                except queue.Empty:
                    break
                if req is not None and rows + req.n > self.max_batch:
                    carry.append(req)
                    break
                batch.append(req)
                rows += req.n if req is not None else 0
            live = [r for r in batch if r is not None and not r.cancelled.is_set()]
            self._apply_swap()
            for group in _groups(live):
                self._run_group(group)

    def _apply_swap(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            model, done = pending
            old, self.model = self.model.version, model
            log.info("serving model version %s (was %s)", model.version, old)
            done.set_result(model.version)

    def _run_group(self, group: list[GenRequest]) -> None:
        model = self.model
        engine, prompts, rows, reqs = model.engine, [], [], []
        for req in group:
            try:
                ids = render_prompt(model.tokenizer, req.messages)
                if engine.context_length is not None and len(ids) >= engine.context_length:
                    raise UserError(
                        f"the prompt has {len(ids)} tokens; this model's context is {engine.context_length} tokens"
                    )
            except UserError as err:
                _emit(req, ("error", 400, str(err)))
                continue
            _emit(req, ("start", model.version, len(ids)))
            reqs.append(req)
            for choice in range(req.n):
                prompts.append(ids)
                rows.append(_Row(req, choice, Detokenizer(model.tokenizer), req.params.max_new_tokens))
        if not rows:
            return
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["requests"] += len(reqs)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        params = replace(group[0].params, max_new_tokens=max(r.budget for r in rows))
        try:
            self._decode(engine, prompts, rows, params)
        except Exception as err:  # noqa: BLE001 (one bad batch must not stop the server)
            log.exception("generation failed")
            status, message = (400, str(err)) if isinstance(err, UserError) else (500, "internal error in generation")
            for req in reqs:
                _emit(req, ("error", status, message))
            return
        for req in reqs:
            _emit(req, ("end",))

    def _decode(self, engine: Engine, prompts: list[list[int]], rows: list[_Row], params: SamplingParams) -> None:
        stop_ids = set(engine.stop_ids_for(params))
        steps = engine.steps(prompts, params, max_new_tokens=[r.budget for r in rows])
        try:
            for step in steps:
                for i, token, done in zip(step.rows, step.tokens, step.done, strict=True):
                    row = rows[i]
                    if row.finished:
                        continue
                    if row.req.cancelled.is_set():
                        row.finished = True
                        continue
                    row.tokens += 1
                    if token in stop_ids:
                        self._finish(row, FINISH_STOP)
                        continue
                    row.text += row.detok.push(token)
                    if _cut_at_stop(row):
                        self._finish(row, FINISH_STOP, flush=False)
                    elif done:
                        self._finish(row, FINISH_LENGTH)
                    else:
                        self._send(row, final=False)
                if all(r.finished for r in rows):
                    break
        finally:
            steps.close()
        for row in rows:
            if not row.finished:
                self._finish(row, FINISH_LENGTH)

    def _send(self, row: _Row, *, final: bool) -> None:
        hold = 0 if final or not row.req.stop else max(len(s) for s in row.req.stop) - 1
        end = max(row.sent, len(row.text) - hold)
        if end > row.sent:
            _emit(row.req, ("delta", row.choice, row.text[row.sent : end]))
            row.sent = end

    def _finish(self, row: _Row, reason: str, *, flush: bool = True) -> None:
        if flush:
            row.text += row.detok.flush()
            if _cut_at_stop(row):
                reason = FINISH_STOP
        self._send(row, final=True)
        row.finished = True
        _emit(row.req, ("done", row.choice, reason, row.tokens))


def _cut_at_stop(row: _Row) -> bool:
    """Cut the row's text at the first stop string; True if one was found."""
    cuts = [row.text.find(s) for s in row.req.stop if s]
    cuts = [c for c in cuts if c >= 0]
    if not cuts:
        return False
    row.text = row.text[: min(cuts)]
    row.sent = min(row.sent, len(row.text))
    return True


def _groups(reqs: list[GenRequest]) -> list[list[GenRequest]]:
    groups: dict[Any, list[GenRequest]] = {}
    for i, req in enumerate(reqs):
        p = req.params
        key = (
            p.temperature,
            p.top_k,
            p.top_p,
            tuple(p.stop_token_ids or ()),
            p.stop_token_ids is None,
            i if p.seed is not None else None,
        )
        groups.setdefault(key, []).append(req)
    return list(groups.values())


def _emit(req: GenRequest, event: Event) -> None:
    try:
        req.emit(event)
    except RuntimeError:  # the request's event loop is gone (the client left, the server is stopping)
        req.cancelled.set()

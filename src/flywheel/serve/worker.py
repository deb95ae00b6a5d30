"""The batching worker: one thread owns the engine; requests from any thread are batched into it.

    worker = BatchWorker(ServedModel.load("runs/sft/final"), max_batch=32)
    worker.start()
    worker.submit(GenRequest(messages, n=2, params=SamplingParams(max_new_tokens=64), stop=["\n\n"], emit=callback))

Dynamic batching: the worker takes every request waiting (up to `max_batch` rows; a request with n choices is n
rows), groups them by sampling settings (the engine samples a batch with one temperature/top-p), and decodes each
group in one batch, each row with its own token budget. A request with a seed runs in a group of its own so that its
result does not depend on what else was waiting. Events go to each request's `emit` as tokens are produced:

    ("start", model_version, prompt_tokens)   ("delta", choice, text, logprobs)
    ("done", choice, finish_reason, tokens)   ("end",)   ("error", http_status, message)

`logprobs` is None unless the request asked for them (`GenRequest.logprobs`): then it lists the entries
(`flywheel.serve.logprobs.TokenPieces.entry`) of the tokens whose text the delta completes, with the
`top_logprobs` most likely alternatives of each.

Faults stay with the request that caused them: a prompt that cannot be rendered or tokenized fails that request alone
(400 for bad input, 500 for anything else, logged with its traceback); a batch whose decoding fails before any output
is retried one request at a time, so only the culprit fails; an error while detokenizing one row fails only its
request. If the loop itself raises, the requests of the batch in hand get a 500 and the loop starts again; if the
thread dies anyway, `ensure_running` (called by every waiting request) starts a new one. `health()` reports it.
Generated text never carries NUL characters (no database can store them): they are removed and counted.

Prompts are rendered here, with the tokenizer of the model that serves the batch, so `swap` (a new model version,
applied between batches) never mixes one model's token ids with another's.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from flywheel.engine import Detokenizer, Engine, SamplingParams
from flywheel.engine.params import FINISH_LENGTH, FINISH_STOP
from flywheel.errors import UserError
from flywheel.serve.logprobs import TokenPieces, TopLogprobs, top_logprobs_after
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
    pieces: TokenPieces | None = field(default=None, repr=False)  # token texts for log-probs

    def __post_init__(self) -> None:
        if self.pieces is None:
            self.pieces = TokenPieces(self.tokenizer)

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
    ended: bool = False  # its last event ("end" or "error") has been sent
    logprobs: bool = False  # send each token's log-prob with the text
    top_logprobs: int = 0  # and this many most likely alternatives at each position
    incremental: bool = True  # False: the caller only wants the whole answer (alternatives are then found at the end)


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
    emitted: bool = False  # something was sent for this row (a retry would repeat it)
    nul: int = 0  # NUL characters removed from the text
    pending: list[tuple[int, int, dict[str, Any], int]] = field(default_factory=list)  # (start, end, entry, id)
    top: TopLogprobs | None = None  # alternatives token by token (streamed requests)
    prompt: list[int] = field(default_factory=list)


class BatchWorker:
    def __init__(self, model: ServedModel, *, max_batch: int = 32, threads: int | None = None):
        self.model = model
        self.max_batch = max_batch
        self.threads = threads
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
        self._pending: tuple[ServedModel, Future[str]] | None = None
        self._lock = threading.Lock()
        self._restart_lock = threading.Lock()
        self._thread = self._new_thread()
        self._started = False
        self._stopping = False
        self._carry: list[GenRequest] = []  # taken from the queue, left for the next batch (it was full)
        self._active: list[GenRequest] = []  # the batch being decoded
        self._busy_since: float | None = None
        self.last_error: str | None = None
        self.stats = {
            "batches": 0,
            "rows": 0,
            "requests": 0,
            "max_rows": 0,
            "failed_requests": 0,
            "restarts": 0,
            "nul_removed": 0,
        }

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._run, name="flywheel-batch-worker", daemon=True)

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, req: GenRequest) -> None:
        if req.n < 1 or req.n > self.max_batch:
            raise UserError(f"n must be between 1 and {self.max_batch}")
        self.ensure_running()
        self._queue.put(req)

    def swap(self, model: ServedModel) -> Future[str]:
        """Serve `model` from the next batch on; the future resolves to its version once it is live."""
        done: Future[str] = Future()
        with self._lock:
            self._pending = (model, done)
        self._queue.put(None)  # wake an idle worker
        return done

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def ensure_running(self) -> bool:
        """Start a new worker thread if the current one has died; True if it had to."""
        with self._restart_lock:
            if not self._started or self._stopping or self._thread.is_alive():
                return False
            log.error("the batch worker thread had died; starting a new one")
            self._fail_active("the generation worker stopped unexpectedly")
            self.stats["restarts"] += 1
            self._thread = self._new_thread()
            self._thread.start()
            return True

    def health(self) -> dict[str, Any]:
        self.ensure_running()
        busy = self._busy_since
        return {
            "alive": self.alive,
            "restarts": self.stats["restarts"],
            "queued_requests": self._queue.qsize() + len(self._carry),
            "running_requests": len(self._active),
            "busy_seconds": None if busy is None else round(time.monotonic() - busy, 3),
            "failed_requests": self.stats["failed_requests"],
            "last_error": self.last_error,
        }

    def _run(self) -> None:
        """The thread: the batching loop, started again (after failing the batch in hand) if it raises."""
        if self.threads:
            torch.set_num_threads(self.threads)
        while not self._stopping:
            try:
                self._loop()
            except Exception as err:  # noqa: BLE001 (the worker must outlive any bug)
                log.exception("the batch worker failed; restarting its loop")
                self._record(err)
                self._fail_active("internal error in the generation worker")
                self.stats["restarts"] += 1

    def _record(self, err: BaseException) -> None:
        """Keep the latest internal error for /health: its type and time only (its message may quote user text;
        the log has the traceback)."""
        self.last_error = f"{type(err).__name__} at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"

    def _fail_active(self, message: str) -> None:
        for req in self._active:
            if not req.ended:
                self.stats["failed_requests"] += 1
                _emit(req, ("error", 500, message))
        self._active = []
        self._busy_since = None

    def _loop(self) -> None:
        while not self._stopping:
            self._apply_swap()
            batch = self._carry or [self._queue.get()]
            self._carry = []
            rows = sum(r.n for r in batch if r is not None)
            while rows < self.max_batch:
                try:
                    req = self._queue.get_nowait()
                except queue.Empty:
                    break
                if req is not None and rows + req.n > self.max_batch:
                    self._carry.append(req)
                    break
                batch.append(req)
                rows += req.n if req is not None else 0
            self._active = [r for r in batch if r is not None and not r.cancelled.is_set()]
            self._busy_since = time.monotonic()
            self._apply_swap()
            for group in _groups(self._active):
                self._run_group(group)
            self._active = []
            self._busy_since = None

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
        ready = [(req, ids) for req in group if (ids := self._prepare(model, req)) is not None]
        for req, ids in ready:
            _emit(req, ("start", model.version, len(ids)))
        self._generate(model, ready)

    def _prepare(self, model: ServedModel, req: GenRequest) -> list[int] | None:
        """The request's prompt ids, or None after failing it (400 for bad input, 500 for anything else)."""
        engine = model.engine
        try:
            req.params.validate()
            check_seed(req.params.seed)
            for i, m in enumerate(req.messages):
                check_text(m["content"], f"messages[{i}].content")
            ids = render_prompt(model.tokenizer, req.messages)
            bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
            if bad is not None:
                raise UserError(f"the prompt has token id {bad}, outside this model's vocabulary")
            if engine.context_length is not None and len(ids) >= engine.context_length:
                raise UserError(
                    f"the prompt has {len(ids)} tokens; this model's context is {engine.context_length} tokens"
                )
            return ids
        except UserError as err:
            _emit(req, ("error", 400, str(err)))
        except Exception as err:  # noqa: BLE001 (one request's bug fails that request only)
            log.exception("rendering a prompt failed")
            self._record(err)
            self.stats["failed_requests"] += 1
            _emit(req, ("error", 500, "internal error while rendering the prompt"))
        return None

    def _generate(self, model: ServedModel, ready: list[tuple[GenRequest, list[int]]]) -> None:
        """Decode the prepared requests as one batch. If it fails before anything was sent, each request is retried
        alone, so that one request's failure is its own; otherwise every request of the batch gets the error."""
        if not ready:
            return
        prompts: list[list[int]] = []
        rows: list[_Row] = []
        try:
            for req, ids in ready:
                for choice in range(req.n):
                    prompts.append(ids)
                    row = _Row(req, choice, Detokenizer(model.tokenizer), req.params.max_new_tokens, prompt=ids)
                    if req.logprobs and req.top_logprobs > 0 and req.incremental:
                        row.top = TopLogprobs(
                            model.engine.model, ids, k=req.top_logprobs, temperature=req.params.temperature
                        )
                    rows.append(row)
            self.stats["batches"] += 1
            self.stats["rows"] += len(rows)
            self.stats["requests"] += len(ready)
            self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
            params = replace(ready[0][0].params, max_new_tokens=max(r.budget for r in rows))
            self._decode(model, prompts, rows, params)
        except Exception as err:  # noqa: BLE001 (one bad batch must not stop the server)
            if len(ready) > 1 and not any(r.emitted for r in rows):
                log.warning("a batch of %d requests failed (%r); retrying them one at a time", len(ready), err)
                for item in ready:
                    self._generate(model, [item])
                return
            log.error("generation failed", exc_info=err)
            self._record(err)
            status, message = (400, str(err)) if isinstance(err, UserError) else (500, "internal error in generation")
            for req, _ in ready:
                if not req.ended:
                    self.stats["failed_requests"] += status >= 500
                    _emit(req, ("error", status, message))
            return
        for req, _ in ready:
            if not req.ended:
                _emit(req, ("end",))

    def _decode(self, model: ServedModel, prompts: list[list[int]], rows: list[_Row], params: SamplingParams) -> None:
        engine: Engine = model.engine
        stop_ids = set(engine.stop_ids_for(params))
        steps = engine.steps(prompts, params, max_new_tokens=[r.budget for r in rows])
        try:
            for step in steps:
                for i, token, logprob, done in zip(step.rows, step.tokens, step.logprobs, step.done, strict=True):
                    row = rows[i]
                    if row.finished:
                        continue
                    if row.req.cancelled.is_set() or row.req.ended:
                        row.finished = True
                        continue
                    try:
                        self._advance(model, row, token, logprob, done, stop_ids)
                    except Exception as err:  # noqa: BLE001 (fails this row's request only)
                        self._fail_request(rows, row.req, err)
                if all(r.finished for r in rows):
                    break
        finally:
            steps.close()
        for row in rows:
            if not row.finished:
                try:
                    self._finish(row, FINISH_LENGTH)
                except Exception as err:  # noqa: BLE001
                    self._fail_request(rows, row.req, err)

    def _advance(
        self, model: ServedModel, row: _Row, token: int, logprob: float, done: bool, stop_ids: set[int]
    ) -> None:
        row.tokens += 1
        if token in stop_ids:
            self._finish(row, FINISH_STOP)
            return
        start = len(row.text)
        self._append(row, row.detok.push(token))
        if row.req.logprobs:
            top = row.top.top() if row.top is not None else None
            row.pending.append((start, len(row.text), model.pieces.entry(token, logprob, top), token))
            if row.top is not None and not done:
                row.top.push(token)
        if _cut_at_stop(row):
            self._finish(row, FINISH_STOP, flush=False)
        elif done:
            self._finish(row, FINISH_LENGTH)
        else:
            self._send(row, final=False)

    def _fail_request(self, rows: list[_Row], req: GenRequest, err: Exception) -> None:
        log.error("generation failed for one request", exc_info=err)
        self._record(err)
        for row in rows:
            if row.req is req:
                row.finished = True
        if not req.ended:
            self.stats["failed_requests"] += 1
            _emit(req, ("error", 500, "internal error in generation"))

    def _append(self, row: _Row, piece: str) -> None:
        if "\x00" in piece:
            removed = piece.count("\x00")
            row.nul += removed
            self.stats["nul_removed"] += removed
            piece = piece.replace("\x00", "")
        row.text += piece

    def _send(self, row: _Row, *, final: bool) -> None:
        hold = 0 if final or not row.req.stop else max(len(s) for s in row.req.stop) - 1
        end = max(row.sent, len(row.text) - hold)
        entries = None
        req = row.req
        if req.logprobs and (final or req.incremental or not req.top_logprobs):
            if final and req.top_logprobs and not req.incremental:
                self._fill_top(row)
            # Tokens whose text is all sent go with it; at the end also those cut by a stop string (partly sent);
            # tokens wholly after the cut (the stop string's own) are dropped.
            entries = [e for s, t, e, _ in row.pending if t <= end or (final and s < end)]
            row.pending = [] if final else [p for p in row.pending if p[1] > end]
        if end > row.sent or entries:
            row.emitted = True
            _emit(row.req, ("delta", row.choice, row.text[row.sent : end], entries))
            row.sent = end

    def _fill_top(self, row: _Row) -> None:
        """The alternatives of a whole answer from one forward over it (cheaper than one forward per token)."""
        if not row.pending:
            return
        tokens = [p[3] for p in row.pending]
        tops = top_logprobs_after(
            self.model.engine.model, row.prompt, tokens, k=row.req.top_logprobs, temperature=row.req.params.temperature
        )
        for (_, _, entry, _), top in zip(row.pending, tops, strict=True):
            entry["top_logprobs"] = self.model.pieces.alternatives(top)

    def _finish(self, row: _Row, reason: str, *, flush: bool = True) -> None:
        if flush:
            self._append(row, row.detok.flush())
            if _cut_at_stop(row):
                reason = FINISH_STOP
        self._send(row, final=True)
        row.finished = row.emitted = True
        if row.nul:
            log.warning("removed %d NUL characters from a generated answer (model %s)", row.nul, self.model.version)
        _emit(row.req, ("done", row.choice, reason, row.tokens))


def check_seed(seed: int | None) -> None:
    """Seeds the sampler accepts: integers in [-2**63, 2**64) (torch.Generator.manual_seed's range)."""
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise UserError(f"seed must be an integer in [-2**63, 2**64), got {seed}")


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored or tokenized (a NUL character, a lone surrogate), or None if it can."""
    nul = text.find("\x00")
    if nul >= 0:
        return f"contains a NUL character (U+0000) at position {nul}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"contains a lone surrogate (U+{ord(text[err.start]):04X}) at position {err.start}: not valid Unicode"
    return None


def check_text(text: Any, where: str) -> None:
    reason = unstorable(text) if isinstance(text, str) else None
    if reason is not None:
        raise UserError(f"{where} {reason}")


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
    if req.ended:
        return
    if event[0] in ("end", "error"):
        req.ended = True
    try:
        req.emit(event)
    except RuntimeError:  # the request's event loop is gone (the client left, the server is stopping)
        req.cancelled.set()
    except Exception:  # noqa: BLE001 (a broken callback is its request's problem, not the worker's)
        log.exception("a request's event callback failed")
        req.cancelled.set()

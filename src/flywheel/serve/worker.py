"""The batching worker: one thread owns the engine; requests from any thread are batched into it.

    worker = BatchWorker(ServedModel.load("runs/sft/final"), max_batch=32)
    worker.start()
    worker.submit(GenRequest(messages, n=2, params=SamplingParams(max_new_tokens=64), stop=["\n\n"], emit=callback))

Continuous batching (iteration-level scheduling, on the engine's `DecodeBatch`): between two decoding steps, the
requests waiting join the running batch (up to `max_batch` rows; a request with n choices is n rows, all from one
prefill of its prompt), and a row leaves the batch as soon as it finishes, so a short request never waits for a long
one to end. Each request samples with its own settings and budget; the requests that join together are prefilled in one
forward (one per number of choices); a request with a seed draws from its own generator, so its tokens do not depend on
what else runs beside it (up to floating-point effects of the batch's shape). `batching="dynamic"` is the former
scheduling, kept for comparison (bench/serve_load.py): requests join only when the batch is empty.

Events go to each request's `emit` as tokens are produced:

    ("start", model_version, prompt_tokens)   ("delta", choice, text, logprobs)
    ("done", choice, finish_reason, tokens)   ("end",)   ("error", http_status, message[, param, code])

`logprobs` is None unless the request asked for them (`GenRequest.logprobs`): then it lists the entries
(`flywheel.serve.logprobs.TokenPieces.entry`) of the tokens whose text the delta completes, with the
`top_logprobs` most likely alternatives of each.

Faults stay with the request that caused them: a prompt that cannot be rendered or tokenized fails that request alone
(400 for bad input, 500 for anything else, logged with its traceback); a prefill of several requests that fails is
retried one request at a time, so only the culprit fails; an error while detokenizing one row fails only its
request; a decoding step that fails fails the requests in the batch, and the next ones start a new batch. If the loop
itself raises, the requests of the batch in hand get a 500 and the loop starts again; if the
thread dies anyway, `ensure_running` (called by every waiting request) starts a new one. `health()` reports it.
Generated text never carries NUL characters (no database can store them): they are removed and counted.

Prompts are rendered here, with the tokenizer of the model that serves the batch, so `swap` (a new model version:
no request joins once it is pending, and it is applied when the running batch has drained) never mixes one model's
token ids with another's.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flywheel.data.formats import lone_surrogate
from flywheel.engine import Detokenizer, Engine, SamplingParams
from flywheel.engine.loop import DecodeBatch
from flywheel.engine.params import FINISH_LENGTH, FINISH_STOP
from flywheel.errors import UserError
from flywheel.serve.logprobs import TokenPieces, TopLogprobs, top_logprobs_after
from flywheel.tokenization import render_prompt, special_text

log = logging.getLogger(__name__)
BATCHING = ("continuous", "dynamic")
# Each join is a prefill (the compact forward then writes the new rows into free rows of the running cache, copying
# nothing else), so waiting requests join together: as soon as they are JOIN_RATIO of the running rows, or after
# MAX_WAIT_STEPS steps. bench/serve_load.py, 32 clients: joining whenever a request waits measured the same
# throughput (within the runs' +-5%); a short request behind a long one joins at once (1 >= 0.25 of 1 row).
JOIN_RATIO = 0.25
MAX_WAIT_STEPS = 8
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
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    tokens: int = 0
    finished: bool = False
    nul: int = 0  # NUL characters removed from the text
    pending: list[tuple[int, int, dict[str, Any], int]] = field(default_factory=list)  # (start, end, entry, id)
    top: TopLogprobs | None = None  # alternatives token by token (streamed requests)
    prompt: list[int] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()  # the token ids that end it


class BatchWorker:
    def __init__(
        self,
        model: ServedModel,
        *,
        max_batch: int = 32,
        threads: int | None = None,
        batching: str = "continuous",
    ):
        if batching not in BATCHING:
            raise UserError(f"unknown batching '{batching}' (choose from {', '.join(BATCHING)})")
        self.model = model
        self.max_batch = max_batch
        self.batching = batching
        self.threads = threads
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
        self._pending: tuple[ServedModel, Future[str]] | None = None
        self._lock = threading.Lock()
        self._restart_lock = threading.Lock()
        self._thread = self._new_thread()
        self._started = False
        self._stopping = False
        self._carry: list[GenRequest] = []  # taken from the queue, left for the next batch (it was full)
        self._active: list[GenRequest] = []  # the requests in the running batch
        self._rows: dict[int, _Row] = {}  # the running batch's rows by engine row id
        self._open: dict[int, int] = {}  # rows not yet finished, by id() of their request
        self._busy_since: float | None = None
        self.last_error: str | None = None
        self.stats = {
            "batches": 0,  # prefills (requests joining the running batch together)
            "steps": 0,  # decoding steps
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
        self._rows = {}
        self._open = {}
        self._busy_since = None

    def _loop(self) -> None:
        """Continuous batching: requests join the running batch between decoding steps (a waiting request starts at
        the next step, not when the batch ends) and leave it when they finish. A pending model swap stops new
        requests from joining; it is applied when the batch has drained."""
        while not self._stopping:
            self._apply_swap()
            model = self.model
            batch = model.engine.batch()
            self._admit(model, batch, block=True)
            waited = 0  # steps since a request started waiting
            while self._rows and not self._stopping:
                waiting = self._queue.qsize() + len(self._carry)
                waited = waited + 1 if waiting else 0
                if (
                    self.batching == "continuous"
                    and self._pending is None
                    and (waiting >= JOIN_RATIO * len(self._rows) or waited > MAX_WAIT_STEPS)
                    and batch.joinable
                ):
                    self._admit(model, batch, block=False)
                    waited = 0
                self._step(model, batch)
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

    def _take(self, block: bool) -> list[GenRequest]:
        """Requests from the queue that fit in the batch's free rows (blocking for the first when `block`)."""
        free = self.max_batch - len(self._rows)
        taken: list[GenRequest] = []
        while True:
            if self._carry:
                req = self._carry.pop(0)
            else:
                try:
                    req = self._queue.get(timeout=None) if block and not taken else self._queue.get_nowait()
                except queue.Empty:
                    break
            if req is None:  # a wake-up (a swap, or stop)
                if block and not taken:
                    return taken
                continue
            if req.cancelled.is_set():
                continue
            if req.n > free:
                self._carry.insert(0, req)
                break
            taken.append(req)
            free -= req.n
        return taken

    def _admit(self, model: ServedModel, batch: DecodeBatch, *, block: bool) -> None:
        """Prefill the waiting requests that fit and let them join `batch`: requests with the same number of choices
        in one prefill, each with its own settings (a request's n choices from one prefill of its prompt); if a
        prefill fails, its requests are tried one by one, so that only the culprit fails."""
        taken = self._take(block)
        if not taken:
            return
        if not self._rows:
            self._busy_since = time.monotonic()
        self._active.extend(taken)  # from here on, a bug in the loop fails them (`_fail_active`), never loses them
        ready = [(req, ids) for req in taken if (ids := self._prepare(model, req)) is not None]
        for group in _groups(ready):
            self._join(model, batch, group)
        self._active = [r for r in self._active if not r.ended]

    def _join(self, model: ServedModel, batch: DecodeBatch, group: list[tuple[GenRequest, list[int]]]) -> None:
        first = group[0][0]
        try:
            ids = batch.add([ids for _, ids in group], [req.params for req, _ in group], samples=first.n)
        except Exception as err:  # noqa: BLE001 (one request's failure is its own)
            if len(group) > 1:
                log.warning("a prefill of %d requests failed (%r); trying them one at a time", len(group), err)
                for item in group:
                    self._join(model, batch, [item])
                return
            req = first
            if isinstance(err, UserError):
                _emit(req, ("error", 400, str(err)))
            else:
                log.error("prefill failed", exc_info=err)
                self._record(err)
                self.stats["failed_requests"] += 1
                _emit(req, ("error", 500, "internal error in generation"))
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(group)
        self.stats["rows"] += len(ids)
        for i, (req, prompt) in enumerate(group):
            _emit(req, ("start", model.version, len(prompt)))
            self._open[id(req)] = req.n
            for choice in range(req.n):
                row = _Row(req, choice, Detokenizer(model.tokenizer), prompt=prompt)
                row.stop_ids = frozenset(model.engine.stop_ids_for(req.params))
                if req.logprobs and req.top_logprobs > 0 and req.incremental:
                    row.top = TopLogprobs(
                        model.engine.model, prompt, k=req.top_logprobs, temperature=req.params.temperature
                    )
                self._rows[ids[i * req.n + choice]] = row
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))

    def _step(self, model: ServedModel, batch: DecodeBatch) -> None:
        """One decoding step of the running batch; rows whose request ended or was cancelled leave it."""
        try:
            step = batch.step()
        except Exception as err:  # noqa: BLE001 (the forward failed: every request in the batch fails, not the server)
            log.error("a decoding step failed", exc_info=err)
            self._record(err)
            for row in list(self._rows.values()):
                self._fail(row.req, 500, "internal error in generation")
            self._rows.clear()
            return
        self.stats["steps"] += 1
        self._busy_since = time.monotonic()  # progress: busy_seconds times the step (or prefill) in hand
        for row_id, token, logprob, done in zip(step.rows, step.tokens, step.logprobs, step.done, strict=True):
            row = self._rows.get(row_id)
            if row is None:
                continue
            if row.req.cancelled.is_set() or row.req.ended:
                row.finished = True
            else:
                try:
                    self._advance(model, row, token, logprob, done)
                except Exception as err:  # noqa: BLE001 (fails this row's request only)
                    log.error("generation failed for one request", exc_info=err)
                    self._record(err)
                    self._fail(row.req, 500, "internal error in generation")
        self._retire(batch, step.done, step.rows)

    def _retire(self, batch: DecodeBatch, done: list[bool], stepped: list[int]) -> None:
        """Drop finished rows; rows that the engine still runs (cut by a stop string, cancelled, failed) leave the
        batch; a request whose rows have all finished ends."""
        ended = [i for i, r in self._rows.items() if r.finished or r.req.ended or r.req.cancelled.is_set()]
        engine_done = {i for i, d in zip(stepped, done, strict=True) if d}
        batch.cancel([i for i in ended if i not in engine_done])
        for i in ended:
            row = self._rows.pop(i)
            left = self._open.get(id(row.req), 0) - 1
            if left > 0:
                self._open[id(row.req)] = left
                continue
            self._open.pop(id(row.req), None)
            self._active = [r for r in self._active if r is not row.req]
            if not row.req.ended:
                _emit(row.req, ("end",))

    def _fail(self, req: GenRequest, status: int, message: str) -> None:
        for row in self._rows.values():
            if row.req is req:
                row.finished = True
        if not req.ended:
            self.stats["failed_requests"] += status >= 500
            _emit(req, ("error", status, message))

    def _prepare(self, model: ServedModel, req: GenRequest) -> list[int] | None:
        """The request's prompt ids, or None after failing it (400 for bad input, 500 for anything else)."""
        try:
            req.params.validate()
            check_seed(req.params.seed)
            return prompt_ids(model, req.messages)
        except PromptError as err:
            _emit(req, ("error", 400, str(err), err.param, err.code))
        except UserError as err:
            _emit(req, ("error", 400, str(err)))
        except Exception as err:  # noqa: BLE001 (one request's bug fails that request only)
            log.exception("rendering a prompt failed")
            self._record(err)
            self.stats["failed_requests"] += 1
            _emit(req, ("error", 500, "internal error while rendering the prompt"))
        return None

    def _advance(self, model: ServedModel, row: _Row, token: int, logprob: float, done: bool) -> None:
        row.tokens += 1
        if token in row.stop_ids:
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
        elif row.req.incremental:  # a caller that wants the whole answer gets it in one event, not one per token
            self._send(row, final=False)

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
        row.finished = True
        if row.nul:
            log.warning("removed %d NUL characters from a generated answer (model %s)", row.nul, self.model.version)
        _emit(row.req, ("done", row.choice, reason, row.tokens))


class PromptError(UserError):
    """A prompt the served model cannot take, with the request field it comes from and OpenAI's error code."""

    def __init__(self, message: str, *, param: str, code: str):
        super().__init__(message)
        self.param = param
        self.code = code


def prompt_ids(model: ServedModel, messages: Sequence[dict[str, str]]) -> list[int]:
    """The ids the model reads before it answers `messages`, or a UserError (a PromptError where a field is to
    blame): text that cannot be stored, a special token written out, ids outside the vocabulary, no room to answer.
    The worker checks every request with it; the web app checks a turn with it before storing the turn."""
    engine = model.engine
    for i, m in enumerate(messages):
        check_text(m["content"], f"messages[{i}].content")
        markup = special_text(model.tokenizer, m["content"])
        if markup is not None:  # it would render as the token: a forged turn boundary in what is logged
            raise PromptError(f"messages[{i}].content {markup}", param=f"messages.{i}.content", code="invalid_text")
    ids = render_prompt(model.tokenizer, list(messages))
    bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
    if bad is not None:
        raise UserError(f"the prompt has token id {bad}, outside this model's vocabulary")
    if engine.context_length is not None and len(ids) >= engine.context_length:
        raise PromptError(
            f"the prompt has {len(ids)} tokens; this model's context is {engine.context_length} tokens",
            param="messages",
            code="context_length_exceeded",  # OpenAI's code for it
        )
    return ids


def check_seed(seed: int | None) -> None:
    """Seeds the sampler accepts: integers in [-2**63, 2**64) (torch.Generator.manual_seed's range)."""
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise UserError(f"seed must be an integer in [-2**63, 2**64), got {seed}")


def unstorable(text: str) -> str | None:
    """Why `text` cannot be stored or tokenized (a NUL character, a lone surrogate), or None if it can."""
    nul = text.find("\x00")
    if nul >= 0:
        return f"contains a NUL character (U+0000) at position {nul}"
    return lone_surrogate(text)


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


def _groups(ready: list[tuple[GenRequest, list[int]]]) -> list[list[tuple[GenRequest, list[int]]]]:
    """Requests that share one prefill: those with the same number of choices (each keeps its own sampling settings,
    budget and seed: `DecodeBatch.add` takes one setting per prompt)."""
    groups: dict[int, list[tuple[GenRequest, list[int]]]] = {}
    for req, ids in ready:
        groups.setdefault(req.n, []).append((req, ids))
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

"""The FastAPI application: OpenAI-compatible `/v1`, the web app's `/api`, and the pages (chat, labeling, admin).

    app = create_app(ServeSettings(model="runs/sft/final", db="feedback.db"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

One process, one engine: the `BatchWorker` thread owns the model; request handlers only await its events, and database
calls run in threads, so the event loop never blocks. Every answer is logged with the model version that wrote it.

Bad input never reaches the database or the tokenizer: JSON bodies with a NUL character or a lone surrogate in any
string are answered 400 (`TextCheck`), ids beyond what the id columns hold 404 (`check_id`). Any other exception
is a 500 `server_error`, logged with its traceback, and the connection stays open for the client's next request
(`CatchAll`). `GET /health` reports the worker's liveness, the model version and the queue.
"""

from __future__ import annotations

import asyncio
import email.message
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flywheel.data.formats import find_bad_string
from flywheel.errors import UserError
from flywheel.feedback.models import ROLES
from flywheel.feedback.store import CLIENT_ID_PATTERN, UNIDENTIFIED, Store, UserInfo, client_owner
from flywheel.serve.errors import ApiError
from flywheel.serve.generation import ClientGone
from flywheel.serve.limits import Limits, RateLimited
from flywheel.serve.worker import BATCHING, BatchWorker, ServedModel, unstorable
from flywheel.tokenization import special_text

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
T = TypeVar("T")
_CLIENT_ID = re.compile(CLIENT_ID_PATTERN)


@dataclass
class ServeSettings:
    model: str = field(default="", metadata={"help": "HF model directory to serve (or the first argument)"})
    db: str = field(default="feedback.db", metadata={"help": "database URL, or a SQLite file path"})
    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    model_name: str = field(default="flywheel", metadata={"help": "the model id clients ask for in /v1 requests"})
    chat_auth: bool = field(default=False, metadata={"help": "require a user token for chat (/v1 and the chat app)"})
    cors_origins: str = field(default="", metadata={"help": "comma-separated origins allowed by CORS (empty = off)"})
    max_batch: int = field(default=32, metadata={"help": "most rows (prompts x n) decoded in one batch"})
    batching: str = field(
        default="continuous",
        metadata={"help": "continuous (requests join the running batch at the next step) or dynamic (when it ends)"},
    )
    max_tokens_limit: int = field(default=512, metadata={"help": "largest max_tokens a request may ask for"})
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request gives none"})
    max_n: int = field(default=8, metadata={"help": "largest n (choices per request)"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body (413 beyond)"})
    log_api: bool = field(default=True, metadata={"help": "log /v1 exchanges in the database"})
    dtype: str = field(default="float32", metadata={"help": "model dtype: float32 or bfloat16"})
    backend: str = field(default="auto", metadata={"help": "engine forward: auto, compact (Llama family) or hf"})
    threads: int = field(
        default=0, metadata={"help": "torch threads of the worker (0 = $FLYWHEEL_THREADS if set, else all cores)"}
    )
    migrate: bool = field(default=True, metadata={"help": "run the database migrations at start"})
    rate_limit: int = field(
        default=600, metadata={"help": "requests per minute per user (token); 429 + Retry-After beyond (0 = off)"}
    )
    rate_limit_anonymous: int = field(
        default=0, metadata={"help": "requests per minute per client address without a user token (0 = off)"}
    )
    auth_failure_limit: int = field(
        default=10, metadata={"help": "rejected tokens per minute per client address; beyond, 429 (0 = off)"}
    )
    forwarded_allow_ips: str = field(
        default="",
        metadata={
            "help": "addresses of the proxies whose X-Forwarded-For names the client (comma-separated, e.g. "
            "127.0.0.1 for a proxy on this host; default: $FORWARDED_ALLOW_IPS, else none: the connection's peer)"
        },
    )

    def validate(self) -> None:
        if not self.model:
            raise UserError("give a model directory: flywheel serve MODEL_DIR")
        if not 0 < self.port < 65536:
            raise UserError("--port must be in 1..65535")
        if self.max_batch < 1 or self.max_n < 1 or self.max_tokens_limit < 1:
            raise UserError("--max-batch, --max-n and --max-tokens-limit must be >= 1")
        if self.batching not in BATCHING:
            raise UserError(f"--batching must be one of {', '.join(BATCHING)}, got '{self.batching}'")
        if min(self.rate_limit, self.rate_limit_anonymous, self.auth_failure_limit) < 0:
            raise UserError("--rate-limit, --rate-limit-anonymous and --auth-failure-limit must be >= 0 (0 = off)")


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """How uvicorn finds the client's address. X-Forwarded-For is read only from the proxies named (the flag, else
    $FORWARDED_ALLOW_IPS): trusting it from any local peer would let every local caller name a new address, and the
    per-address limits (rejected tokens, anonymous requests) would stop nothing."""
    ips = settings.forwarded_allow_ips or os.environ.get("FORWARDED_ALLOW_IPS", "")
    return {"proxy_headers": bool(ips), "forwarded_allow_ips": ips or None}


@dataclass
class AppContext:
    settings: ServeSettings
    store: Store
    worker: BatchWorker
    switch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    max_id: int = 2**63 - 1  # the largest value the database's id columns hold
    limits: Limits = field(default_factory=lambda: Limits.of(0, 0, 0))


def ctx(request: Request) -> AppContext:
    return request.app.state.ctx


async def db(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a store call in a thread (database I/O never blocks the event loop)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _authenticate(request: Request, *, count_failure: bool) -> UserInfo | None:
    """The user of the bearer token (None: no token, or not a user's). While the client's address is over its budget
    of rejected tokens, any request with a token gets 429: guessing tokens is slow from every address."""
    token = bearer(request)
    if not token:
        return None
    limits = ctx(request).limits
    if wait := limits.auth_failures.check(_address(request)):
        raise RateLimited(wait, "too many rejected tokens from this address")
    user = await db(ctx(request).store.authenticate, token)
    if user is None and count_failure:
        limits.auth_failures.take(_address(request))
    return user


def _rate_limit(request: Request, user: UserInfo | None) -> None:
    limits = ctx(request).limits
    if user is not None:
        if wait := limits.per_user.take(f"user:{user.id}"):
            raise RateLimited(wait, f"rate limit of {limits.per_user.capacity:.0f} requests per minute per token")
    elif wait := limits.per_address.take(_address(request)):
        raise RateLimited(wait, f"rate limit of {limits.per_address.capacity:.0f} requests per minute per address")


async def current_user(
    request: Request, *, roles: tuple[str, ...] = ("labeler", "admin"), required: bool = True
) -> UserInfo | None:
    user = await _authenticate(request, count_failure=True)
    if bearer(request) and user is None:
        raise ApiError(401, "invalid API token", code="invalid_api_key")
    if user is None:
        if required:
            raise ApiError(401, "this endpoint needs a token: Authorization: Bearer <token>", code="invalid_api_key")
        _rate_limit(request, None)
        return None
    _rate_limit(request, user)
    if user.role not in roles:
        raise ApiError(403, f"this endpoint needs the role {' or '.join(roles)}", code="insufficient_role")
    return user


@dataclass(frozen=True)
class Principal:
    """Who is chatting: `owner` of what they create (a user's name, `client:<hash>`, or UNIDENTIFIED), and the user."""

    owner: str
    user: UserInfo | None = None

    @property
    def identified(self) -> bool:
        return self.owner != UNIDENTIFIED


async def chat_principal(request: Request) -> Principal:
    """The chat caller: the user of the bearer token; with open chat, else the anonymous client of `X-Client-Id`
    (a secret the client made: 22-128 characters of [A-Za-z0-9_-]), else nobody (UNIDENTIFIED)."""
    if ctx(request).settings.chat_auth:
        user = await current_user(request, roles=ROLES)
    else:  # open chat: a token that is not a user's (OpenAI clients always send one) identifies nobody
        user = await _authenticate(request, count_failure=False)
        _rate_limit(request, user)
    if user is not None:
        return Principal(user.name, user)
    client = request.headers.get("x-client-id")
    if client is None:
        return Principal(UNIDENTIFIED)
    if not _CLIENT_ID.match(client):  # meant as an identity: logged where its client could never read it back
        raise ApiError(
            401,
            "X-Client-Id must be 22-128 random characters of A-Z a-z 0-9 _ - (a secret the client makes)",
            code="missing_identity",
        )
    return Principal(client_owner(client))


async def chat_owner(request: Request) -> str:
    """The owner of what this caller creates; UNIDENTIFIED (readable by admins only) when it has no identity."""
    return (await chat_principal(request)).owner


async def chat_identity(request: Request) -> Principal:
    """The chat caller, who must have an identity (the web chat's endpoints)."""
    principal = await chat_principal(request)
    if not principal.identified:
        raise ApiError(
            401,
            "send a user token (Authorization: Bearer <token>) or an anonymous client id "
            "(X-Client-Id: 22-128 random characters of A-Z a-z 0-9 _ -)",
            code="missing_identity",
        )
    return principal


def id_limit(store: Store) -> int:
    """The largest id the store's integer id columns hold: SQLite's INTEGER is 64-bit; elsewhere the column type
    decides (INTEGER: 32-bit, BIGINT: 64-bit)."""
    from sqlalchemy import BigInteger

    from flywheel.feedback.models import Message

    if store.engine.dialect.name == "sqlite" or isinstance(Message.__table__.c.id.type, BigInteger):
        return 2**63 - 1
    return 2**31 - 1


def check_id(request: Request, value: int | None, what: str) -> None:
    """404 for an id no row can have (< 1, or beyond what the id column holds: 2**31 - 1 for PostgreSQL's INTEGER,
    2**63 - 1 for SQLite's), the same answer as for any id that does not exist, on every database alike."""
    if value is not None and not 1 <= value <= ctx(request).max_id:
        raise ApiError(404, f"no {what} {value}")


def allowed_methods(request: Request) -> list[str]:
    """The methods some route takes at the request's path (asked of the router, method by method, so that routes of
    included routers count too)."""
    from starlette.routing import Match

    def takes(method: str) -> bool:
        scope = {**request.scope, "method": method}
        return any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes)

    return [m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE") if takes(m)]


def validation_error(errors: Sequence[Any]) -> ApiError:
    """A 400 for a body that FastAPI would answer with 422: the most specific of pydantic's errors (the deepest: of a
    union, the branch that got furthest), its location without the union's branch names, and what was wrong."""
    if not errors:
        return ApiError(400, "invalid request")
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        at = first.get("loc", ("body", "?"))[-1]
        why = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON (at character {at}{': ' + why if why else ''})")
    loc = [str(x) for x in first.get("loc", ())[1:] if not _union_branch(x)]  # [0] is "body" (or query, header)
    if not loc:
        return ApiError(400, f"the request body must be a JSON object ({first.get('msg', 'invalid')})")
    param = ".".join(loc)
    return ApiError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param)


def _union_branch(part: Any) -> bool:
    """Whether a pydantic error location part names a branch of a union (`str`, `list[TextPart]`), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


class BodyLimit:
    """Reject request bodies over `limit` bytes with 413, by Content-Length or while streaming the body in."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over {self.limit} bytes", code="request_too_large")
            return message

        await self.app(scope, limited, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = ApiError(413, f"request body over {self.limit} bytes", code="request_too_large")
        await err.response()(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    """Whether FastAPI parses this request's body as JSON (no content type, or application/json or */*+json)."""
    value = dict(scope["headers"]).get(b"content-type")
    if value is None:
        return True
    message = email.message.Message()
    message["content-type"] = value.decode("latin-1")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class TextCheck:
    """Answer 400 to a JSON body with a NUL character or a lone surrogate in any string: no database stores them
    (PostgreSQL refuses NUL, UTF-8 has no surrogates) and tokenizers reject surrogates. On the web app's routes
    (`/api/`), whose texts become conversations, tasks and training data, also to a string that writes out a special
    token of the served model (`<|im_end|>`: rendered, it would end a turn). Bodies that are not valid JSON go on to
    FastAPI, which answers 400 itself."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or not _is_json(scope):
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            document = json.loads(body) if body else None
        except (ValueError, RecursionError):  # not JSON (also not UTF-8): FastAPI's 400
            document = None
        found = find_bad_string(document, unstorable) if document is not None else None
        if found is None and document is not None and scope["path"].startswith("/api/"):
            found = find_bad_string(document, partial(special_text, scope["app"].state.ctx.worker.model.tokenizer))
        if found is not None:
            where = found[0].encode("utf-8", "backslashreplace").decode("utf-8")  # a bad key is part of the path
            err = ApiError(400, f"{where}: {found[1]}", param=where, code="invalid_text")
            return await err.response()(scope, receive, send)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class CatchAll:
    """The last resort: an exception no handler took becomes a 500 `server_error` (logged with its traceback), or
    an `ApiError` raised outside the routes its own answer. Unlike Starlette's handler for `Exception`, which
    re-raises after answering (and uvicorn then closes the connection), this keeps the connection open."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as err:  # noqa: BLE001
            if isinstance(err, ApiError):
                response = err.response()
            else:
                log.error("internal error on %s %s: %r", scope["method"], scope["path"], err, exc_info=err)
                response = ApiError(500, "internal server error").response()
            if started:  # a streamed answer broke off: nothing more can be sent on it
                return
            await response(scope, receive, send)


class SecurityHeaders:
    """`nosniff` and no referrer on every response; on HTML pages also a Content-Security-Policy with no inline
    scripts or styles anywhere (user text can never run as code even if some of it were mis-escaped) and no framing.

    Plain ASGI, not Starlette's `BaseHTTPMiddleware`: that one relays a streamed body through a queue and ends it
    cleanly when the app under it fails, so a client of a broken stream would see a complete, shortened answer."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if headers.get("content-type", "").startswith("text/html"):
                    headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'"
                    headers["X-Frame-Options"] = "DENY"
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: ServeSettings, *, model: ServedModel | None = None, store: Store | None = None) -> FastAPI:
    """Build the app. `model`/`store` may be given (tests); otherwise they are loaded from the settings."""
    from flywheel.feedback.db import safe_url, upgrade
    from flywheel.serve import openai_api, web_api

    if settings.migrate:
        upgrade(settings.db)
    store = store or Store(settings.db)
    model = model or ServedModel.load(settings.model, dtype=settings.dtype, backend=settings.backend)
    store.register_model_version(model.version, model.path)
    worker = BatchWorker(
        model, max_batch=settings.max_batch, threads=settings.threads or None, batching=settings.batching
    )
    max_id = id_limit(store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        log.info("serving %s (version %s); database %s", settings.model_name, model.version, safe_url(settings.db))
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="flywheel", lifespan=lifespan, docs_url=None, redoc_url=None)
    limits = Limits.of(settings.rate_limit, settings.rate_limit_anonymous, settings.auth_failure_limit)
    app.state.ctx = AppContext(settings, store, worker, max_id=max_id, limits=limits)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> Response:
        return err.response()

    @app.exception_handler(UserError)
    async def _user_error(request: Request, err: UserError) -> Response:
        return ApiError(getattr(err, "status", 400), str(err)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> Response:
        body_errors = [e for e in err.errors() if tuple(e.get("loc", ()))[:1] == ("body",)]
        if body_errors and request.method in ("POST", "PUT", "PATCH") and not _is_json(request.scope):
            kind = request.headers.get("content-type") or "none"
            return ApiError(
                400, f"the request body must be JSON, sent as Content-Type: application/json (got {kind})"
            ).response()
        return validation_error(err.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> Response:
        message = "not found" if err.status_code == 404 else str(err.detail)
        api_error = ApiError(err.status_code, message)
        api_error.headers.update(err.headers or {})
        if err.status_code == 405:  # every method the path takes (Starlette names the first route's alone)
            api_error.headers["Allow"] = ", ".join(allowed_methods(request))
        return api_error.response()

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, err: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": no one reads it, the access log does

    @app.exception_handler(DataError)
    async def _data_error(request: Request, err: DataError) -> Response:
        # The database refused a value (out of range, unstorable): the request's fault. Checks in the routes catch
        # the known cases first; this keeps any other one a 400 instead of a 500.
        log.warning("the database refused a value on %s %s: %s", request.method, request.url.path, err.orig)
        return ApiError(400, "a value in the request cannot be stored (out of range or invalid)").response()

    @app.get("/health", include_in_schema=False)
    async def health(request: Request) -> Response:
        c = ctx(request)
        engine = c.worker.health()  # on the loop: a thread pool that database calls fill must not hold it up
        body = {
            "status": "ok" if engine["alive"] else "unavailable",
            "model": {"name": settings.model_name, "version": c.worker.model.version},
            "engine": engine,
        }
        return JSONResponse(body, status_code=200 if engine["alive"] else 503)

    app.include_router(openai_api.router)
    app.include_router(web_api.router)
    for page, name in (("/", "chat.html"), ("/label", "label.html"), ("/admin", "admin.html")):
        app.add_api_route(page, _page(name), methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Client-Id"],
        )
    app.add_middleware(TextCheck)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(CatchAll)
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, errors included
    return app


def _page(name: str) -> Callable[[], Awaitable[FileResponse]]:
    async def page() -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html")

    return page

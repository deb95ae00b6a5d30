"""OpenAI-compatible routes: `POST /v1/chat/completions` (streaming or not), `GET /v1/models`, `GET /v1/models/{id}`.

Supported: `messages` (system/user/assistant/developer; text content or text parts), `n`, `temperature`, `top_p`,
`max_tokens` (or `max_completion_tokens`), `stop` (a string or up to 4), `seed`, `stream`,
`stream_options.include_usage`, `logprobs`, `top_logprobs`. Fields that would change the answer and are not
implemented (tools, JSON mode, penalties, logit bias, audio, ...) are a 400 `unsupported_parameter` when set to
anything but their neutral value; a few bookkeeping fields (`user`, `metadata`, `store`, ...) are accepted and have
no effect; any other field is a 400, as OpenAI answers it. Errors use OpenAI's shape and statuses.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StrictStr

from flywheel.engine import SamplingParams
from flywheel.errors import UserError
from flywheel.feedback.store import check_messages_dicts
from flywheel.serve.app import AppContext, chat_owner, ctx, db
from flywheel.serve.errors import ApiError
from flywheel.serve.generation import Run
from flywheel.serve.logprobs import MAX_TOP_LOGPROBS
from flywheel.serve.worker import check_seed

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")


Number = Annotated[float, Strict()]  # an int or a float; not a string, not a boolean


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    # None only beside `tool_calls` / `function_call` (an assistant message replayed by OpenAI's clients), which
    # `check_fields` then refuses by name
    content: StrictStr | list[TextPart] | None

    def as_dict(self) -> dict[str, str]:
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False
    include_obfuscation: StrictBool = False  # OpenAI pads its chunks against side channels; nothing to hide here


class ChatRequest(BaseModel):
    """Types are strict: `"stream": "yes"` or `"max_tokens": true` are errors, not coerced. Other fields: see
    `check_fields`."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = 1
    temperature: Number | None = None
    top_p: Number | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None


def _off(value: Any) -> bool:
    return value is None or value == [] or value == {} or value == ""


# Fields that change what the model must produce, which this server does not implement: a 400 unless the value
# is neutral (the predicate), so a client that relies on them can tell.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_off, "tool calls are not supported (the model writes text only)"),
    "tool_choice": (lambda v: _off(v) or v == "none", "tool calls are not supported"),
    "functions": (_off, "function calls are not supported"),
    "function_call": (lambda v: _off(v) or v == "none", "function calls are not supported"),
    "response_format": (
        lambda v: _off(v) or v == {"type": "text"},
        "only {'type': 'text'} is supported: no JSON mode or JSON schema (no constrained decoding)",
    ),
    "frequency_penalty": (lambda v: _off(v) or v == 0, "only 0 is supported (no repetition penalties)"),
    "presence_penalty": (lambda v: _off(v) or v == 0, "only 0 is supported (no repetition penalties)"),
    "logit_bias": (_off, "logit bias is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "audio": (_off, "audio output is not supported"),
    "prediction": (_off, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),  # {} turns it on
    "reasoning_effort": (_off, "this is not a reasoning model"),
}
# Accepted and without effect here (bookkeeping for OpenAI's own platform).
NO_EFFECT = {
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "safety_identifier",
    "prompt_cache_key",
}
MESSAGE_NO_EFFECT = {"name", "refusal", "annotations"}  # `name` is not rendered: the chat template has no place for it


def check_fields(req: ChatRequest) -> None:
    """400 `unsupported_parameter` for a field this server would otherwise have to ignore."""
    for key, value in (req.model_extra or {}).items():
        if key in UNSUPPORTED:
            neutral, why = UNSUPPORTED[key]
            if not neutral(value):
                raise ApiError(
                    400, f"'{key}' is not supported by this server: {why}", param=key, code="unsupported_parameter"
                )
        elif key not in NO_EFFECT:
            raise ApiError(
                400, f"Unrecognized request argument supplied: {key}", param=key, code="unsupported_parameter"
            )
    for i, m in enumerate(req.messages):
        for key, value in (m.model_extra or {}).items():
            if key not in MESSAGE_NO_EFFECT and not _off(value):
                raise ApiError(
                    400,
                    f"messages[{i}].{key} is not supported by this server",
                    param=f"messages.{i}.{key}",
                    code="unsupported_parameter",
                )
    for i, m in enumerate(req.messages):
        if m.content is None:
            raise ApiError(400, f"messages[{i}].content is required", param=f"messages.{i}.content")
    if req.stream_options is not None and not req.stream:  # as OpenAI answers it: it would have no effect
        raise ApiError(
            400, "'stream_options' is only allowed when 'stream' is true", param="stream_options", code="invalid_value"
        )
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(
                400,
                f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {req.top_logprobs}",
                param="top_logprobs",
            )
        if req.top_logprobs > 0 and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def check_model(c: AppContext, name: str) -> None:
    if name not in (c.settings.model_name, c.worker.model.version):
        raise ApiError(
            404,
            f"The model '{name}' does not exist (this server serves '{c.settings.model_name}', "
            f"version '{c.worker.model.version}')",
            param="model",
            code="model_not_found",
        )


def sampling(c: AppContext, req: ChatRequest) -> tuple[SamplingParams, list[str]]:
    """Validate the sampling fields against the server's limits -> (params, stop strings)."""
    s = c.settings
    field, max_tokens = "max_tokens", req.max_tokens
    if req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise ApiError(
                400,
                f"max_tokens ({req.max_tokens}) and max_completion_tokens ({req.max_completion_tokens}) differ: "
                "set one of them",
                param="max_tokens",
            )
        field, max_tokens = "max_completion_tokens", req.max_completion_tokens
    if max_tokens is None:
        max_tokens = min(s.default_max_tokens, s.max_tokens_limit)
    if not 1 <= max_tokens <= s.max_tokens_limit:
        raise ApiError(400, f"{field} must be between 1 and {s.max_tokens_limit}, got {max_tokens}", param=field)
    n = 1 if req.n is None else req.n
    if not 1 <= n <= s.max_n:
        raise ApiError(400, f"n must be between 1 and {s.max_n}, got {n}", param="n")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature must be between 0 and 2, got {temperature}", param="temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", param="top_p")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not x for x in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    try:
        check_seed(req.seed)
    except UserError as err:
        raise ApiError(400, str(err), param="seed") from None
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=req.seed), stop


def messages_of(req: ChatRequest) -> list[dict[str, str]]:
    try:
        return check_messages_dicts([m.as_dict() for m in req.messages], end="user")
    except UserError as err:
        raise ApiError(400, str(err), param="messages") from None


def _model_cards(c: AppContext) -> list[dict[str, Any]]:
    version = c.worker.model.version
    return [
        {"id": c.settings.model_name, "object": "model", "created": 0, "owned_by": "flywheel", "version": version},
        {"id": version, "object": "model", "created": 0, "owned_by": "flywheel", "version": version},
    ]


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    c = ctx(request)
    await chat_owner(request)  # the same access rule as chat
    return {"object": "list", "data": _model_cards(c)}


@router.get("/models/{model_id:path}")
async def model_card(request: Request, model_id: str) -> dict[str, Any]:
    c = ctx(request)
    await chat_owner(request)
    check_model(c, model_id)
    return next(card for card in _model_cards(c) if card["id"] == model_id)


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatRequest) -> Any:
    c = ctx(request)
    owner = await chat_owner(request)
    check_model(c, body.model)
    check_fields(body)
    params, stop = sampling(c, body)
    messages = messages_of(body)
    top = body.top_logprobs or 0
    run = Run(
        c.worker,
        messages,
        params,
        n=body.n or 1,
        stop=stop,
        logprobs=bool(body.logprobs),
        top_logprobs=top,
        incremental=bool(body.stream),
    )
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        await run.started()  # errors before the first token still get a proper status
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(c, run, messages, owner, completion_id, created, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Flywheel-Model-Version": run.version},
        )
    result = await run.collect(request)  # a client gone before the answer cancels it, and nothing is logged
    if c.settings.log_api:
        await db(
            c.store.log_exchange,
            owner,
            "api",
            messages,
            list(zip(result.texts, result.finish_reasons, strict=True)),
            result.version,
        )
    completion_tokens = sum(result.tokens)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": result.version,
            "system_fingerprint": result.version,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None if result.logprobs is None else {"content": result.logprobs[i], "refusal": None},
                    "finish_reason": finish,
                }
                for i, (text, finish) in enumerate(zip(result.texts, result.finish_reasons, strict=True))
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": result.prompt_tokens + completion_tokens,
            },
        },
        headers={"X-Flywheel-Model-Version": result.version},
    )


async def _stream(
    c: AppContext,
    run: Run,
    messages: list[dict[str, str]],
    owner: str,
    completion_id: str,
    created: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    n = run.req.n
    texts, finishes, tokens = [""] * n, [None] * n, [0] * n

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": run.version,
            "system_fingerprint": run.version,
            "choices": choices,
        }
        if include_usage:  # as OpenAI streams it: null in every chunk but the last
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    finished = False
    try:
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for event in run.events():
            if event[0] == "delta":
                texts[event[1]] += event[2]
                piece: dict[str, Any] = {"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}
                if event[3] is not None:
                    piece["logprobs"] = {"content": event[3], "refusal": None}
                yield chunk([piece])
            elif event[0] == "done":
                finishes[event[1]], tokens[event[1]] = event[2], event[3]
                yield chunk([{"index": event[1], "delta": {}, "finish_reason": event[2]}])
        if include_usage:
            total = sum(tokens)
            yield chunk(
                [],
                usage={
                    "prompt_tokens": run.prompt_tokens,
                    "completion_tokens": total,
                    "total_tokens": run.prompt_tokens + total,
                },
            )
        finished = True
        if c.settings.log_api:  # committed before [DONE]: a client that saw [DONE] knows the exchange is stored
            answers = list(zip(texts, finishes, strict=True))
            await db(c.store.log_exchange, owner, "api", messages, answers, run.version)
        yield "data: [DONE]\n\n"
    except ApiError as err:
        yield f"data: {json.dumps(err.body())}\n\n"
    except Exception as err:  # noqa: BLE001 (the 200 is sent: the client still gets a proper error event)
        log.error("streaming a completion failed", exc_info=err)
        yield f"data: {json.dumps(ApiError(500, 'internal server error').body())}\n\n"
    finally:
        if not finished:
            run.cancel()  # the client went away (or the run failed): stop generating for it

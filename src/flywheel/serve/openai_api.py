"""OpenAI-compatible routes: `POST /v1/chat/completions` (streaming or not) and `GET /v1/models`.

Supported: `messages` (system/user/assistant; text content or text parts), `n`, `temperature`, `top_p`, `max_tokens`
(or `max_completion_tokens`), `stop` (a string or up to 4), `seed`, `stream`, `stream_options.include_usage`.
Other OpenAI fields are accepted and ignored. Errors use OpenAI's shape and statuses.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
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
from flywheel.serve.worker import check_seed

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1")


Number = Annotated[float, Strict()]  # an int or a float; not a string, not a boolean


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: StrictStr | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """Types are strict: `"stream": "yes"` or `"max_tokens": true` are errors, not coerced."""

    model_config = ConfigDict(extra="ignore")
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
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = min(s.default_max_tokens, s.max_tokens_limit)
    if not 1 <= max_tokens <= s.max_tokens_limit:
        raise ApiError(
            400, f"max_tokens must be between 1 and {s.max_tokens_limit}, got {max_tokens}", param="max_tokens"
        )
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


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    c = ctx(request)
    await chat_owner(request)  # the same access rule as chat
    version = c.worker.model.version
    return {
        "object": "list",
        "data": [
            {"id": c.settings.model_name, "object": "model", "created": 0, "owned_by": "flywheel", "version": version},
            {"id": version, "object": "model", "created": 0, "owned_by": "flywheel", "version": version},
        ],
    }


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatRequest) -> Any:
    c = ctx(request)
    owner = await chat_owner(request)
    check_model(c, body.model)
    params, stop = sampling(c, body)
    messages = messages_of(body)
    run = Run(c.worker, messages, params, n=body.n or 1, stop=stop)
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
    result = await run.collect()
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
                    "logprobs": None,
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

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": run.version,
            "system_fingerprint": run.version,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    finished = False
    try:
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        async for event in run.events():
            if event[0] == "delta":
                texts[event[1]] += event[2]
                yield chunk([{"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}])
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
        yield "data: [DONE]\n\n"
        finished = True
    except ApiError as err:
        yield f"data: {json.dumps(err.body())}\n\n"
    finally:
        if not finished:
            run.cancel()  # the client went away (or the run failed): stop generating for it
    if finished and c.settings.log_api:
        await db(c.store.log_exchange, owner, "api", messages, list(zip(texts, finishes, strict=True)), run.version)

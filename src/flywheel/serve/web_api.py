"""The web app's JSON API: chat conversations (streamed as SSE), votes, the labelers' workbench, and admin.

Chat (open, or token-protected with `--chat-auth`). Every conversation belongs to its maker: a user (token), or with
open chat an anonymous client (`X-Client-Id`); others' conversations and messages answer 404. Admins may read any
conversation (GET only).
    GET  /api/conversations                      POST /api/conversations
    GET  /api/conversations/{id}                 POST /api/conversations/{id}/messages   (SSE)
    PATCH /api/conversations/{id} (rename)       DELETE /api/conversations/{id}
    POST /api/messages/{id}/regenerate (SSE)     POST /api/messages/{id}/votes
A turn may carry `system` (a system prompt) when it starts a branch at the root (`parent_id` null); an edited turn
is a new turn under the old one's parent (a sibling: a new branch, the old one stays).
Any user's token: GET /api/me
Labelers (labeler or admin token):
    GET  /api/label/next?kind=ranking|roleplay   POST /api/label/suggest
    POST /api/label/rankings                     POST /api/label/demonstrations
Admins:
    GET  /api/admin/overview    GET /api/admin/conversations?source=web|api    POST /api/admin/tasks
    GET|POST /api/admin/model
    POST /api/admin/gate        GET /api/admin/gate?ids=1,2     (`flywheel round --gate-prompts`: ranking tasks of
                                given answers, blind to the labelers, and their rankings)

SSE events of the chat streams are JSON objects: {"type": "system", "message"} and {"type": "user", "message"} (the
stored new messages), {"type": "delta", "text"}, {"type": "done", "message"} (the stored assistant message, with its
model version), {"type": "error", "message"}. A client that closes the stream stops the generation; the answer so
far is stored with finish_reason "cancelled" (read it back with GET /api/conversations/{id}).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from flywheel.engine import SamplingParams
from flywheel.errors import UserError
from flywheel.feedback.models import ROLES, TaskKind
from flywheel.feedback.store import NotFound, check_messages_dicts
from flywheel.serve.app import AppContext, chat_identity, check_id, ctx, current_user, db
from flywheel.serve.errors import ApiError
from flywheel.serve.generation import Run
from flywheel.serve.worker import PromptError, ServedModel, prompt_ids

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api")
CANCELLED = "cancelled"  # the finish_reason of an answer whose client stopped it


class Body(BaseModel):
    """A request body: JSON types as given ("80" is no id, 1.5 no count), as the OpenAI routes read theirs."""

    model_config = ConfigDict(strict=True)


class NewConversation(Body):
    title: str = Field(default="", max_length=200)


class ChatTurn(Body):
    content: str = Field(min_length=1)
    parent_id: int | None = None  # the message this turn answers (None: the first turn)
    system: str | None = None  # a system prompt above this turn: only for a new root (parent_id None)
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int | None = None


class RegenerateBody(Body):
    temperature: float = Field(default=0.9, ge=0, le=2)
    max_tokens: int | None = None


class RenameBody(Body):
    title: str = Field(min_length=1, max_length=200)


class VoteBody(Body):
    value: Literal[1, -1]
    comment: str = Field(default="", max_length=4000)
    idempotency_key: str = Field(min_length=1, max_length=100)


class Turn(Body):
    role: Literal["system", "user", "assistant"]
    content: str


class SuggestBody(Body):
    messages: list[Turn] = Field(min_length=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    max_tokens: int | None = None


class RankingBody(Body):
    task_id: int
    order: list[list[int]]  # groups of candidate ids, best first
    unsafe: list[int] = []
    comment: str = Field(default="", max_length=4000)
    idempotency_key: str = Field(min_length=1, max_length=100)


class Suggestion(Body):
    turn: int
    text: str
    model_version: str = ""


class DemonstrationBody(Body):
    task_id: int | None = None
    messages: list[Turn] = Field(min_length=2)
    suggestions: list[Suggestion] = []
    idempotency_key: str = Field(min_length=1, max_length=100)


class SkipBody(Body):
    task_id: int
    reason: str = Field(default="", max_length=4000)


class TasksBody(Body):
    kind: TaskKind
    prompts: list[str | list[Turn]] = []  # ranking: prompts (text = one user turn, or messages)
    from_conversations: int = Field(default=0, ge=0, le=1000)  # ranking: also the latest N logged user turns
    instructions: list[str] = []  # role-play
    k: int = Field(default=4, ge=2, le=9)
    labels_needed: int = Field(default=1, ge=1, le=100)
    temperature: float = Field(default=1.0, gt=0, le=2)
    max_tokens: int = Field(default=64, ge=1)


class GateAnswer(Body):
    text: str = Field(min_length=1)
    model_version: str = Field(min_length=1, max_length=200)
    model_path: str = ""


class GateItem(Body):
    prompt: str | list[Turn]  # text = one user turn, or messages ending with a user turn
    answers: list[GateAnswer] = Field(min_length=2, max_length=9)


class GateBody(Body):
    items: list[GateItem] = Field(min_length=1, max_length=1000)
    labels_needed: int = Field(default=1, ge=1, le=100)


def _prompt_messages(prompt: str | list[Turn]) -> list[dict[str, str]]:
    """A task's prompt as messages: a text is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [t.model_dump() for t in prompt]


class ModelBody(Body):
    path: str = Field(min_length=1)


def _max_tokens(c: AppContext, value: int | None) -> int:
    limit = c.settings.max_tokens_limit
    value = min(c.settings.default_max_tokens, limit) if value is None else value
    if not 1 <= value <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit}", param="max_tokens")
    return value


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# chat


@router.get("/conversations")
async def list_conversations(request: Request) -> dict[str, Any]:
    owner = (await chat_identity(request)).owner
    return {"conversations": await db(ctx(request).store.list_conversations, owner)}


@router.post("/conversations", status_code=201)
async def new_conversation(request: Request, body: NewConversation) -> dict[str, Any]:
    owner = (await chat_identity(request)).owner
    return {"id": await db(ctx(request).store.create_conversation, owner, "web", body.title)}


@router.get("/conversations/{conv_id}")
async def get_conversation(request: Request, conv_id: int) -> dict[str, Any]:
    """The caller's own conversation; an admin may read anyone's (with its owner). Others' ids answer 404."""
    principal = await chat_identity(request)
    check_id(request, conv_id, "conversation")
    admin = principal.user is not None and principal.user.role == "admin"
    return await db(ctx(request).store.conversation, conv_id, principal.owner, any_owner=admin)


@router.post("/conversations/{conv_id}/messages")
async def send_message(request: Request, conv_id: int, body: ChatTurn) -> StreamingResponse:
    c = ctx(request)
    owner = (await chat_identity(request)).owner
    check_id(request, conv_id, "conversation")
    check_id(request, body.parent_id, "message")
    params = SamplingParams(max_new_tokens=_max_tokens(c, body.max_tokens), temperature=body.temperature)
    await _check_turn(c, owner, body)
    stored = await db(c.store.add_user_turn, conv_id, owner, body.parent_id, body.content, system=body.system)
    return await _reply(c, conv_id, owner, stored[-1], params, announce=stored)


async def _check_turn(c: AppContext, owner: str, body: ChatTurn) -> None:
    """A 400 before the turn is stored when the model cannot take the conversation it ends (longer than its context):
    a turn that can never be answered would stay in the conversation, and in what is exported, unanswered. Other
    problems (the turn order, whose parent) are the store's to answer."""
    above = await db(c.store.branch, body.parent_id, owner) if body.parent_id is not None else []
    system = [{"role": "system", "content": body.system}] if body.system is not None else []
    messages = [*system, *({"role": m["role"], "content": m["content"]} for m in above)]
    try:
        await asyncio.to_thread(prompt_ids, c.worker.model, [*messages, {"role": "user", "content": body.content}])
    except PromptError as err:
        raise ApiError(400, str(err), param="content", code=err.code) from None
    except UserError:
        pass


@router.post("/messages/{message_id}/regenerate")
async def regenerate(request: Request, message_id: int, body: RegenerateBody) -> StreamingResponse:
    """A new answer to the same user turn: a sibling of `message_id` (the old answer stays in the tree). Given the
    user turn itself, a new answer under it: how a turn whose answer failed (a server stopped mid-answer) is
    answered."""
    c = ctx(request)
    owner = (await chat_identity(request)).owner
    check_id(request, message_id, "message")
    branch = await db(c.store.branch, message_id, owner)
    if branch[-1]["role"] == "user":
        turn = branch[-1]
    elif branch[-1]["role"] == "assistant" and branch[-1]["parent_id"] is not None:
        turn = branch[-2]
    else:
        raise ApiError(400, "only an assistant answer, or the user turn it answers, can be regenerated")
    conv = await db(c.store.conversation_of, message_id)
    params = SamplingParams(max_new_tokens=_max_tokens(c, body.max_tokens), temperature=body.temperature)
    return await _reply(c, conv, owner, turn, params)


async def _reply(
    c: AppContext,
    conv_id: int,
    owner: str,
    user_msg: dict[str, Any],
    params: SamplingParams,
    *,
    announce: Sequence[dict[str, Any]] = (),
) -> StreamingResponse:
    """Stream the answer to `user_msg` (after announcing the new messages of `announce`) and store it. A client that
    leaves mid-answer (the chat page's Stop button aborts its request) stops the generation at once; what was
    generated so far is stored as the answer, with finish_reason "cancelled"."""
    branch = await db(c.store.branch, user_msg["id"], owner)
    asked = await db(c.store.message_created, user_msg["id"])  # the answer is stored under this message only
    run = Run(c.worker, [{"role": m["role"], "content": m["content"]} for m in branch], params)
    await run.started()

    async def events() -> AsyncIterator[str]:
        for msg in announce:
            yield _sse({"type": msg["role"], "message": msg})
        text, finish, outcome = "", None, "cancelled"
        try:
            async for event in run.events():
                if event[0] == "delta":
                    text += event[2]
                    yield _sse({"type": "delta", "text": event[2]})
                elif event[0] == "done":
                    finish = event[2]
            outcome = "done"
        except ApiError as err:
            outcome = "failed"
            yield _sse({"type": "error", "message": err.message})
        finally:
            if outcome == "cancelled":  # the client left (or the server is stopping): keep what it was shown
                run.cancel()
                with anyio.CancelScope(shield=True):
                    await _store_answer(c, conv_id, owner, user_msg, asked, text, run.version, CANCELLED)
        if outcome == "done":
            with anyio.CancelScope(shield=True):  # stored even if the client leaves now
                msg = await _store_answer(c, conv_id, owner, user_msg, asked, text, run.version, finish)
            if msg is None:
                yield _sse({"type": "error", "message": "the conversation was deleted; the answer was not stored"})
            else:
                yield _sse({"type": "done", "message": msg})

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _store_answer(
    c: AppContext,
    conv_id: int,
    owner: str,
    user_msg: dict[str, Any],
    asked: datetime | None,
    text: str,
    version: str,
    finish: str | None,
) -> dict[str, Any] | None:
    """The answer under `user_msg`, if that message (stored at `asked`) still exists; None if it was deleted meanwhile
    (also when a new message has taken its id since)."""
    try:
        return await db(
            c.store.add_message,
            conv_id,
            owner,
            user_msg["id"],
            "assistant",
            text,
            version,
            finish,
            parent_created=asked,
        )
    except NotFound:
        return None


@router.patch("/conversations/{conv_id}")
async def rename_conversation(request: Request, conv_id: int, body: RenameBody) -> dict[str, Any]:
    owner = (await chat_identity(request)).owner
    check_id(request, conv_id, "conversation")
    return await db(ctx(request).store.rename_conversation, conv_id, owner, body.title)


@router.delete("/conversations/{conv_id}", status_code=204)
async def delete_conversation(request: Request, conv_id: int) -> Response:
    """Delete one's own conversation, its messages and their votes (admins cannot delete others')."""
    owner = (await chat_identity(request)).owner
    check_id(request, conv_id, "conversation")
    await db(ctx(request).store.delete_conversation, conv_id, owner)
    return Response(status_code=204)


@router.post("/messages/{message_id}/votes")
async def vote(request: Request, message_id: int, body: VoteBody) -> dict[str, Any]:
    c = ctx(request)
    owner = (await chat_identity(request)).owner
    check_id(request, message_id, "message")
    row, created = await db(
        c.store.vote, message_id, owner, body.value, body.comment, body.idempotency_key, owner=owner
    )
    return {"vote": row, "created": created}


# labelers


@router.get("/me")
async def me(request: Request) -> dict[str, Any]:
    user = await current_user(request, roles=ROLES)
    return {"name": user.name, "role": user.role}


@router.get("/label/next")
async def next_task(request: Request, kind: TaskKind = "ranking") -> dict[str, Any]:
    user = await current_user(request)
    task, waiting = await db(ctx(request).store.next_task_and_waiting, user.id, kind)
    return {"task": task, "waiting": waiting}


def as_draft(text: str) -> str:
    """A model's draft as the workbench shows and submits it: a textarea turns CR and CRLF into LF, and the page trims
    a turn, so the recorded suggestion is that text (else an untouched draft would count as edited)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


@router.post("/label/suggest")
async def suggest(request: Request, body: SuggestBody) -> dict[str, Any]:
    """The model's draft of the next assistant turn (role-play starts from it; the labeler may edit it)."""
    await current_user(request)
    c = ctx(request)
    # the trainers' rules, as on /v1: turns in order, nothing empty, ending with the user's turn to answer
    messages = check_messages_dicts([t.model_dump() for t in body.messages], end="user")
    params = SamplingParams(max_new_tokens=_max_tokens(c, body.max_tokens), temperature=body.temperature)
    result = await Run(c.worker, messages, params).collect(request)
    return {
        "text": as_draft(result.texts[0]),
        "model_version": result.version,
        "finish_reason": result.finish_reasons[0],
    }


@router.post("/label/rankings")
async def submit_ranking(request: Request, body: RankingBody) -> dict[str, Any]:
    user = await current_user(request)
    check_id(request, body.task_id, "ranking task")
    row, created = await db(
        ctx(request).store.submit_ranking,
        user.id,
        body.task_id,
        body.order,
        unsafe=body.unsafe,
        comment=body.comment,
        key=body.idempotency_key,
    )
    return {"ranking": row, "created": created}


@router.post("/label/demonstrations")
async def submit_demonstration(request: Request, body: DemonstrationBody) -> dict[str, Any]:
    user = await current_user(request)
    check_id(request, body.task_id, "role-play task")
    row, created = await db(
        ctx(request).store.submit_demonstration,
        user.id,
        body.task_id,
        [t.model_dump() for t in body.messages],
        suggestions=[s.model_dump() for s in body.suggestions],
        key=body.idempotency_key,
    )
    return {"demonstration": row, "created": created}


@router.post("/label/skip")
async def skip_task(request: Request, body: SkipBody) -> dict[str, Any]:
    """The labeler passes over a task: /label/next offers them the next one (a second skip of it changes nothing)."""
    user = await current_user(request)
    check_id(request, body.task_id, "task")
    row, created = await db(ctx(request).store.skip_task, user.id, body.task_id, body.reason)
    return {"skip": row, "created": created}


# admins


@router.get("/admin/overview")
async def overview(request: Request) -> dict[str, Any]:
    await current_user(request, roles=("admin",))
    c = ctx(request)
    out = await db(c.store.overview)
    out["model"] = {"version": c.worker.model.version, "path": c.worker.model.path}
    out["batching"] = dict(c.worker.stats)
    return out


@router.get("/admin/conversations")
async def all_conversations(
    request: Request, source: Literal["web", "api"] | None = None, limit: int = Query(default=100, ge=1, le=1000)
) -> dict[str, Any]:
    """Everyone's conversations with their owners (API calls with no identity are only readable here and by id)."""
    await current_user(request, roles=("admin",))
    return {"conversations": await db(ctx(request).store.all_conversations, limit, source)}


@router.post("/admin/tasks", status_code=201)
async def create_tasks(request: Request, body: TasksBody) -> dict[str, Any]:
    await current_user(request, roles=("admin",))
    c = ctx(request)
    # a field of the other kind would be dropped without a word
    if body.kind == "roleplay" and (body.prompts or body.from_conversations):
        raise ApiError(400, "a roleplay task takes instructions, not prompts or from_conversations", param="kind")
    if body.kind == "ranking" and body.instructions:
        raise ApiError(400, "a ranking task takes prompts or from_conversations, not instructions", param="kind")
    if body.kind == "roleplay":
        ids = [
            await db(c.store.create_roleplay_task, text, labels_needed=body.labels_needed)
            for text in body.instructions
        ]
        return {"created": ids, "skipped": 0}
    prompts: list[tuple[list[dict[str, str]], int | None, str]] = []
    for p in body.prompts:
        prompts.append((_prompt_messages(p), None, "prompt_set"))
    prompts_at: list[datetime | None] = [None] * len(prompts)
    if body.from_conversations:
        for messages, msg_id, stored in await db(c.store.unused_chat_prompts, body.from_conversations):
            prompts.append((messages, msg_id, "conversation"))
            prompts_at.append(stored)
    params = SamplingParams(max_new_tokens=_max_tokens(c, body.max_tokens), temperature=body.temperature)
    k = min(body.k, c.settings.max_batch)
    results = await asyncio.gather(
        *(_candidates(c, messages, params, k, logged=source == "conversation") for messages, _, source in prompts)
    )
    created, skipped = [], 0
    for (messages, msg_id, source), stored, cands in zip(prompts, prompts_at, results, strict=True):
        # Fewer than 2 distinct answers (nothing to rank), a logged prompt the model cannot take, or one deleted while
        # its answers were sampled: no task.
        task = None
        if len(cands) >= 2:
            task = await db(
                c.store.create_ranking_task,
                messages,
                cands,
                labels_needed=body.labels_needed,
                source=source,
                source_message_id=msg_id,
                source_created=stored,
            )
        if task is None:
            skipped += 1
        else:
            created.append(task)
    return {"created": created, "skipped": skipped}


async def _candidates(
    c: AppContext, messages: list[dict[str, str]], params: SamplingParams, k: int, *, logged: bool = False
) -> list[tuple[str, str, str | None]]:
    """K distinct non-empty answers (one resampling round for duplicates), each with the version that wrote it. A
    `logged` prompt (from the chat logs) the model refuses (400: longer than its context, ...) has none: one user's
    message must not stop the tasks made from everyone else's; the admin's own prompts are a 400."""
    out: list[tuple[str, str, str | None]] = []
    seen: set[str] = set()
    for _ in range(2):
        try:
            result = await Run(c.worker, messages, params, n=k).collect()
        except ApiError as err:
            if logged and err.status == 400:
                return []
            raise
        for text, finish in zip(result.texts, result.finish_reasons, strict=True):
            if text.strip() and text.strip() not in seen and len(out) < k:
                seen.add(text.strip())
                out.append((text, result.version, finish))
        if len(out) == k:
            break
    return out


@router.post("/admin/gate", status_code=201)
async def create_gate_tasks(request: Request, body: GateBody) -> dict[str, Any]:
    """One ranking task per item, of the answers given (the deployment gate of `flywheel round`); per item, the
    task's id, or null when its answers are all the same (nothing to rank)."""
    await current_user(request, roles=("admin",))
    c = ctx(request)
    ids = []
    for i, item in enumerate(body.items):
        messages = check_messages_dicts(_prompt_messages(item.prompt), end="user", field=f"items.{i}.prompt")
        answers = [(a.text, a.model_version, a.model_path) for a in item.answers]
        ids.append(await db(c.store.create_gate_task, messages, answers, labels_needed=body.labels_needed))
    return {"tasks": ids}


@router.get("/admin/gate")
async def gate_results(request: Request, ids: str = Query(min_length=1, max_length=20_000)) -> dict[str, Any]:
    """The gate tasks `ids` (comma-separated): their answers and the rankings given so far."""
    await current_user(request, roles=("admin",))
    try:
        task_ids = [int(part) for part in ids.split(",")]
    except ValueError:
        raise ApiError(400, "ids must be task ids separated by commas", param="ids") from None
    for task_id in task_ids:
        check_id(request, task_id, "gate task")
    return {"tasks": await db(ctx(request).store.gate_results, task_ids)}


@router.get("/admin/model")
async def get_model(request: Request) -> dict[str, Any]:
    await current_user(request, roles=("admin",))
    model = ctx(request).worker.model
    return {"version": model.version, "path": model.path}


@router.post("/admin/model")
async def switch_model(request: Request, body: ModelBody) -> dict[str, Any]:
    """Serve another model directory from the next batch on, without a restart. Answers in flight finish on the
    old version; every answer is logged with the version that wrote it."""
    await current_user(request, roles=("admin",))
    c = ctx(request)
    path = Path(body.path).expanduser()
    if not (path / "config.json").is_file():
        raise ApiError(400, f"not a model directory (no config.json): {body.path}", param="path")
    async with c.switch_lock:
        previous = c.worker.model.version
        model = await asyncio.to_thread(ServedModel.load, path, dtype=c.settings.dtype, backend=c.settings.backend)
        await db(c.store.register_model_version, model.version, model.path)
        version = await asyncio.wrap_future(c.worker.swap(model))
    log.info("model switched: %s -> %s", previous, version)
    return {"version": version, "previous": previous, "path": model.path}

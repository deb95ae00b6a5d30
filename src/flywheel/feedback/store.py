"""`Store`: everything the server and the exporter do with the feedback database, as plain dicts in and out.

    store = Store("sqlite:///feedback.db")      # the schema must be current: `upgrade(url)` first
    token = store.create_user("alice", "labeler")   # shown once; only its SHA-256 is stored
    user = store.authenticate(token)                 # -> UserInfo | None
    task = store.next_task(user.id, "ranking")       # the labeler's next ranking task (candidates shuffled for them)
    row, created = store.submit_ranking(user.id, task["id"], [[c2], [c0, c1]], unsafe=[], key="k-1")

Submissions are idempotent: the same (user, idempotency key) returns the stored row with `created=False`, also when
two retries race (the unique constraint decides, the loser reads the winner's row).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import secrets
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar, get_args

from sqlalchemy import and_, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from flywheel.data.formats import Message as MessageRecord
from flywheel.data.formats import RecordError, check_messages, check_turn_order
from flywheel.errors import UserError
from flywheel.feedback.db import connect
from flywheel.feedback.models import (
    ROLES,
    Candidate,
    Conversation,
    Demonstration,
    Message,
    ModelVersion,
    RankingLabel,
    Task,
    TaskKind,
    TaskSkip,
    User,
    Vote,
    utcnow,
)

R = TypeVar("R", Vote, RankingLabel, Demonstration, TaskSkip)  # a row written once (per key; a skip per task)
MAX_KEY_LENGTH = 100
LATEST_SKIPS = 20  # the skips the admin overview lists, newest first
_RACE_ATTEMPTS = 200  # a write that loses a race on a unique constraint looks again (each loss is another's win)
# Who owns a conversation: a user's name, `client:` + a hash of an anonymous client's id, or UNIDENTIFIED (an API call
# with no identity: logged for training, readable by admins only). User names cannot contain ":", so the three never
# meet.
UNIDENTIFIED = "api:unidentified"
CLIENT_ID_PATTERN = r"^[A-Za-z0-9_-]{22,128}$"  # at least 22 base64url characters: 128 bits when random


class NotFound(UserError):
    status = 404


class Conflict(UserError):
    status = 409


@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    role: str  # "user" | "labeler" | "admin"
    active: bool = True  # False: the token was revoked


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def client_owner(client_id: str) -> str:
    """The owner string of an anonymous client: its id is a secret, so only a hash of it is stored."""
    return "client:" + hashlib.sha256(client_id.encode()).hexdigest()[:40]


@contextmanager
def record_errors() -> Iterator[None]:
    """The data formats' RecordError as the UserError that the server answers with a 400."""
    try:
        yield
    except RecordError as err:
        raise UserError(err.message) from None


def check_messages_dicts(messages: Any, *, end: str | None, field: str = "messages") -> list[dict[str, str]]:
    """Validate `[{"role", "content"}]` with the trainers' rules (turn order, non-empty content)."""
    if not isinstance(messages, list):
        raise UserError(f"{field} must be a list of messages")
    with record_errors():
        parsed = [MessageRecord.from_dict(m, where=f"{field}[{i}]") for i, m in enumerate(messages)]
        check_messages(parsed, field=field, end=end)
    return [m.as_dict() for m in parsed]


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise UserError(f"idempotency_key must be a non-empty string of at most {MAX_KEY_LENGTH} characters")
    return key


class Store:
    def __init__(self, url: str):
        self.url = url
        self.engine = connect(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite has one writer at a time; its busy handler makes waiting writers sleep for up to 100 ms per retry,
        # which starves a server under load. One lock per process queues our own writers without sleeping.
        self._write_lock = threading.Lock() if self.engine.dialect.name == "sqlite" else None

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session; `write=True` holds this process's writer lock (SQLite) for the whole session."""
        lock = self._write_lock if write else None
        if lock is not None:
            lock.acquire()
        try:
            with self._session() as s:
                yield s
        finally:
            if lock is not None:
                lock.release()

    def close(self) -> None:
        self.engine.dispose()

    # users and model versions

    def create_user(self, name: str, role: str) -> str:
        """Add a user and return their new API token (not stored: only its hash is)."""
        if role not in ROLES:
            raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        if not name or len(name) > 100 or ":" in name or name != name.strip():
            raise UserError("a user name must have 1 to 100 characters, no ':' and no surrounding spaces")
        token = "fw-" + secrets.token_urlsafe(32)
        with self.session(write=True) as s:
            s.add(User(name=name, role=role, token_hash=hash_token(token)))
            try:
                s.commit()
            except IntegrityError:
                raise Conflict(f"user {name!r} already exists") from None
        return token

    def authenticate(self, token: str | None) -> UserInfo | None:
        if not token:
            return None
        with self.session() as s:
            user = s.scalar(select(User).where(User.token_hash == hash_token(token)))
            return UserInfo(user.id, user.name, user.role) if user else None

    def users(self) -> list[UserInfo]:
        with self.session() as s:
            return [
                UserInfo(u.id, u.name, u.role, active=u.token_hash is not None)
                for u in s.scalars(select(User).order_by(User.id))
            ]

    def revoke_token(self, name: str) -> None:
        """The user's token stops working at once; their data stays. `rotate_token` gives them a new one."""
        self._set_token(name, None)

    def rotate_token(self, name: str) -> str:
        """A new token for the user (returned, shown once); the old one stops working at once."""
        token = "fw-" + secrets.token_urlsafe(32)
        self._set_token(name, hash_token(token))
        return token

    def _set_token(self, name: str, token_hash: str | None) -> None:
        with self.session(write=True) as s:
            user = s.scalar(select(User).where(User.name == name))
            if user is None:
                raise NotFound(f"no user {name!r} (see: flywheel db users)")
            user.token_hash = token_hash
            s.commit()

    def register_model_version(self, version: str, path: str) -> None:
        with self.session(write=True) as s:
            if s.get(ModelVersion, version) is None:
                s.add(ModelVersion(id=version, path=path))
                try:
                    s.commit()
                except IntegrityError:  # registered concurrently
                    s.rollback()

    # chat trees

    def create_conversation(self, owner: str, source: str = "web", title: str = "") -> int:
        with self.session(write=True) as s:
            conv = Conversation(owner=owner, source=source, title=title[:200])
            s.add(conv)
            s.commit()
            return conv.id

    def list_conversations(self, owner: str, limit: int = 100) -> list[dict[str, Any]]:
        """`owner`'s conversations, newest first."""
        with self.session() as s:
            rows = s.scalars(
                select(Conversation)
                .where(Conversation.owner == owner, Conversation.owner != UNIDENTIFIED)
                .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
                .limit(limit)
            )
            return [
                {"id": c.id, "title": c.title, "source": c.source, "updated_at": c.updated_at.isoformat()}
                for c in rows
            ]

    def all_conversations(self, limit: int = 100, source: str | None = None) -> list[dict[str, Any]]:
        """Everyone's conversations with their owners, newest first (admins)."""
        with self.session() as s:
            query = (
                select(Conversation) if source is None else select(Conversation).where(Conversation.source == source)
            )
            rows = s.scalars(query.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit))
            return [
                {
                    "id": c.id,
                    "title": c.title,
                    "source": c.source,
                    "owner": c.owner,
                    "updated_at": c.updated_at.isoformat(),
                }
                for c in rows
            ]

    def conversation(self, conv_id: int, owner: str, *, any_owner: bool = False) -> dict[str, Any]:
        """A conversation tree if `owner` owns it (`any_owner`: whoever does, for admins), else NotFound."""
        with self.session() as s:
            conv = s.get(Conversation, conv_id) if any_owner else self._owned(s, conv_id, owner)
            if conv is None:
                raise NotFound(f"no conversation {conv_id}")
            out = {"id": conv.id, "title": conv.title, "source": conv.source}
            if any_owner:
                out["owner"] = conv.owner
                return out | {"messages": [_message_dict(m) for m in conv.messages]}
            # The owner's own vote on each answer (+1, -1; None: none), so a page shows it again after a reload.
            mine = select(Vote.message_id, Vote.value).where(
                Vote.voter == owner, Vote.message_id.in_([m.id for m in conv.messages])
            )
            votes = {message_id: value for message_id, value in s.execute(mine)}
            return out | {"messages": [_message_dict(m) | {"vote": votes.get(m.id)} for m in conv.messages]}

    def _owned(self, s: Session, conv_id: int, owner: str, *, lock: bool = False) -> Conversation:
        """`owner`'s conversation; someone else's is "not found", exactly like a missing one: ids cannot be probed.
        `lock`: for a write into it, its row is locked first (PostgreSQL's FOR UPDATE; SQLite's writes are serialised
        anyway), so a delete and a write into the same conversation run one after the other, never interleaved."""
        conv = s.get(Conversation, conv_id, with_for_update=lock)
        if conv is None or conv.owner != owner or owner == UNIDENTIFIED:
            raise NotFound(f"no conversation {conv_id}")
        return conv

    def add_message(
        self,
        conv_id: int,
        owner: str,
        parent_id: int | None,
        role: str,
        content: str,
        model_version: str | None = None,
        finish_reason: str | None = None,
        *,
        parent_created: datetime | None = None,
    ) -> dict[str, Any]:
        """Append a message under `parent_id` (None: the root). Checks the turn order along the branch. With
        `parent_created` (`message_created` of the parent when the caller read it), NotFound unless the parent is still
        that message: SQLite hands a deleted conversation's highest ids to the next rows, so an answer generated for a
        deleted message must not land under a new one that took its id."""
        with self.session(write=True) as s:
            conv = self._owned(s, conv_id, owner, lock=True)
            if parent_created is not None and parent_id is not None:
                parent = s.get(Message, parent_id)
                if parent is None or parent.created_at != parent_created:
                    raise NotFound(f"no message {parent_id}")
            msg = self._append(s, conv, parent_id, role, content, model_version, finish_reason)
            s.commit()
            return _message_dict(msg)

    def add_user_turn(
        self, conv_id: int, owner: str, parent_id: int | None, content: str, *, system: str | None = None
    ) -> list[dict[str, Any]]:
        """A user's turn under `parent_id`; with `system`, a new root (`parent_id` None) under a system message.
        Both are stored or neither. Returns the stored messages, the system message first."""
        if system is not None and parent_id is not None:
            raise UserError("a system prompt starts a branch: it needs parent_id null")
        with self.session(write=True) as s:
            conv = self._owned(s, conv_id, owner, lock=True)
            out = []
            if system is not None:  # its turn order is checked with the user's turn below (alone it is no branch)
                with record_errors():
                    MessageRecord.make("system", system, where="messages[0]")
                out.append(Message(conversation_id=conv.id, parent_id=None, role="system", content=system))
                s.add(out[0])
                s.flush()
                parent_id = out[0].id
            out.append(self._append(s, conv, parent_id, "user", content))
            s.commit()
            return [_message_dict(m) for m in out]

    def _append(
        self,
        s: Session,
        conv: Conversation,
        parent_id: int | None,
        role: str,
        content: str,
        model_version: str | None = None,
        finish_reason: str | None = None,
    ) -> Message:
        branch = self._branch(s, parent_id) if parent_id is not None else []
        if branch and branch[0].conversation_id != conv.id:  # the answer of a message that does not exist: no probing
            raise NotFound(f"no message {parent_id}")
        # a model's answer is stored as given, even empty (as the API logs it); a person's turn needs text
        with record_errors():
            if role != "assistant":
                MessageRecord.make(role, content, where=f"messages[{len(branch)}]")
            check_turn_order([m.role for m in branch] + [role])
        msg = Message(
            conversation_id=conv.id,
            parent_id=parent_id,
            role=role,
            content=content,
            model_version=model_version,
            finish_reason=finish_reason,
        )
        s.add(msg)
        conv.updated_at = utcnow()
        if not conv.title and role == "user":
            conv.title = content.strip().splitlines()[0][:80]
        return msg

    def message_created(self, message_id: int) -> datetime | None:
        """When message `message_id` was stored (None: there is none): what tells it from a later row that took the id
        of a deleted one."""
        with self.session() as s:
            msg = s.get(Message, message_id)
            return None if msg is None else msg.created_at

    def rename_conversation(self, conv_id: int, owner: str, title: str) -> dict[str, Any]:
        """Give `owner`'s conversation a new title (NotFound for anyone else's)."""
        title = title.strip()
        if not title:
            raise UserError("title must not be blank")
        with self.session(write=True) as s:
            conv = self._owned(s, conv_id, owner, lock=True)
            conv.title = title[:200]
            s.commit()
            return {"id": conv.id, "title": conv.title}

    def delete_conversation(self, conv_id: int, owner: str) -> None:
        """Delete `owner`'s conversation with its messages and their votes (NotFound for anyone else's). Ranking tasks
        made from its prompts keep their own copy of the prompt and the labels given; only their link goes."""
        with self.session(write=True) as s:
            conv = self._owned(s, conv_id, owner, lock=True)
            ids = select(Message.id).where(Message.conversation_id == conv.id)
            s.execute(update(Task).where(Task.source_message_id.in_(ids)).values(source_message_id=None))
            s.execute(delete(Vote).where(Vote.message_id.in_(ids)))
            s.execute(delete(Message).where(Message.conversation_id == conv.id))  # a whole tree: no dangling parent
            s.execute(delete(Conversation).where(Conversation.id == conv.id))
            s.commit()

    def branch(self, message_id: int, owner: str | None = None) -> list[dict[str, Any]]:
        """The messages from the root down to `message_id` (its context)."""
        with self.session() as s:
            branch = self._branch(s, message_id)
            if owner is not None and not _owns(s.get(Conversation, branch[0].conversation_id), owner):
                raise NotFound(f"no message {message_id}")
            return [_message_dict(m) for m in branch]

    def conversation_of(self, message_id: int) -> int:
        with self.session() as s:
            msg = s.get(Message, message_id)
            if msg is None:
                raise NotFound(f"no message {message_id}")
            return msg.conversation_id

    def _branch(self, s: Session, message_id: int) -> list[Message]:
        out: list[Message] = []
        msg = s.get(Message, message_id)
        if msg is None:
            raise NotFound(f"no message {message_id}")
        while msg is not None:
            out.append(msg)
            msg = s.get(Message, msg.parent_id) if msg.parent_id is not None else None
        return out[::-1]

    def log_exchange(
        self,
        owner: str,
        source: str,
        messages: Sequence[dict[str, str]],
        answers: Sequence[tuple[str, str]],
        model_version: str,
    ) -> list[int]:
        """Log an API call: the request's messages as a chain and each answer (text, finish_reason) as a sibling."""
        with self.session(write=True) as s:
            title = next((m["content"] for m in messages if m["role"] == "user"), "")
            conv = Conversation(owner=owner, source=source, title=title.strip().splitlines()[0][:80] if title else "")
            s.add(conv)
            s.flush()
            parent = None
            for m in messages:
                msg = Message(conversation_id=conv.id, parent_id=parent, role=m["role"], content=m["content"])
                s.add(msg)
                s.flush()
                parent = msg.id
            ids = []
            for text, finish in answers:
                msg = Message(
                    conversation_id=conv.id,
                    parent_id=parent,
                    role="assistant",
                    content=text,
                    model_version=model_version,
                    finish_reason=finish,
                )
                s.add(msg)
                s.flush()
                ids.append(msg.id)
            s.commit()
            return ids

    def vote(
        self, message_id: int, voter: str, value: int, comment: str, key: str, owner: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """A thumbs up (+1) or down (-1) on an assistant message. One vote per voter and message (the schema holds
        it): a vote with a new key replaces the voter's earlier one (the same row, `created=True`); the same key again
        is a replay (`created=False`)."""
        key = _check_key(key)
        if value not in (1, -1):
            raise UserError("value must be 1 (thumbs up) or -1 (thumbs down)")

        def lookup(s: Session) -> Vote | None:
            return s.scalar(select(Vote).where(Vote.voter == voter, Vote.idempotency_key == key))

        def write(s: Session) -> tuple[Vote, Callable[[Session], bool]]:
            msg, conv = _locked_message(s, message_id)  # before its votes are read or written
            if msg is None or (owner is not None and not _owns(conv, owner)):
                raise NotFound(f"no message {message_id}")
            if msg.role != "assistant":
                raise UserError("only assistant messages can be voted on")
            vote = s.scalar(select(Vote).where(Vote.message_id == message_id, Vote.voter == voter))
            had_vote = vote is not None
            if vote is None:
                vote = Vote(message_id=message_id, voter=voter)
                s.add(vote)
            vote.value, vote.comment, vote.idempotency_key, vote.created_at = value, comment, key, utcnow()
            mine = select(Vote.id).where(Vote.message_id == message_id, Vote.voter == voter)
            # Lost race: a concurrent first vote of this voter on this message committed first.
            return vote, lambda s: not had_vote and s.scalar(mine) is not None

        return self._write_once(
            lookup,
            lambda found: _same_target(key, "message", found.message_id, message_id),
            write,
            _vote_dict,
            f"message {message_id} was voted on concurrently; retry",
        )

    def _write_once(
        self,
        lookup: Callable[[Session], R | None],
        same_target: Callable[[R], None],
        write: Callable[[Session], tuple[R, Callable[[Session], bool]]],
        as_dict: Callable[[R], dict[str, Any]],
        busy: str,
    ) -> tuple[dict[str, Any], bool]:
        """An idempotent write: (the row as a dict, created). `lookup` finds the row that this request's key wrote: a
        replay returns it (`same_target` raises Conflict where the key was used for something else). Else `write` adds
        the row to the session and returns it with a test, run after a failed commit, of whether the IntegrityError
        was a lost race (a concurrent write took the same unique place) rather than a real error. A lost race, or one
        with a retry of this request, is tried again in a new session (Conflict with `busy` after _RACE_ATTEMPTS
        losses); where `write` raises Conflict (no free slot), a retry of this request that committed meanwhile is
        returned instead."""
        for _ in range(_RACE_ATTEMPTS):
            with self.session(write=True) as s:
                found = lookup(s)
                if found is not None:
                    same_target(found)
                    return as_dict(found), False
                try:
                    row, lost_race = write(s)
                except Conflict:
                    if (found := lookup(s)) is not None:  # a retry of this submission committed meanwhile
                        return as_dict(found), False
                    raise
                try:
                    s.commit()
                    return as_dict(row), True
                except IntegrityError:  # a concurrent write took the slot, or raced with this key: look again
                    s.rollback()
                    if lookup(s) is None and not lost_race(s):
                        raise  # not a lost race: a real integrity error
        raise Conflict(busy)

    # labeling tasks

    def create_ranking_task(
        self,
        prompt: list[dict[str, str]],
        candidates: Sequence[tuple[str, str, str | None]],
        *,
        labels_needed: int = 1,
        source: str = "prompt_set",
        source_message_id: int | None = None,
        source_created: datetime | None = None,
    ) -> int | None:
        """A ranking task: `prompt` (messages ending with a user turn), candidates (text, model_version, finish). From
        a logged message (`source_message_id`, read with its `source_created`): None, and no task, when that message
        was deleted meanwhile (its conversation's owner took it back), or its id now belongs to another message."""
        prompt = check_messages_dicts(prompt, end="user", field="prompt")
        texts = [text.strip() for text, _, _ in candidates]
        if len(set(texts)) != len(texts) or len(texts) < 2 or not all(texts):
            raise UserError("a ranking task needs at least 2 distinct non-empty candidates")
        with self.session(write=True) as s:
            if source_message_id is not None:
                msg, _ = _locked_message(s, source_message_id)
                if msg is None or (source_created is not None and msg.created_at != source_created):
                    return None
            task = Task(
                kind="ranking",
                prompt=prompt,
                source=source,
                source_message_id=source_message_id,
                labels_needed=max(1, labels_needed),
            )
            s.add(task)
            s.flush()
            for pos, (text, version, finish) in enumerate(candidates):
                s.add(Candidate(task_id=task.id, position=pos, text=text, model_version=version, finish_reason=finish))
            s.commit()
            return task.id

    def create_gate_task(
        self, prompt: list[dict[str, str]], answers: Sequence[tuple[str, str, str]], *, labels_needed: int = 1
    ) -> int | None:
        """A ranking task of the deployment gate (`flywheel round --gate-prompts`): the answers (text, model version,
        model path) of the incumbent and the candidate policies to one held-out prompt, ranked blind in the
        workbench like any ranking task. Answers with the same text become one candidate (the policies tie there);
        None when fewer than 2 distinct answers are left (nothing to rank). Gate tasks never reach an export: their
        prompts stay held out from training."""
        distinct: dict[str, tuple[str, str, str | None]] = {}
        for text, version, path in answers:
            if not isinstance(text, str) or not text.strip():
                raise UserError("a gate answer needs non-empty text")
            self.register_model_version(version, path)
            distinct.setdefault(text.strip(), (text, version, None))
        if len(distinct) < 2:
            return None
        return self.create_ranking_task(prompt, list(distinct.values()), labels_needed=labels_needed, source="gate")

    def gate_results(self, task_ids: Sequence[int]) -> list[dict[str, Any]]:
        """Each gate task's answers (position, text, model version) and the rankings it has so far (groups of
        positions, best first)."""
        out = []
        with self.session() as s:
            for task_id in task_ids:
                task = s.get(Task, task_id)
                if task is None or task.source != "gate":
                    raise NotFound(f"no gate task {task_id}")
                labels = s.scalars(
                    select(RankingLabel).where(RankingLabel.task_id == task_id).order_by(RankingLabel.id)
                )
                out.append(
                    {
                        "id": task.id,
                        "labels_needed": task.labels_needed,
                        "candidates": [
                            {"position": c.position, "text": c.text, "model_version": c.model_version}
                            for c in task.candidates
                        ],
                        "rankings": [{"order": r.order, "labeler_id": r.labeler_id} for r in labels],
                    }
                )
        return out

    def create_roleplay_task(self, instruction: str, *, labels_needed: int = 1) -> int:
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError("a role-play task needs an instruction")
        with self.session(write=True) as s:
            task = Task(
                kind="roleplay",
                prompt=None,
                instruction=instruction.strip(),
                source="admin",
                labels_needed=max(1, labels_needed),
            )
            s.add(task)
            s.commit()
            return task.id

    def unused_chat_prompts(self, limit: int) -> list[tuple[list[dict[str, str]], int, datetime]]:
        """The contexts of the latest logged user messages that no task was made from yet: (messages, message id, when
        it was stored). A context that holds an empty answer (a model's, kept as given) is no prompt for the trainers:
        skipped."""
        with self.session() as s:
            used = select(Task.source_message_id).where(Task.source_message_id.is_not(None))
            rows = s.scalars(
                select(Message)
                .where(Message.role == "user", Message.id.not_in(used))
                .order_by(Message.id.desc())
                .limit(limit)
            ).all()
            branches = [(self._branch(s, row.id), row) for row in rows]
            return [
                ([_turn(m) for m in b], row.id, row.created_at)
                for b, row in branches
                if all(m.content.strip() for m in b)
            ]

    def next_task(self, user_id: int, kind: str) -> dict[str, Any] | None:
        """The oldest task of `kind` that still needs labels and that this user has neither labeled nor skipped."""
        return self.next_task_and_waiting(user_id, kind)[0]

    def next_task_and_waiting(self, user_id: int, kind: str) -> tuple[dict[str, Any] | None, int]:
        """`next_task`, and how many tasks it could offer this user now (that one included), read together."""
        open_ = _open_for(user_id, kind)
        with self.session() as s:
            task = s.scalar(select(Task).where(open_).order_by(Task.id).limit(1))
            if task is None:
                return None, 0
            return self._task_dict(task, user_id), s.scalar(select(func.count()).select_from(Task).where(open_)) or 1

    def skip_task(self, user_id: int, task_id: int, reason: str = "") -> tuple[dict[str, Any], bool]:
        """This labeler passes over the task: `next_task` no longer offers it to them (they may still label it by id).
        (the skip, created): skipping a task twice keeps the first skip. Conflict where they labeled it already."""

        def lookup(s: Session) -> TaskSkip | None:
            return s.scalar(select(TaskSkip).where(TaskSkip.task_id == task_id, TaskSkip.labeler_id == user_id))

        def write(s: Session) -> tuple[TaskSkip, Callable[[Session], bool]]:
            task = s.get(Task, task_id)
            if task is None:
                raise NotFound(f"no task {task_id}")
            if _labeled(s, _label_table(task.kind), task_id, user_id):
                did = "ranked" if task.kind == "ranking" else "demonstrated"
                raise Conflict(f"task {task_id} was already {did} by this labeler: there is nothing to skip")
            row = TaskSkip(task_id=task_id, labeler_id=user_id, reason=reason)
            s.add(row)
            return row, lambda s: lookup(s) is not None  # a concurrent skip of the same task by this labeler

        busy = f"task {task_id} is being skipped concurrently; retry"
        return self._write_once(lookup, lambda found: None, write, _skip_dict, busy)

    def task(self, task_id: int, user_id: int) -> dict[str, Any]:
        with self.session() as s:
            task = s.get(Task, task_id)
            if task is None:
                raise NotFound(f"no task {task_id}")
            return self._task_dict(task, user_id)

    def _task_dict(self, task: Task, user_id: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": task.id,
            "kind": task.kind,
            "prompt": task.prompt,
            "instruction": task.instruction,
        }
        if task.kind == "ranking":
            cands = [{"id": c.id, "text": c.text} for c in task.candidates]
            random.Random(f"{task.id}:{user_id}").shuffle(cands)  # per-labeler order: no position bias in the data
            out["candidates"] = cands
        return out

    def submit_ranking(
        self, user_id: int, task_id: int, order: Any, *, unsafe: Sequence[int] = (), comment: str = "", key: str
    ) -> tuple[dict[str, Any], bool]:
        """`order`: groups of candidate ids, best first (a group of several = a tie); `unsafe`: candidate ids.
        Conflict when this labeler ranked the task already or the task has all the labels it needs."""
        key = _check_key(key)

        def lookup(s: Session) -> RankingLabel | None:
            return s.scalar(
                select(RankingLabel).where(RankingLabel.labeler_id == user_id, RankingLabel.idempotency_key == key)
            )

        def write(s: Session) -> tuple[RankingLabel, Callable[[Session], bool]]:
            task = s.get(Task, task_id)
            if task is None or task.kind != "ranking":
                raise NotFound(f"no ranking task {task_id}")
            position = {c.id: c.position for c in task.candidates}
            groups = _order_positions(order, position)
            if not isinstance(unsafe, list | tuple) or any(u not in position for u in unsafe):
                raise UserError("unsafe must list candidate ids of this task")
            slot = _free_slot(s, RankingLabel, task, user_id, "ranked")
            row = RankingLabel(
                task_id=task_id,
                labeler_id=user_id,
                slot=slot,
                order=groups,
                unsafe=sorted({position[u] for u in unsafe}),
                comment=str(comment or ""),
                idempotency_key=key,
            )
            s.add(row)
            return row, lambda s: _raced(s, RankingLabel, task_id, slot, user_id)

        return self._write_once(
            lookup,
            lambda found: _same_target(key, "task", found.task_id, task_id),
            write,
            _ranking_dict,
            f"task {task_id} is being labeled concurrently; retry",
        )

    def submit_demonstration(
        self, user_id: int, task_id: int | None, messages: Any, *, suggestions: Sequence[dict[str, Any]] = (), key: str
    ) -> tuple[dict[str, Any], bool]:
        """A role-play conversation (ends with an assistant turn). `suggestions`: the model's drafts,
        `{"turn": index in messages, "text", "model_version"}`; `edited` records whether the labeler changed one.
        With a task: Conflict when this labeler wrote one for it already or it has all the labels it needs."""
        key = _check_key(key)
        messages = check_messages_dicts(messages, end="assistant")
        drafts = [
            dict(turn=int(d["turn"]), text=str(d["text"]), model_version=str(d.get("model_version", "")))
            for d in suggestions
            if isinstance(d, dict) and "turn" in d and "text" in d
        ]
        if any(not 0 <= d["turn"] < len(messages) for d in drafts):
            raise UserError("a suggestion's turn is outside the conversation")
        edited = any(messages[d["turn"]]["content"] != d["text"] for d in drafts) or not drafts

        def lookup(s: Session) -> Demonstration | None:
            return s.scalar(
                select(Demonstration).where(Demonstration.labeler_id == user_id, Demonstration.idempotency_key == key)
            )

        def write(s: Session) -> tuple[Demonstration, Callable[[Session], bool]]:
            slot = None
            if task_id is not None:
                task = s.get(Task, task_id)
                if task is None or task.kind != "roleplay":
                    raise NotFound(f"no role-play task {task_id}")
                slot = _free_slot(s, Demonstration, task, user_id, "written a demonstration for")
            row = Demonstration(
                task_id=task_id,
                labeler_id=user_id,
                slot=slot,
                messages=messages,
                suggestions=drafts,
                edited=edited,
                idempotency_key=key,
            )
            s.add(row)
            return row, lambda s: slot is not None and _raced(s, Demonstration, task_id, slot, user_id)

        return self._write_once(
            lookup,
            lambda found: _same_target(key, "task", found.task_id, task_id),
            write,
            _demo_dict,
            f"task {task_id} is being labeled concurrently; retry",
        )

    # admin

    def overview(self) -> dict[str, Any]:
        """Task queue, progress per labeler, inter-labeler agreement on rankings, and the latest skips with their
        reasons."""
        with self.session() as s:
            queue = {}
            for kind, table in (("ranking", RankingLabel), ("roleplay", Demonstration)):
                counts = dict(
                    s.execute(
                        select(table.task_id, func.count()).where(table.task_id.is_not(None)).group_by(table.task_id)
                    ).all()
                )
                tasks = s.execute(select(Task.id, Task.labels_needed).where(Task.kind == kind)).all()
                skips = s.scalar(
                    select(func.count()).select_from(TaskSkip).join(Task, Task.id == TaskSkip.task_id)
                    .where(Task.kind == kind)
                )  # fmt: skip
                queue[kind] = {
                    "tasks": len(tasks),
                    "done": sum(counts.get(t, 0) >= need for t, need in tasks),
                    "labels": sum(min(counts.get(t, 0), need) for t, need in tasks),
                    "labels_needed": sum(need for _, need in tasks),
                    "skips": skips,
                }
            names = dict(s.execute(select(User.id, User.name)).all())
            progress: dict[str, dict[str, int]] = {
                u.name: {"rankings": 0, "demonstrations": 0, "skipped": 0, "role": u.role}
                for u in s.scalars(select(User))
            }
            for uid, n in s.execute(select(RankingLabel.labeler_id, func.count()).group_by(RankingLabel.labeler_id)):
                progress[names[uid]]["rankings"] = n
            for uid, n in s.execute(select(Demonstration.labeler_id, func.count()).group_by(Demonstration.labeler_id)):
                progress[names[uid]]["demonstrations"] = n
            for uid, n in s.execute(select(TaskSkip.labeler_id, func.count()).group_by(TaskSkip.labeler_id)):
                progress[names[uid]]["skipped"] = n
            latest_skips = [
                {
                    "task_id": k.task_id,
                    "kind": kind,
                    "labeler": names[k.labeler_id],
                    "reason": k.reason,
                    "created_at": k.created_at.isoformat(timespec="seconds"),
                }
                for k, kind in s.execute(
                    select(TaskSkip, Task.kind)
                    .join(Task, Task.id == TaskSkip.task_id)
                    .order_by(TaskSkip.id.desc())
                    .limit(LATEST_SKIPS)
                )
            ]
            labels = s.execute(select(RankingLabel.task_id, RankingLabel.labeler_id, RankingLabel.order)).all()
            agreement = pairwise_agreement([(t, names[u], order) for t, u, order in labels])
            votes = dict(s.execute(select(Vote.value, func.count()).group_by(Vote.value)).all())
            return {
                "queue": queue,
                "labelers": progress,
                "agreement": agreement,
                "skips": latest_skips,
                "votes": {"up": votes.get(1, 0), "down": votes.get(-1, 0)},
            }


def pairwise_agreement(labels: Sequence[tuple[int, str, list[list[int]]]]) -> dict[str, Any]:
    """Inter-labeler agreement: over tasks ranked by several labelers, the fraction of candidate pairs that two
    labelers both ordered strictly (no tie) and ordered the same way. Returns the overall rate, the pairs compared,
    and each labeler's rate against everyone else (None where nothing could be compared)."""
    by_task: dict[int, list[tuple[str, dict[int, int]]]] = defaultdict(list)
    for task_id, labeler, order in labels:
        by_task[task_id].append((labeler, {c: g for g, group in enumerate(order) for c in group}))
    agree = compared = 0
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ranks in by_task.values():
        for (name_a, a), (name_b, b) in itertools.combinations(ranks, 2):
            for i, j in itertools.combinations(sorted(set(a) & set(b)), 2):
                if a[i] == a[j] or b[i] == b[j]:
                    continue
                same = int((a[i] < a[j]) == (b[i] < b[j]))
                agree += same
                compared += 1
                for name in (name_a, name_b):
                    per[name][0] += same
                    per[name][1] += 1
    return {
        "rate": agree / compared if compared else None,
        "pairs": compared,
        "per_labeler": {name: {"rate": a / n, "pairs": n} for name, (a, n) in sorted(per.items())},
    }


def _order_positions(order: Any, position: dict[int, int]) -> list[list[int]]:
    """Candidate-id groups -> position groups; every candidate exactly once, at least two groups."""
    if not isinstance(order, list | tuple) or not all(isinstance(g, list | tuple) and g for g in order):
        raise UserError("order must be a list of non-empty groups of candidate ids, best first")
    flat = [c for g in order for c in g]
    if len(flat) != len(position) or set(flat) != set(position):
        raise UserError("order must name every candidate of the task exactly once")
    if len(order) < 2:
        raise UserError("all candidates tied: a ranking must prefer something (or skip the task)")
    return [sorted(position[c] for c in g) for g in order]


def _locked_message(s: Session, message_id: int) -> tuple[Message | None, Conversation | None]:
    """Message `message_id` and its conversation, whose row is locked first (as every write into a conversation locks
    it: `Store._owned`), so that a delete of it waits for this session or went first; (None, None) if it is gone."""
    msg = s.get(Message, message_id)
    if msg is None:
        return None, None
    conv = s.get(Conversation, msg.conversation_id, with_for_update=True)
    msg = s.get(Message, message_id, populate_existing=True)  # read again under the lock
    return (msg, conv) if msg is not None and conv is not None else (None, None)


def _owns(conv: Conversation | None, owner: str) -> bool:
    """Whether `owner` owns `conv` (None: a conversation deleted meanwhile, nobody's)."""
    return conv is not None and conv.owner == owner and owner != UNIDENTIFIED


def _open_for(user_id: int, kind: str) -> Any:
    """The condition on `Task` of a task of `kind` that still needs labels and that this user has neither labeled nor
    skipped."""
    if kind not in get_args(TaskKind):
        raise UserError(f"unknown task kind {kind!r} (ranking or roleplay)")
    table = _label_table(kind)
    given = select(func.count()).where(table.task_id == Task.id).correlate(Task).scalar_subquery()
    mine = select(table.id).where(table.task_id == Task.id, table.labeler_id == user_id).correlate(Task)
    skipped = select(TaskSkip.id).where(TaskSkip.task_id == Task.id, TaskSkip.labeler_id == user_id).correlate(Task)
    return and_(Task.kind == kind, given < Task.labels_needed, ~mine.exists(), ~skipped.exists())


def _free_slot(s: Session, table: type[RankingLabel] | type[Demonstration], task: Task, user_id: int, did: str) -> int:
    """The lowest free one of the task's `labels_needed` label slots; Conflict if this labeler has one or the task has
    all its labels. Two submissions that pick the same slot concurrently cannot both commit: (task, slot) is unique."""
    if _labeled(s, table, task.id, user_id):
        raise Conflict(f"task {task.id} was already {did} by this labeler")
    used = _slots(s, table, task.id)
    free = sorted(set(range(task.labels_needed)) - used)
    if len(used) >= task.labels_needed or not free:
        raise Conflict(f"task {task.id} already has the {task.labels_needed} label(s) it needs")
    return free[0]


def _raced(s: Session, table: type[RankingLabel] | type[Demonstration], task_id: int, slot: int, user_id: int) -> bool:
    """After a failed insert: did a concurrent submission take the slot, or give this labeler a label of the task?"""
    return slot in _slots(s, table, task_id) or _labeled(s, table, task_id, user_id)


def _label_table(kind: str) -> type[RankingLabel] | type[Demonstration]:
    """The table of a task kind's labels: rankings for ranking tasks, demonstrations for role-play ones."""
    return RankingLabel if kind == "ranking" else Demonstration


def _labeled(s: Session, table: type[RankingLabel] | type[Demonstration], task_id: int, user_id: int) -> bool:
    """Whether this labeler has a label of the task in `table`."""
    return s.scalar(select(table.id).where(table.task_id == task_id, table.labeler_id == user_id)) is not None


def _slots(s: Session, table: type[RankingLabel] | type[Demonstration], task_id: int | None) -> set[int]:
    return set(s.scalars(select(table.slot).where(table.task_id == task_id)))


def _turn(m: Message) -> dict[str, str]:
    return {"role": m.role, "content": m.content}


def _same_target(key: str, what: str, stored: int | None, asked: int | None) -> None:
    """A retry repeats its submission; a key reused for another message or task is no retry: Conflict, where
    answering with the stored row would drop the new submission without a word."""
    if stored != asked:
        raise Conflict(
            f"idempotency_key {key!r} was used for {what} {stored}, not {what} {asked}: a new submission needs a "
            "new key"
        )


def _message_dict(m: Message) -> dict[str, Any]:
    return {
        "id": m.id,
        "parent_id": m.parent_id,
        "role": m.role,
        "content": m.content,
        "model_version": m.model_version,
        "finish_reason": m.finish_reason,
    }


def _vote_dict(v: Vote) -> dict[str, Any]:
    return {"id": v.id, "message_id": v.message_id, "value": v.value, "comment": v.comment}


def _ranking_dict(r: RankingLabel) -> dict[str, Any]:
    return {"id": r.id, "task_id": r.task_id, "order": r.order, "unsafe": r.unsafe}


def _skip_dict(k: TaskSkip) -> dict[str, Any]:
    return {"id": k.id, "task_id": k.task_id, "reason": k.reason}


def _demo_dict(d: Demonstration) -> dict[str, Any]:
    return {"id": d.id, "task_id": d.task_id, "messages": d.messages, "edited": d.edited}

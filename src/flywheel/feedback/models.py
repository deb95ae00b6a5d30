"""The feedback database's tables (SQLAlchemy 2 declarative models).

- `users`: chat users, labelers and admins; `token_hash` is the SHA-256 of the API token (the token itself is shown
  once), NULL once the token is revoked.
- `model_versions`: every model the server has served (`id` = directory name + a content hash).
- `conversations` / `messages`: chat trees. A message points at its `parent`; a regenerated answer is a sibling (same
  parent), so every answer ever shown is kept with the `model_version` that produced it.
- `votes`: thumbs up (+1) / down (-1) on an assistant message, with an optional comment; one per voter and message.
- `tasks`: the labelers' queue. A ranking task holds a prompt (messages) and its sampled `candidates`; a role-play task
  holds an instruction. `labels_needed` labelers answer each task (>= 2 gives inter-labeler agreement).
- `rankings`: one labeler's order of a task's candidates (groups of candidate positions, best first; ties grouped) and
  the candidates flagged unsafe. `demonstrations`: a role-play conversation written by a labeler.
- `task_skips`: a task a labeler chose not to label (with an optional reason); it is not offered to them again.

Every submission carries an idempotency key, unique per user: a retried request returns the stored row. The schema
holds the data rules: a task gets at most `labels_needed` labels (each takes a `slot` 0..labels_needed-1, unique per
task), one ranking and one demonstration per labeler and task, one vote per voter and message.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import JSON, CheckConstraint, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("user", "labeler", "admin")  # user: chat only; labeler: chat and labeling; admin: everything
TaskKind = Literal["ranking", "roleplay"]  # a labeling task: rank K answers, or write the reply in a role-play


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # stored naive, in UTC, the same on SQLite and PostgreSQL


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # "user" | "labeler" | "admin"
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)  # sha256 hex of the token; None: revoked
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # e.g. "final-3fa4c1d2"
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str] = mapped_column(String(20))  # "web" | "api"
    owner: Mapped[str] = mapped_column(String(100), index=True)  # user name, or the browser's anonymous client id
    title: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    messages: Mapped[list[Message]] = relationship(back_populates="conversation", order_by="Message.id")


class Message(Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), index=True)
    role: Mapped[str] = mapped_column(String(20))  # "system" | "user" | "assistant"
    content: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))  # assistant messages only
    finish_reason: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    conversation: Mapped[Conversation] = relationship(back_populates="messages")


class Vote(Base):
    __tablename__ = "votes"
    __table_args__ = (
        UniqueConstraint("voter", "idempotency_key", name="uq_votes_key"),
        UniqueConstraint("message_id", "voter", name="uq_votes_message_voter"),  # a second vote replaces the first
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"), index=True)
    voter: Mapped[str] = mapped_column(String(100))  # user name or anonymous client id
    value: Mapped[int]  # +1 | -1
    comment: Mapped[str] = mapped_column(Text, default="")
    idempotency_key: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)  # "ranking" | "roleplay"
    prompt: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)  # ranking: messages ending with a user turn
    instruction: Mapped[str] = mapped_column(Text, default="")  # role-play: what to write about
    source: Mapped[str] = mapped_column(String(20))  # "prompt_set" | "conversation" | "admin" | "gate"
    source_message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"))
    labels_needed: Mapped[int] = mapped_column(default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    candidates: Mapped[list[Candidate]] = relationship(order_by="Candidate.position")


class Candidate(Base):
    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("task_id", "position", name="uq_candidates_position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    position: Mapped[int]  # 0..K-1
    text: Mapped[str] = mapped_column(Text)
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.id"))
    finish_reason: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RankingLabel(Base):
    __tablename__ = "rankings"
    __table_args__ = (
        UniqueConstraint("labeler_id", "idempotency_key", name="uq_rankings_key"),
        UniqueConstraint("task_id", "labeler_id", name="uq_rankings_task_labeler"),
        UniqueConstraint("task_id", "slot", name="uq_rankings_task_slot"),
        CheckConstraint("slot >= 0", name="ck_rankings_slot"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    slot: Mapped[int]  # 0..labels_needed-1: which of the task's labels this is (unique per task: never more)
    order: Mapped[list[list[int]]] = mapped_column(JSON)  # groups of candidate positions, best first
    unsafe: Mapped[list[int]] = mapped_column(JSON, default=list)  # candidate positions flagged unsafe
    comment: Mapped[str] = mapped_column(Text, default="")
    idempotency_key: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Demonstration(Base):
    __tablename__ = "demonstrations"
    __table_args__ = (
        UniqueConstraint("labeler_id", "idempotency_key", name="uq_demonstrations_key"),
        UniqueConstraint("task_id", "labeler_id", name="uq_demonstrations_task_labeler"),
        UniqueConstraint("task_id", "slot", name="uq_demonstrations_task_slot"),
        CheckConstraint(
            "(task_id IS NULL) = (slot IS NULL) AND (slot IS NULL OR slot >= 0)", name="ck_demonstrations_slot"
        ),
        Index("ix_demonstrations_task", "task_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"))
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    slot: Mapped[int | None]  # like rankings.slot for a task's demonstrations; None for free-form ones (no task)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # the whole conversation, ends with assistant
    suggestions: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)  # model drafts: turn, text, version
    edited: Mapped[bool] = mapped_column(default=False)  # some assistant turn differs from the model's draft
    idempotency_key: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskSkip(Base):
    """A task a labeler passed over (they cannot judge it, or would rather not); `/api/label/next` no longer offers it
    to them. One per labeler and task; it does not count as a label."""

    __tablename__ = "task_skips"
    __table_args__ = (UniqueConstraint("task_id", "labeler_id", name="uq_task_skips_task_labeler"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    labeler_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

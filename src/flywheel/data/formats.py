"""The record types every stage trains on, and the rules that make a record valid.

- `Message(role, content)`: one turn; roles are system / user / assistant.
- `Conversation(messages)`: an optional first system message, then user and assistant turns alternating from user
  (SFT data also ends with an assistant turn: `validate(require_final_assistant=True)`).
- `Ranking(prompt, completions, order)`: K >= 2 answers to one prompt ranked best first, ties grouped
  (`order=[[2], [0, 1], [3]]`); `pairs()` gives the (winner, loser) pairs the reward model trains on.
- `Comparison(prompt, chosen, rejected)`: a K=2 ranking, as DPO and TRL write it.
- A prompt is a plain `list[Message]` that ends with a user turn (`validate_prompt`).

Objects validate themselves when built, so code that holds one can rely on it. A broken record raises
`RecordError`, a `UserError` whose `reason` is a short stable key (`"unknown role"`, `"all tied"`, ...) that the
readers in `flywheel.data.io` count when they skip bad records. This module imports nothing heavy (no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flywheel.errors import UserError

ROLES = ("system", "user", "assistant")


class RecordError(UserError):
    """One bad record. `reason` is a short stable key for counting (see `REASONS`); the message says the details."""

    def __init__(self, message: str, *, reason: str, path: str | None = None, line: int | None = None):
        self.reason = reason
        super().__init__(message, path=path, line=line)

    def at(self, path: str, line: int | None) -> RecordError:
        """The same error, located in a file."""
        return RecordError(self.message, reason=self.reason, path=path, line=line)


# Every `reason` a RecordError can carry, so callers (and tests) can rely on the set.
REASONS = (
    "bad JSON",
    "bad encoding",
    "not an object",
    "unknown format",
    "missing field",
    "wrong type",
    "unknown role",
    "empty content",
    "empty conversation",
    "roles out of order",
    "bad ending",
    "prompt mismatch",
    "too few candidates",
    "duplicate candidates",
    "bad order",
    "candidate out of range",
    "candidate not ranked",
    "candidate ranked twice",
    "all tied",
    "rejected by the chat template",
    "longer than the context",
)
TEMPLATE_REJECTED = "rejected by the chat template"  # the reason of a record that reads well but does not render
TOO_LONG = "longer than the context"  # a prompt that renders but leaves the model no room to answer


def type_name(value: Any) -> str:
    """The JSON name of a value's type, as users wrote it in their file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def lone_surrogate(text: str) -> str | None:
    """Why `text` is no valid Unicode (a lone UTF-16 surrogate, which a JSON escape such as "\\ud800" writes), or
    None: no tokenizer or database takes one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"contains a lone surrogate (U+{ord(text[err.start]):04X}) at position {err.start}: not valid Unicode"
    return None


def find_bad_string(value: Any, why: Callable[[str], str | None]) -> tuple[str, str] | None:
    """The first string (key or value) of a parsed JSON document that `why` finds wrong -> (where, why), `where` a
    dotted path (`messages.1.content`; "body" for the document itself); None if there is none."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            reason = why(item)
            if reason is not None:
                return where or "body", reason
        elif isinstance(item, dict):
            for key, sub in reversed(item.items()):
                path = f"{where}.{key}" if where else str(key)
                reason = why(key)
                if reason is not None:
                    return f"{path} (a key)", reason
                stack.append((path, sub))
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}" if where else str(i), sub) for i, sub in reversed(list(enumerate(item))))
    return None


def show(value: Any, limit: int = 40) -> str:
    """A short one-line repr of a user's value for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_role_content(role: Any, content: Any, where: str) -> None:
    if not isinstance(role, str):
        raise RecordError(f"{where}.role must be a string, found {type_name(role)}", reason="wrong type")
    if role not in ROLES:
        raise RecordError(
            f"{where} has unknown role {show(role)} (expected system, user or assistant)", reason="unknown role"
        )
    if not isinstance(content, str):
        raise RecordError(f"{where}.content must be a string, found {type_name(content)}", reason="wrong type")
    if not content.strip():
        raise RecordError(f"{where} ({role}) has empty content", reason="empty content")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str  # non-empty text

    def __post_init__(self) -> None:
        _check_role_content(self.role, self.content, "message")

    @classmethod
    def make(cls, role: Any, content: Any, *, where: str = "message") -> Message:
        """Build a message; a bad role or content raises a RecordError that names `where` (e.g. `messages[2]`)."""
        _check_role_content(role, content, where)
        return cls(role, content)

    @classmethod
    def from_dict(cls, obj: Any, *, where: str = "message") -> Message:
        """Parse `{"role": ..., "content": ...}` (other keys, e.g. OpenAI's `name` or `weight`, are ignored)."""
        if not isinstance(obj, dict):
            raise RecordError(
                f"{where} must be an object with 'role' and 'content', found {type_name(obj)}", reason="wrong type"
            )
        for key in ("role", "content"):
            if key not in obj:
                raise RecordError(
                    f"{where} has no {key!r} (found keys {sorted(map(str, obj))})", reason="missing field"
                )
        return cls.make(obj["role"], obj["content"], where=where)

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class Prompt(list[Message]):
    """A conversation so far, ending with a user message; `source` is the (file, line) it was read from, where
    a reader made it (so that a later stage, the chat template or a length limit, can name the line)."""

    source: tuple[str, int] | None = None


def check_messages(
    messages: Sequence[Message], *, field: str = "messages", after: str | None = None, end: str | None = None
) -> None:
    """Check turn order: an optional first system message, then user/assistant alternating from user.

    `after` is the role of the message just before this list when it continues another one (a TRL completion after
    its prompt): then the list must continue the alternation and may not hold a system message. `end` ("user" or
    "assistant") is the role the last message must have. Errors name the message as `{field}[i]`.
    """
    if not isinstance(messages, (list, tuple)):
        raise RecordError(f"{field} must be a list of messages, found {type_name(messages)}", reason="wrong type")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Message):
            raise RecordError(f"{field}[{i}] must be a Message, found {type_name(msg)}", reason="wrong type")
    check_turn_order([m.role for m in messages], field=field, after=after, end=end)


def check_turn_order(
    roles: Sequence[str], *, field: str = "messages", after: str | None = None, end: str | None = None
) -> None:
    """`check_messages`'s rules on the roles alone (for stored chats, whose answers may be empty)."""
    if not roles:
        raise RecordError(f"{field} has no messages", reason="empty conversation")
    prev = after
    for i, role in enumerate(roles):
        if role == "system":
            if i > 0 or after is not None:
                raise RecordError(
                    f"{field}[{i}] is a system message: only the first message may be one", reason="roles out of order"
                )
        else:
            expected = "assistant" if prev == "user" else "user"
            if role != expected:
                raise RecordError(
                    f"{field}[{i}] has role {role!r} where {expected!r} was expected "
                    "(after an optional system message, user and assistant turns alternate, starting with user)",
                    reason="roles out of order",
                )
        prev = role
    if prev == "system":
        raise RecordError(
            f"{field} has only a system message: a user message must follow it", reason="empty conversation"
        )
    if end is not None and prev != end:
        why = " (the answer trained on or scored)" if end == "assistant" else " (the model answers it)"
        raise RecordError(
            f"{field} must end with {'an' if end == 'assistant' else 'a'} {end} message{why}, found {prev!r} last",
            reason="bad ending",
        )


def validate_prompt(messages: Sequence[Message], *, field: str = "prompt") -> list[Message]:
    """Check a prompt-only record (a valid conversation ending with a user message) and return it as a list."""
    check_messages(messages, field=field, end="user")
    return list(messages)


def _check_labeler(labeler: Any) -> None:
    if labeler is not None and not isinstance(labeler, str):
        raise RecordError(f"labeler must be a string or null, found {type_name(labeler)}", reason="wrong type")


def _check_answer(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise RecordError(f"{where} must be a string, found {type_name(text)}", reason="wrong type")
    if not text.strip():
        raise RecordError(f"{where} is empty", reason="empty content")


@dataclass
class Conversation:
    messages: list[Message]
    source: tuple[str, int] | None = field(default=None, compare=False, repr=False)  # (file, line) it was read from

    def __post_init__(self) -> None:
        check_messages(self.messages)

    @classmethod
    def from_dicts(cls, messages: Sequence[dict[str, Any]]) -> Conversation:
        return cls([Message.from_dict(m, where=f"messages[{i}]") for i, m in enumerate(messages)])

    def validate(self, *, require_final_assistant: bool = False) -> None:
        """Re-check the turn order; SFT data must also end with an assistant message."""
        check_messages(self.messages, end="assistant" if require_final_assistant else None)

    def as_dicts(self) -> list[dict[str, str]]:
        """`[{"role", "content"}, ...]`, what `tokenization.render_conversation` takes."""
        return [m.as_dict() for m in self.messages]


@dataclass
class Ranking:
    """K >= 2 completions of one prompt; `order` lists groups of candidate indices best first (a group of >1 = tie)."""

    prompt: list[Message]  # ends with a user message
    completions: list[str]  # K distinct non-empty answers
    order: list[list[int]]  # e.g. [[2], [0, 1], [3]]: 2 is best, 0 and 1 tie, 3 is worst
    labeler: str | None = None
    source: tuple[str, int] | None = field(default=None, compare=False, repr=False)  # (file, line) it was read from

    def __post_init__(self) -> None:
        check_messages(self.prompt, field="prompt", end="user")
        _check_labeler(self.labeler)
        if not isinstance(self.completions, (list, tuple)):
            raise RecordError(
                f"completions must be a list of strings, found {type_name(self.completions)}", reason="wrong type"
            )
        k = len(self.completions)
        if k < 2:
            raise RecordError(f"a ranking needs at least 2 completions, found {k}", reason="too few candidates")
        first_seen: dict[str, int] = {}
        for i, text in enumerate(self.completions):
            _check_answer(text, f"completions[{i}]")
            j = first_seen.setdefault(text.strip(), i)
            if j != i:
                raise RecordError(
                    f"duplicate candidates: completions[{i}] repeats completions[{j}]", reason="duplicate candidates"
                )
        self._check_order(k)

    def _check_order(self, k: int) -> None:
        if not isinstance(self.order, (list, tuple)) or not all(isinstance(g, (list, tuple)) for g in self.order):
            raise RecordError(
                "order must be a list of groups of candidate indices, e.g. [[2], [0, 1], [3]]", reason="wrong type"
            )
        where: dict[int, int] = {}  # candidate -> group
        for g, group in enumerate(self.order):
            if not group:
                raise RecordError(f"order[{g}] is an empty group", reason="bad order")
            for idx in group:
                if isinstance(idx, bool) or not isinstance(idx, int):
                    raise RecordError(
                        f"order[{g}] holds {show(idx)}: candidate indices must be integers, found {type_name(idx)}",
                        reason="wrong type",
                    )
                if not 0 <= idx < k:
                    raise RecordError(
                        f"order names candidate {idx}, which does not exist: there are {k} "
                        f"completions (indices 0..{k - 1})",
                        reason="candidate out of range",
                    )
                if idx in where:
                    raise RecordError(
                        f"candidate {idx} is ranked twice (in order[{where[idx]}] and order[{g}])",
                        reason="candidate ranked twice",
                    )
                where[idx] = g
        missing = [i for i in range(k) if i not in where]
        if missing:
            names = (
                "candidate " + str(missing[0]) + " is"
                if len(missing) == 1
                else ("candidates " + ", ".join(map(str, missing)) + " are")
            )
            raise RecordError(
                f"{names} not ranked: every candidate must appear in order exactly once", reason="candidate not ranked"
            )
        if len(self.order) == 1:
            raise RecordError(f"all candidates tied: no preference (order is one group of {k})", reason="all tied")

    @property
    def k(self) -> int:
        return len(self.completions)

    def pairs(self) -> list[tuple[int, int]]:
        """(winner, loser) candidate indices for every pair in different groups; tied pairs are dropped."""
        return [
            (w, lo)
            for g, better in enumerate(self.order)
            for worse in self.order[g + 1 :]
            for w in better
            for lo in worse
        ]

    def prompt_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.prompt]


@dataclass
class Comparison:
    """One preference pair: `chosen` beats `rejected` as the answer to `prompt`."""

    prompt: list[Message]  # ends with a user message
    chosen: str
    rejected: str
    labeler: str | None = None

    def __post_init__(self) -> None:
        check_messages(self.prompt, field="prompt", end="user")
        _check_labeler(self.labeler)
        _check_answer(self.chosen, "chosen")
        _check_answer(self.rejected, "rejected")
        if self.chosen.strip() == self.rejected.strip():
            raise RecordError(
                "duplicate candidates: chosen and rejected are the same text", reason="duplicate candidates"
            )

    def to_ranking(self) -> Ranking:
        return Ranking(list(self.prompt), [self.chosen, self.rejected], [[0], [1]], labeler=self.labeler)

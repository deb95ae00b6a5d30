"""Readers: files of conversations, preferences, prompts and texts -> validated records, with `FILE:LINE:` errors.

    read_conversations("demos.jsonl")            # SFT: {"messages": [...]} or TRL {"prompt", "completion"}
    read_preferences("rankings.jsonl")           # RM/DPO: K-way rankings, TRL chosen/rejected, Anthropic HH-RLHF
    read_prompts("prompts.txt")                  # PPO: one prompt per line, or JSONL {"prompt"} / {"messages"}
    read_texts("corpus/")                        # pretraining: .txt documents split by blank lines, or {"text"}

A path is read by its kind: a directory is a dataset saved with `datasets.save_to_disk` (or, for texts, a folder
of .txt files), `.parquet` is a table (both need `pip install datasets`), `.txt` is plain text, anything else is
JSON Lines. Each record's format is detected from its keys, so one file may mix formats (docs/data-formats.md).
A name that is no local path but looks like a Hugging Face Hub dataset (`name` or `org/name`) is loaded with
`datasets.load_dataset(name, config, split=split)`; offline, from the hub cache (`is_hub_dataset_name`).

Every bad record raises a `RecordError` (a `UserError`) whose message is `FILE:LINE: what is wrong`; a dataset
row's "line" is its index + 1. With `skip_bad=True` bad records are dropped and one summary line is logged;
`read_with_report` also returns the counts as a `ReadReport`.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from flywheel.data.formats import (
    TEMPLATE_REJECTED,
    Comparison,
    Conversation,
    Message,
    Prompt,
    Ranking,
    RecordError,
    check_messages,
    find_bad_string,
    lone_surrogate,
    show,
    type_name,
    validate_prompt,
)
from flywheel.errors import UserError
from flywheel.utils import read_text

log = logging.getLogger("flywheel")

T = TypeVar("T")
R = TypeVar("R")
Kind = Literal["conversations", "preferences", "prompts", "texts"]

# Anthropic HH-RLHF transcripts: "\n\nHuman: ...\n\nAssistant: ..." (the very first marker may lack the blank line).
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# A missing path with one of these endings is a missing local file, never a hub dataset name.
_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv", ".tsv", ".arrow", ".gz", ".zst", ".yaml", ".yml")
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
EVAL_DATASET_SPLIT_HELP = "split of --eval-data when it names a hub dataset (it shares --dataset-config)"
SKIP_BAD_HELP = "skip malformed records (reported) instead of failing"  # every command that reads records


@dataclass
class DatasetOptions:
    """Which part of a Hugging Face Hub dataset `--data` names (a local path ignores them): the config fields of every
    command that reads data."""

    dataset_config: str = field(
        default="",
        metadata={
            "help": "config (subset) of a hub dataset given as --data (--prompts in ppo, rl, sample); empty = the "
            "dataset's default"
        },
    )
    dataset_split: str = field(
        default="train",
        metadata={
            "help": "split of a hub dataset given as --data (--prompts in ppo, rl, sample); slices work too: "
            "train[:1000], train[:10%]"
        },
    )

    def hub_split(self, split: str | None = None) -> dict[str, Any]:
        """The `config`/`split` keywords of the readers: --dataset-split, or `split` (that of --eval-data)."""
        return {"config": self.dataset_config or None, "split": split or self.dataset_split}


def is_hub_dataset_name(path: str | Path) -> bool:
    """Whether `path` is read from the Hugging Face Hub: it does not exist locally, has the shape of a hub name
    (`name` or `org/name`) and does not end like a data file (a missing `demos.jsonl` is a missing file)."""
    name = str(path)
    return (
        not Path(name).exists() and _HUB_NAME.fullmatch(name) is not None and not name.lower().endswith(_FILE_SUFFIXES)
    )


@dataclass
class ReadReport:
    """What a reader saw: `total` records (blank lines not counted), and the skipped ones counted by reason."""

    path: str
    total: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count, e.g. {"bad JSON": 2}
    first_error: str | None = None  # the first bad record's full message, "FILE:LINE: ..."

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def n_read(self) -> int:
        return self.total - self.n_skipped

    def reasons(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())

    def summary(self) -> str:
        """`skipped 3 of 120 records in data.jsonl: 2 bad JSON, 1 unknown role (first: data.jsonl:7: ...)`"""
        return (
            f"skipped {self.n_skipped} of {self.total} records in {self.path}: {self.reasons()} "
            f"(first: {self.first_error})"
        )


def render_records(
    records: Sequence[T],
    render: Callable[[T], R],
    *,
    skip_bad: bool = False,
    source: str = "data",
    skipped: list[T] | None = None,
) -> list[tuple[T, R]]:
    """(record, render(record)) for each record. A UserError from `render` (a chat template that rejects the
    conversation; a RecordError from `render` keeps its reason) becomes a RecordError at the record's FILE:LINE
    (`source` without a line for records built in code); with skip_bad such records are dropped (and appended to
    `skipped`) and summarised in one warning line, as the readers do."""
    report = ReadReport(source, total=len(records))
    out: list[tuple[T, R]] = []
    for record in records:
        try:
            out.append((record, render(record)))
        except UserError as err:
            path, line = getattr(record, "source", None) or (source, None)
            reason = err.reason if isinstance(err, RecordError) else TEMPLATE_REJECTED
            located = RecordError(err.message, reason=reason, path=path, line=line)
            if not skip_bad:
                raise located from None
            report.skipped[reason] += 1
            if skipped is not None:
                skipped.append(record)
            report.first_error = report.first_error or str(located)
    if report.skipped and not out:
        raise UserError(
            f"all {report.total} records are bad: {report.reasons()} (first: {report.first_error})", path=source
        )
    if report.skipped:
        log.warning(report.summary())
    return out


def read_conversations(
    path: str | Path, *, skip_bad: bool = False, config: str | None = None, split: str = "train"
) -> list[Conversation]:
    """SFT demonstrations: `{"messages": [...]}` or TRL `{"prompt", "completion"}` (strings or message lists).
    Every conversation ends with an assistant message."""
    return read_with_report(path, "conversations", skip_bad=skip_bad, config=config, split=split)[0]


def read_preferences(
    path: str | Path, *, skip_bad: bool = False, config: str | None = None, split: str = "train"
) -> list[Ranking]:
    """RM/DPO data: K-way rankings, TRL preference pairs (explicit or implicit prompt) and HH-RLHF transcripts,
    all as `Ranking`s (a pair is a K=2 ranking)."""
    return read_with_report(path, "preferences", skip_bad=skip_bad, config=config, split=split)[0]


def read_prompts(
    path: str | Path, *, skip_bad: bool = False, config: str | None = None, split: str = "train"
) -> list[Prompt]:
    """PPO prompts: a .txt file (one per line) or JSONL `{"prompt": text | messages}` / `{"messages": [...]}`.
    Every prompt ends with a user message."""
    return read_with_report(path, "prompts", skip_bad=skip_bad, config=config, split=split)[0]


def read_texts(
    path: str | Path, *, skip_bad: bool = False, config: str | None = None, split: str = "train"
) -> list[str]:
    """Pretraining text: .txt (documents separated by blank lines), a folder of .txt files, or JSONL `{"text"}`."""
    return read_with_report(path, "texts", skip_bad=skip_bad, config=config, split=split)[0]


def read_with_report(
    path: str | Path, kind: Kind, *, skip_bad: bool = False, config: str | None = None, split: str = "train"
) -> tuple[list[Any], ReadReport]:
    """Read `path` as `kind`; return the records and a `ReadReport`. The four `read_*` functions wrap this.
    `config` and `split` choose the part of a hub dataset that `path` names (`is_hub_dataset_name`)."""
    if kind not in _PARSERS:
        raise ValueError(f"kind must be one of {sorted(_PARSERS)}, got {kind!r}")
    parse = _PARSERS[kind]
    name = str(path)
    path = Path(path)
    report = ReadReport(name)
    records: list[Any] = []
    rows = _hub_rows(name, config, split) if is_hub_dataset_name(name) else _rows(path, kind)
    for where, line, obj in rows:
        report.total += 1
        try:
            if isinstance(obj, RecordError):
                raise obj
            if not isinstance(obj, dict):
                raise RecordError(
                    f"expected a JSON object, found {type_name(obj)}"
                    + (" (JSON Lines needs one object per line)" if isinstance(obj, list) else ""),
                    reason="not an object",
                )
            record = parse(obj)
            if hasattr(record, "source"):  # so that later stages (the chat template) can name the line too
                record.source = (where, line)
            records.append(record)
        except RecordError as err:
            located = err if err.path is not None else err.at(where, line)
            if not skip_bad:
                raise located from None
            report.skipped[err.reason] += 1
            if report.first_error is None:
                report.first_error = str(located)
    if report.total == 0:
        what = "the file is empty or holds only blank lines"
        if path.is_dir():
            what = "its files are empty or hold only blank lines" if any(path.iterdir()) else "the directory is empty"
        if is_hub_dataset_name(name):
            what = f"the split {hub_source(name, config, split)} is empty"
        raise UserError(f"no {kind} found: {what}", path=name)
    if not records:
        raise UserError(
            f"all {report.total} records are bad: {report.reasons()} (first: {report.first_error})", path=name
        )
    if report.skipped:
        log.warning(report.summary())
    return records, report


def parse_conversation(obj: dict[str, Any]) -> Conversation:
    """One SFT record (a decoded JSON object) -> a Conversation that ends with an assistant message."""
    if "messages" in obj:
        conv = Conversation(_messages(obj["messages"], "messages"))
        conv.validate(require_final_assistant=True)
        return conv
    if "prompt" in obj and "completion" in obj:
        prompt = _prompt(obj["prompt"], "prompt")
        completion = _turns(_answer_after(obj["prompt"], obj["completion"]), "completion", role="assistant")
        check_messages(completion, field="completion", after="user", end="assistant")
        return Conversation(prompt + completion)
    hint = ""
    if "chosen" in obj or "completions" in obj:
        hint = "; this looks like preference data (for rm/dpo, read_preferences)"
    elif "text" in obj:
        hint = "; this looks like plain text (for pretraining, read_texts)"
    raise _unknown(obj, "conversation", "'messages' (chat) or 'prompt' + 'completion' (TRL prompt-completion)" + hint)


def parse_ranking(obj: dict[str, Any]) -> Ranking:
    """One preference record -> a Ranking (a chosen/rejected pair becomes K=2)."""
    labeler = obj.get("labeler")
    if "completions" in obj:
        for key in ("prompt", "order"):
            if key not in obj:
                raise RecordError(f"a K-way ranking needs {key!r} (found keys {_keys(obj)})", reason="missing field")
        completions = obj["completions"]
        if not isinstance(completions, list):
            raise RecordError(
                f"completions must be a list of strings, found {type_name(completions)}", reason="wrong type"
            )
        return Ranking(_prompt(obj["prompt"], "prompt"), completions, _order(obj["order"]), labeler=labeler)
    if "chosen" in obj and "rejected" in obj:
        return _comparison(obj, labeler).to_ranking()
    hint = "; this looks like an SFT conversation (read_conversations)" if "messages" in obj else ""
    raise _unknown(
        obj,
        "preference",
        "'prompt' + 'completions' + 'order' (K-way ranking), 'prompt' + 'chosen' + 'rejected' "
        "(TRL preference) or 'chosen' + 'rejected' (HH-RLHF text or implicit-prompt conversations)" + hint,
    )


def parse_prompt(obj: dict[str, Any]) -> Prompt:
    """One prompt record -> messages ending with a user turn. `prompt` wins over `messages`: in datasets that have
    both (UltraChat) `messages` is the whole conversation."""
    if "prompt" in obj:
        return Prompt(_prompt(obj["prompt"], "prompt"))
    if "messages" in obj:
        return Prompt(validate_prompt(_messages(obj["messages"], "messages"), field="messages"))
    raise _unknown(obj, "prompt", "'prompt' (text or messages) or 'messages' ending with a user message")


def parse_text(obj: dict[str, Any]) -> str:
    """One pretraining document: `{"text": "..."}`."""
    if "text" not in obj:
        raise _unknown(obj, "text", "'text'")
    text = obj["text"]
    if not isinstance(text, str):
        raise RecordError(f"text must be a string, found {type_name(text)}", reason="wrong type")
    if not text.strip():
        raise RecordError("text is empty", reason="empty content")
    return text


_PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "conversations": parse_conversation,
    "preferences": parse_ranking,
    "prompts": parse_prompt,
    "texts": parse_text,
}


def _keys(obj: dict[str, Any]) -> str:
    keys = [show(str(k), 30) for k in list(obj)[:12]]
    return "[" + ", ".join(keys) + (", ..." if len(obj) > 12 else "") + "]"


def _unknown(obj: dict[str, Any], what: str, expected: str) -> RecordError:
    found = f"keys {_keys(obj)}" if obj else "an empty object"
    return RecordError(f"no known {what} format matches {found}: expected {expected}", reason="unknown format")


def _messages(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise RecordError(f"{field} must be a list of messages, found {type_name(value)}", reason="wrong type")
    return [Message.from_dict(m, where=f"{field}[{i}]") for i, m in enumerate(value)]


def is_hh_text(text: str) -> bool:
    """An Anthropic HH-RLHF transcript: `\\n\\nHuman: ...\\n\\nAssistant: ...`."""
    return text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def parse_hh(text: str, field: str, *, prompt: bool = False) -> list[Message]:
    """Split an HH-RLHF transcript into messages. With `prompt=True` a final empty `Assistant:` turn (the cue for
    the model to answer, as in Dahoas/full-hh-rlhf prompts) is dropped."""
    parts = _HH_TURN.split(text.lstrip())
    if parts[0].strip():  # the readers only pass text that `is_hh_text`; other callers may not
        raise RecordError(f"{field} has text before its first 'Human:' turn", reason="unknown format")
    turns = [(_HH_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if prompt and turns and turns[-1] == ("assistant", ""):
        turns.pop()
    return [Message.make(role, content, where=f"{field}[{i}]") for i, (role, content) in enumerate(turns)]


def _turns(value: Any, field: str, *, role: str) -> list[Message]:
    """A string is one message of `role`; a list is messages."""
    if isinstance(value, str):
        return [Message.make(role, value, where=field)]
    if isinstance(value, list):
        return _messages(value, field)
    raise RecordError(f"{field} must be a string or a list of messages, found {type_name(value)}", reason="wrong type")


def _prompt(value: Any, field: str) -> list[Message]:
    """A prompt: plain text (one user message), HH-RLHF text, or messages; it must end with a user message."""
    if isinstance(value, str) and is_hh_text(value):
        msgs = parse_hh(value, field, prompt=True)
    else:
        msgs = _turns(value, field, role="user")
    return validate_prompt(msgs, field=field)


def _answer_after(prompt: Any, answer: Any) -> Any:
    # After an HH prompt ("...\n\nAssistant:") the answer's leading space is the transcript's formatting, not content.
    return answer.strip() if isinstance(prompt, str) and isinstance(answer, str) and is_hh_text(prompt) else answer


def _order(value: Any) -> list[list[int]]:
    """`[[2], [0, 1], [3]]` (groups best first, a group is a tie), a flat `[2, 0, 1, 3]`, or a mix."""
    if not isinstance(value, list):
        raise RecordError(
            f"order must be a list like [[2], [0, 1], [3]] or [2, 0, 1, 3], found {type_name(value)}",
            reason="wrong type",
        )
    groups: list[list[int]] = []
    for g, item in enumerate(value):
        group = item if isinstance(item, list) else [item]
        for j, idx in enumerate(group):
            if isinstance(idx, bool) or not isinstance(idx, int):
                where = f"order[{g}][{j}]" if isinstance(item, list) else f"order[{g}]"
                raise RecordError(
                    f"{where} must be a candidate index (an integer), found {type_name(idx)}", reason="wrong type"
                )
        groups.append(group)
    return groups


def _comparison(obj: dict[str, Any], labeler: Any) -> Comparison:
    """A chosen/rejected pair in any of its spellings -> Comparison(prompt, chosen, rejected)."""
    chosen, rejected = obj["chosen"], obj["rejected"]
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list)):
            raise RecordError(
                f"{key} must be a string or a list of messages, found {type_name(value)}", reason="wrong type"
            )
    if type(chosen) is not type(rejected):
        raise RecordError(
            f"chosen is a {type_name(chosen)} but rejected is a {type_name(rejected)}: give both as "
            "text or both as message lists",
            reason="wrong type",
        )
    prompt = obj.get("prompt")
    if isinstance(chosen, str):
        if "prompt" in obj:  # TRL standard: prompt (text, HH text or messages) + two answers
            head = _prompt(prompt, "prompt")
            return Comparison(head, _answer_after(prompt, chosen), _answer_after(prompt, rejected), labeler=labeler)
        if not (is_hh_text(chosen) and is_hh_text(rejected)):
            raise RecordError(
                "chosen/rejected without a 'prompt' must be HH-RLHF transcripts "
                "('\\n\\nHuman: ...\\n\\nAssistant: ...'); otherwise add a 'prompt' field",
                reason="unknown format",
            )
        full_c, full_r = parse_hh(chosen, "chosen"), parse_hh(rejected, "rejected")
    else:
        full_c, full_r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        # With a text prompt and answers that restart from a user/system turn (UltraFeedback), the answers are whole
        # conversations and the prompt is only a label: split them as TRL's maybe_extract_prompt does.
        answers_only = bool(full_c) and full_c[0].role == "assistant"
        if "prompt" in obj and (answers_only or not isinstance(prompt, str)):
            head = _prompt(prompt, "prompt")
            for key, msgs in (("chosen", full_c), ("rejected", full_r)):
                check_messages(msgs, field=key, after="user", end="assistant")
            full_c, full_r = head + full_c, head + full_r
    return _split_pair(full_c, full_r, labeler)


def _split_pair(chosen: list[Message], rejected: list[Message], labeler: Any) -> Comparison:
    """Two whole conversations that share everything but their final assistant turn -> a Comparison."""
    check_messages(chosen, field="chosen", end="assistant")
    check_messages(rejected, field="rejected", end="assistant")
    if chosen == rejected:
        raise RecordError(
            "duplicate candidates: chosen and rejected are the same conversation", reason="duplicate candidates"
        )
    head_c, head_r = chosen[:-1], rejected[:-1]
    if head_c != head_r:
        n = min(len(head_c), len(head_r))
        i = next((i for i in range(n) if head_c[i] != head_r[i]), n)
        raise RecordError(
            f"chosen and rejected differ at message {i}, before their final assistant turns "
            f"({len(chosen)} vs {len(rejected)} messages): they must share the prompt",
            reason="prompt mismatch",
        )
    return Comparison(head_c, chosen[-1].content, rejected[-1].content, labeler=labeler)


def _rows(path: Path, kind: str) -> Iterator[tuple[str, int, Any]]:
    """(file, line number, decoded record or the RecordError that decoding raised) for every record of a file, a
    folder of files or a dataset. The file is the one to name in an error: a folder's shard, or `path` itself."""
    name = str(path)
    if not path.exists():
        raise UserError("no such file or directory", path=name)
    if path.is_dir():
        if any((path / m).exists() for m in _DATASET_MARKERS):
            return _at(name, _dataset_rows(path))
        shards = sorted(path.glob("*.parquet"))
        if shards:
            return (row for f in shards for row in _at(str(f), _parquet_rows(f)))
        if kind == "texts":
            files = sorted(path.glob("*.txt"))
            if not files:
                raise UserError(
                    "the directory holds no .txt files, no .parquet files and no dataset saved with `save_to_disk`",
                    path=name,
                )
            return (row for f in files for row in _at(str(f), _text_rows(f, documents=True)))
        raise UserError(
            f"a directory of {kind} must be a dataset saved with `datasets.Dataset.save_to_disk` or hold .parquet "
            "files",
            path=name,
        )
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _at(name, _parquet_rows(path))
    if suffix == ".txt":
        if kind == "texts":
            return _at(name, _text_rows(path, documents=True))
        if kind == "prompts":
            return _at(name, _text_rows(path, documents=False))
        raise UserError(
            f"{kind} cannot be read from a .txt file: use JSON Lines (see docs/data-formats.md)", path=name
        )
    if suffix == ".json" and _starts_with(path, "["):
        return _at(name, _json_array_rows(path))
    return _at(name, _jsonl_rows(path))


def _starts_with(path: Path, char: str) -> bool:
    """Whether the file's first non-blank character is `char` (a JSON array: `[`)."""
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head.startswith(char)


def _json_array_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """A .json file holding one array of records (what `json.dump(records, f)` and pandas' `to_json(orient="records")`
    write): each element, numbered by the line it starts on. A syntax error is one error at its line."""
    text = read_text(path)
    decoder = json.JSONDecoder()

    def blank(pos: int) -> int:  # the first non-blank position from pos
        return len(text) - len(text[pos:].lstrip())

    def line_of(pos: int) -> int:
        return 1 + text.count("\n", 0, pos)

    def bad(pos: int, what: str) -> tuple[int, RecordError]:
        col = pos - text.rfind("\n", 0, pos)
        return line_of(pos), RecordError(f"bad JSON: {what} at column {col}", reason="bad JSON")

    pos = blank(text.index("[") + 1)
    while not text.startswith("]", pos):
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            yield err.lineno, RecordError(f"bad JSON: {_json_message(err)} at column {err.colno}", reason="bad JSON")
            return
        except (ValueError, RecursionError) as err:  # nested too deep, a number too long to read
            yield bad(pos, _first_line(err) if isinstance(err, ValueError) else "nested too deep")
            return
        yield line_of(pos), _checked_text(obj)
        pos = blank(end)
        if text.startswith(",", pos):
            pos = blank(pos + 1)
            if text.startswith("]", pos):
                yield bad(pos, "a comma before ']'")
                return
        elif not text.startswith("]", pos):
            yield bad(pos, "expected ',' or ']'")
            return
    if blank(pos + 1) < len(text):
        yield bad(blank(pos + 1), "text after the array's ']'")


def _at(name: str, rows: Iterator[tuple[int, Any]]) -> Iterator[tuple[str, int, Any]]:
    for line, obj in rows:
        yield name, line, obj


def _lines(path: Path) -> Iterator[tuple[int, str | RecordError]]:
    """Decoded lines, split on "\\n" only: JSON strings may hold U+2028 and friends, which str.splitlines splits on."""
    try:
        f = path.open("rb")
    except OSError as err:
        raise UserError(f"cannot read: {err.strerror}", path=str(path)) from None
    with f:
        if f.read(2) == b"\x1f\x8b":
            raise UserError("a gzip-compressed file: decompress it first (gunzip)", path=str(path))
        f.seek(0)
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, RecordError(f"not valid UTF-8 (byte {err.start + 1} of the line)", reason="bad encoding")
                continue
            yield lineno, text.removeprefix("\ufeff") if lineno == 1 else text


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    for lineno, text in _lines(path):
        if isinstance(text, RecordError):
            yield lineno, text
        elif text.strip():
            try:
                # Without its line ending, so that an error at the end of the line points into it.
                yield lineno, _checked_text(json.loads(text.rstrip("\r\n")))
            except json.JSONDecodeError as err:
                hint = ""
                if lineno == 1 and text.strip() in ("[", "{"):
                    hint = " (this looks like a pretty-printed JSON file: JSON Lines needs one record per line)"
                message = f"bad JSON: {_json_message(err)} at column {err.colno}{hint}"
                yield lineno, RecordError(message, reason="bad JSON")
            except ValueError as err:  # a number too long to read (Python's 4300-digit limit)
                yield lineno, RecordError(f"bad JSON: {_first_line(err)}", reason="bad JSON")
            except RecursionError:
                yield lineno, RecordError("bad JSON: nested too deep", reason="bad JSON")


def _json_message(err: json.JSONDecodeError) -> str:
    """json's message without the " at" it ends some with ("Invalid control character at"): the column follows."""
    return err.msg.removesuffix(" at")


def _checked_text(obj: Any) -> Any:
    """`obj`, or a RecordError naming the string in it that holds a lone UTF-16 surrogate (`lone_surrogate`)."""
    found = find_bad_string(obj, lone_surrogate)
    return obj if found is None else RecordError(f"{found[0]} {found[1]}", reason="bad encoding")


def _text_rows(path: Path, *, documents: bool) -> Iterator[tuple[int, Any]]:
    """A .txt file as records: one prompt per non-blank line (stripped), or documents separated by blank lines
    (numbered by their first line)."""
    key = "text" if documents else "prompt"
    doc: list[str] = []
    start = 0
    for lineno, text in _lines(path):
        if isinstance(text, RecordError):
            yield lineno, text
            continue
        text = text.rstrip("\r\n")
        if not documents:
            if text.strip():
                yield lineno, {key: text.strip()}
        elif text.strip():
            if not doc:
                start = lineno
            doc.append(text)
        elif doc:
            yield start, {key: "\n".join(doc)}
            doc = []
    if doc:
        yield start, {key: "\n".join(doc)}


def hub_source(name: str, config: str | None, split: str) -> str:
    """How errors name a hub dataset's split: `org/name[train]`, `org/name[config:train]`."""
    return f"{name}[{config}:{split}]" if config else f"{name}[{split}]"


def _hub_rows(name: str, config: str | None, split: str) -> Iterator[tuple[str, int, Any]]:
    return _at(hub_source(name, config, split), _table_rows(load_hub_dataset(name, config, split)))


def load_hub_dataset(name: str, config: str | None, split: str) -> Any:
    """`datasets.load_dataset(name, config, split=split)`. When the Hub cannot be reached (HF_HUB_OFFLINE=1, no
    network), a copy in the hub cache is used: the one `hf download --repo-type dataset NAME` writes. Every failure
    is a one-line UserError naming the dataset."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"'{name}' is no local file or directory; reading it from the Hugging Face Hub needs the `datasets` "
            "package: pip install datasets"
        ) from None
    from huggingface_hub.errors import HfHubHTTPError

    from flywheel.models import offline_if_hub_unreachable

    if offline_if_hub_unreachable():
        datasets.config.HF_HUB_OFFLINE = True  # read once, at its import: without it, a minute of retries
    where = hub_source(name, config, split)
    try:
        return datasets.load_dataset(name, config, split=split)
    except ConnectionError as err:
        snapshot = _cached_dataset_snapshot(name)
        if snapshot is None:
            raise UserError(
                f"{name}: no such file or directory, and no Hugging Face Hub dataset of that name can be reached "
                f"or is in the local cache ({_first_line(err)})"
            ) from None
        log.info("%s: the Hub is unreachable; using the cached copy in %s", name, snapshot)
        try:
            return datasets.load_dataset(snapshot, config, split=split)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load the hub dataset {where}: {_first_line(err)}") from None
    except FileNotFoundError as err:  # datasets' DatasetNotFoundError: the Hub has no such (accessible) dataset
        raise UserError(f"{name}: no such file or directory, nor a hub dataset: {_first_line(err)}") from None
    except (OSError, ValueError, HfHubHTTPError) as err:
        raise UserError(f"cannot load the hub dataset {where}: {_first_line(err)}") from None


def _cached_dataset_snapshot(name: str) -> str | None:
    """The newest snapshot of hub dataset `name` in the local hub cache (its main branch), if there is one."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _dataset_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError:
        raise UserError(
            "reading a saved Hugging Face dataset needs the `datasets` package: pip install datasets", path=str(path)
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the dataset: {str(err).splitlines()[0]}", path=str(path)) from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise UserError(
                f"the dataset has splits {sorted(ds)}: give one split's directory, e.g. {path / 'train'}",
                path=str(path),
            )
        ds = next(iter(ds.values()))
    return _table_rows(ds)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:  # pyarrow comes with `datasets`; read it directly so nothing is written to the HF cache
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading .parquet needs pyarrow: pip install datasets", path=str(path)) from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"cannot read the parquet file: {str(err).splitlines()[0]}", path=str(path)) from None
    return _table_rows(table.to_pylist())


def _table_rows(rows: Any) -> Iterator[tuple[int, Any]]:
    # Columnar tables fill the columns a row lacks with null: drop those so detection by keys works on mixed files.
    for i, row in enumerate(rows):
        yield i + 1, {k: v for k, v in row.items() if v is not None}

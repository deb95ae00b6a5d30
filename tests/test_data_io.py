"""Record types and readers: every format each reader takes, and the exact `FILE:LINE:` error for every bad input."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from flywheel.data import (
    REASONS,
    Comparison,
    Conversation,
    Message,
    Ranking,
    RecordError,
    read_conversations,
    read_preferences,
    read_prompts,
    read_texts,
    read_with_report,
    validate_prompt,
)
from flywheel.data.io import parse_hh
from flywheel.errors import UserError

U, A, S = "user", "assistant", "system"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def jsonl(tmp_path: Path, *records: Any, name: str = "data.jsonl") -> Path:
    """Write records as JSON Lines; a str record is written verbatim (for broken lines)."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def error_of(reader, path: Path, **kwargs: Any) -> UserError:
    with pytest.raises(UserError) as info:
        reader(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return info.value


def assert_error_at(reader, path: Path, line: int | None, fragment: str, reason: str | None = None) -> str:
    err = error_of(reader, path)
    message = str(err)
    prefix = f"{path}:{line}: " if line is not None else f"{path}: "
    assert message.startswith(prefix), message
    assert fragment in message, message
    if reason is not None:
        assert isinstance(err, RecordError) and err.reason == reason, (getattr(err, "reason", None), message)
    if isinstance(err, RecordError):
        assert err.reason in REASONS
    return message


def record_error(fn, *args: Any, **kwargs: Any) -> RecordError:
    with pytest.raises(RecordError) as info:
        fn(*args, **kwargs)
    assert info.value.reason in REASONS
    assert "\n" not in str(info.value)
    return info.value


def test_pairs_drop_ties_and_cover_every_other_pair():
    r = Ranking([Message(U, "q")], ["a", "b", "c", "d"], [[2], [0, 1], [3]])
    assert r.pairs() == [(2, 0), (2, 1), (2, 3), (0, 3), (1, 3)]
    total = Ranking([Message(U, "q")], ["a", "b", "c"], [[1], [2], [0]])
    assert total.pairs() == [(1, 2), (1, 0), (2, 0)]
    assert r.k == 4


def test_conversation_as_dicts_and_final_assistant():
    conv = Conversation.from_dicts([msg(S, "be brief"), msg(U, "hi"), msg(A, "hello")])
    assert conv.as_dicts() == [msg(S, "be brief"), msg(U, "hi"), msg(A, "hello")]
    conv.validate(require_final_assistant=True)
    open_conv = Conversation([Message(U, "hi")])
    open_conv.validate()
    err = record_error(open_conv.validate, require_final_assistant=True)
    assert err.reason == "bad ending" and "must end with an assistant message" in str(err) and "'user'" in str(err)


@pytest.mark.parametrize(
    ("messages", "reason", "fragment"),
    [
        ([], "empty conversation", "messages has no messages"),
        ([Message(S, "x")], "empty conversation", "only a system message"),
        ([Message(A, "x")], "roles out of order", "messages[0] has role 'assistant' where 'user' was expected"),
        (
            [Message(U, "x"), Message(U, "y")],
            "roles out of order",
            "messages[1] has role 'user' where 'assistant' was expected",
        ),
        ([Message(U, "x"), Message(S, "y")], "roles out of order", "messages[1] is a system message"),
        ([Message(S, "x"), Message(S, "y")], "roles out of order", "messages[1] is a system message"),
        (["hi"], "wrong type", "messages[0] must be a Message, found string"),
    ],
)
def test_conversation_rules(messages, reason, fragment):
    err = record_error(Conversation, messages)
    assert err.reason == reason and fragment in str(err), str(err)


@pytest.mark.parametrize(
    ("role", "content", "reason", "fragment"),
    [
        ("bot", "x", "unknown role", "unknown role 'bot' (expected system, user or assistant)"),
        (3, "x", "wrong type", "role must be a string, found integer"),
        (U, "  \n", "empty content", "(user) has empty content"),
        (U, None, "wrong type", "content must be a string, found null"),
    ],
)
def test_message_rules(role, content, reason, fragment):
    err = record_error(Message, role, content)
    assert err.reason == reason and fragment in str(err), str(err)
    err = record_error(Message.from_dict, {"role": role, "content": content}, where="messages[4]")
    assert str(err).startswith("messages[4]") and err.reason == reason


@pytest.mark.parametrize(
    ("completions", "order", "reason", "fragment"),
    [
        (["a"], [[0]], "too few candidates", "at least 2 completions, found 1"),
        (["a", "b", "a "], [[0], [1], [2]], "duplicate candidates", "completions[2] repeats completions[0]"),
        (["a", "b"], [[0, 1]], "all tied", "all candidates tied: no preference"),
        (["a", "b"], [[0], [2]], "candidate out of range", "candidate 2, which does not exist: there are 2"),
        (["a", "b", "c"], [[0], [1]], "candidate not ranked", "candidate 2 is not ranked"),
        (["a", "b", "c", "d"], [[0], [1]], "candidate not ranked", "candidates 2, 3 are not ranked"),
        (
            ["a", "b"],
            [[0], [1, 0]],
            "candidate ranked twice",
            "candidate 0 is ranked twice (in order[0] and order[1])",
        ),
        (["a", "b"], [[0], []], "bad order", "order[1] is an empty group"),
        (["a", "b"], [0, 1], "wrong type", "order must be a list of groups"),
        (["a", "b"], [[0], [True]], "wrong type", "found boolean"),
        (["a", ""], [[0], [1]], "empty content", "completions[1] is empty"),
        (["a", 7], [[0], [1]], "wrong type", "completions[1] must be a string, found integer"),
    ],
)
def test_ranking_rules(completions, order, reason, fragment):
    err = record_error(Ranking, [Message(U, "q")], completions, order)
    assert err.reason == reason and fragment in str(err), str(err)


def test_ranking_prompt_must_end_with_user_and_labeler_is_text():
    err = record_error(Ranking, [Message(U, "q"), Message(A, "a")], ["x", "y"], [[0], [1]])
    assert err.reason == "bad ending" and "prompt must end with a user message" in str(err)
    err = record_error(Ranking, [Message(U, "q")], ["x", "y"], [[0], [1]], labeler=5)
    assert err.reason == "wrong type" and "labeler" in str(err)


def test_comparison_to_ranking_and_rules():
    c = Comparison([Message(U, "q")], "good", "bad", labeler="ann")
    r = c.to_ranking()
    assert (r.completions, r.order, r.labeler, r.pairs()) == (["good", "bad"], [[0], [1]], "ann", [(0, 1)])
    assert record_error(Comparison, [Message(U, "q")], "same", "same").reason == "duplicate candidates"
    assert "rejected is empty" in str(record_error(Comparison, [Message(U, "q")], "good", " "))


def test_validate_prompt():
    assert validate_prompt([Message(S, "s"), Message(U, "q")]) == [Message(S, "s"), Message(U, "q")]
    err = record_error(validate_prompt, [Message(U, "q"), Message(A, "a")], field="messages")
    assert str(err) == "messages must end with a user message (the model answers it), found 'assistant' last"


def test_parse_hh_turns():
    text = "\n\nHuman: Hi\nthere\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
    assert parse_hh(text, "prompt", prompt=True) == [Message(U, "Hi\nthere"), Message(A, "Hello!"), Message(U, "Bye")]
    err = record_error(parse_hh, text, "chosen")
    assert str(err) == "chosen[3] (assistant) has empty content"
    assert record_error(parse_hh, "preamble\n\nHuman: hi", "chosen").reason == "unknown format"


def test_read_conversations_every_format(tmp_path):
    path = jsonl(
        tmp_path,
        {"messages": [msg(S, "be brief"), msg(U, "hi"), msg(A, "hello"), msg(U, "2+2?"), msg(A, "4")], "id": 7},
        "",
        {"prompt": "Capital of France?", "completion": "Paris."},
        "   ",
        {"prompt": [msg(U, "hi"), msg(A, "hello"), msg(U, "2+2?")], "completion": [msg(A, "4")]},
        {"prompt": "\n\nHuman: hi\n\nAssistant:", "completion": " hello"},
        {
            "messages": [
                {"role": "user", "content": "x", "name": "bob"},
                {"role": "assistant", "content": "y", "weight": 0},
            ]
        },
    )
    convs = read_conversations(path)
    assert [c.as_dicts() for c in convs] == [
        [msg(S, "be brief"), msg(U, "hi"), msg(A, "hello"), msg(U, "2+2?"), msg(A, "4")],
        [msg(U, "Capital of France?"), msg(A, "Paris.")],
        [msg(U, "hi"), msg(A, "hello"), msg(U, "2+2?"), msg(A, "4")],
        [msg(U, "hi"), msg(A, "hello")],
        [msg(U, "x"), msg(A, "y")],
    ]


def test_read_preferences_every_format(tmp_path):
    hh_c = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4"
    hh_r = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 5"
    conv = [msg(U, "2+2?")]
    path = jsonl(
        tmp_path,
        {
            "prompt": [msg(U, "2+2?")],
            "completions": ["3", "4", "5", "22"],
            "order": [[1], [0, 2], [3]],
            "labeler": "alice",
        },
        {"prompt": "2+2?", "completions": ["3", "4", "5"], "order": [1, 0, 2]},
        {"prompt": "2+2?", "completions": ["3", "4", "5"], "order": [1, [0, 2]]},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": conv, "chosen": [msg(A, "4")], "rejected": [msg(A, "5")]},
        {"prompt": "2+2?", "chosen": [msg(A, "4")], "rejected": [msg(A, "5")]},
        {"chosen": conv + [msg(A, "4")], "rejected": conv + [msg(A, "5")]},
        {"prompt": "2+2?", "chosen": conv + [msg(A, "4")], "rejected": conv + [msg(A, "5")], "score_chosen": 9.0},
        {"chosen": hh_c, "rejected": hh_r},
        {"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"},
    )
    got = read_preferences(path)
    assert all(isinstance(r, Ranking) for r in got)
    first = got[0]
    assert (first.prompt, first.completions, first.order, first.labeler) == (
        [Message(U, "2+2?")],
        ["3", "4", "5", "22"],
        [[1], [0, 2], [3]],
        "alice",
    )
    assert got[1].order == [[1], [0], [2]] and got[1].pairs() == [(1, 0), (1, 2), (0, 2)]
    assert got[2].order == [[1], [0, 2]] and got[2].pairs() == [(1, 0), (1, 2)]
    for r in got[3:8]:
        assert (r.prompt, r.completions, r.order, r.labeler) == ([Message(U, "2+2?")], ["4", "5"], [[0], [1]], None)
    assert got[8].prompt == [Message(U, "Hi"), Message(A, "Hello!"), Message(U, "2+2?")]
    assert got[8].completions == ["4", "5"]
    assert got[9].prompt == [Message(U, "2+2?")] and got[9].completions == ["4", "5"]


def test_read_prompts_every_format(tmp_path):
    path = jsonl(
        tmp_path,
        {"messages": [msg(S, "s"), msg(U, "q1")]},
        {"prompt": "q2"},
        {"prompt": [msg(U, "a"), msg(A, "b"), msg(U, "q3")]},
        {"prompt": "q4", "messages": [msg(U, "q4"), msg(A, "answer")]},  # UltraChat: prompt wins
        {"prompt": "q5", "chosen": "x", "rejected": "y"},
    )
    assert read_prompts(path) == [
        [Message(S, "s"), Message(U, "q1")],
        [Message(U, "q2")],
        [Message(U, "a"), Message(A, "b"), Message(U, "q3")],
        [Message(U, "q4")],
        [Message(U, "q5")],
    ]
    txt = tmp_path / "prompts.txt"
    txt.write_text("What is 2+2?\n\n   \n  Reverse 'abc'.  \r\nlast line without newline", encoding="utf-8")
    assert read_prompts(txt) == [
        [Message(U, "What is 2+2?")],
        [Message(U, "Reverse 'abc'.")],
        [Message(U, "last line without newline")],
    ]


def test_read_texts_txt_jsonl_and_folder(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\nfirst doc line 1\nline 2\n\n\n\nsecond doc\n  \nthird\n", encoding="utf-8")
    assert read_texts(txt) == ["first doc line 1\nline 2", "second doc", "third"]
    assert read_texts(jsonl(tmp_path, {"text": "one"}, {"text": "two\n\nstill two", "meta": 1})) == [
        "one",
        "two\n\nstill two",
    ]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "b.txt").write_text("b1\n\nb2\n", encoding="utf-8")
    (folder / "a.txt").write_text("a1\n", encoding="utf-8")
    (folder / "notes.md").write_text("ignored\n", encoding="utf-8")
    assert read_texts(folder) == ["a1", "b1", "b2"]


def test_txt_document_errors_name_their_first_line_and_file(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("fine\n", encoding="utf-8")
    (folder / "b.txt").write_bytes(b"ok\n\nbad \xff byte\n")
    err = error_of(read_texts, folder)
    assert str(err) == f"{folder / 'b.txt'}:3: not valid UTF-8 (byte 5 of the line)"
    texts, report = read_with_report(folder, "texts", skip_bad=True)
    assert texts == ["fine", "ok"] and report.skipped == {"bad encoding": 1}


def test_json_strings_may_hold_unicode_line_separators(tmp_path):
    text = "para one\u2028para two\x85\u2029end"
    assert read_texts(jsonl(tmp_path, {"text": text}, {"text": "next"})) == [text, "next"]


def test_mixed_formats_in_one_file(tmp_path):
    path = jsonl(
        tmp_path,
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "completions": ["a", "b", "c"], "order": [[2], [0], [1]]},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"},
    )
    assert [r.k for r in read_preferences(path)] == [2, 3, 2]


def test_json_that_python_cannot_take_is_a_bad_record_at_its_line(tmp_path):
    """A lone surrogate escape (no character: tokenizers and databases refuse it), a 100,000-deep nesting and a
    5,000-digit number are valid JSON that Python's reader or the tokenizer cannot take: each is one error at its
    line (skipped with --skip-bad), never a traceback."""
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad_lines = [
        '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "yo"}]}',
        "[" * 100_000 + "]" * 100_000,
        '{"messages": ' + "9" * 5000 + "}",
    ]
    path = tmp_path / "d.jsonl"
    for line, fragment in zip(
        bad_lines,
        ["messages.0.content contains a lone surrogate (U+D800) at position 0", "nested too deep", "digits"],
        strict=True,
    ):
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(UserError, match="^" + str(path) + ":2: ") as err:
            read_conversations(path)
        assert fragment in str(err.value), str(err.value)
        assert len(read_conversations(path, skip_bad=True)) == 1
    pair = '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "yo"}]}'
    path.write_text(pair + "\n")
    assert read_conversations(path)[0].messages[0].content == "\U0001f600"  # a surrogate pair is one character


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('[{"text": "a"}] this is not json {', 1, "text after the array's ']' at column 17"),
        ('[{"text": "a"},\n]', 2, "a comma before ']' at column 1"),
        ('[{"text": "a\tb"}]', 1, "Invalid control character at column"),
    ],
)
def test_a_json_array_file_is_strict_json(tmp_path, text, line, fragment):
    path = tmp_path / "t.json"
    path.write_text(text)  # the third holds a raw tab inside a string
    with pytest.raises(UserError, match=f"^{path}:{line}: ") as err:
        read_texts(path)
    assert fragment in str(err.value) and "at at" not in str(err.value), str(err.value)


def test_a_compressed_file_says_so(tmp_path):
    import gzip

    packed = tmp_path / "d.jsonl"
    packed.write_bytes(gzip.compress(b'{"text": "a"}\n'))
    with pytest.raises(UserError, match=f"^{packed}: a gzip-compressed file: decompress it first"):
        read_texts(packed)


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + json.dumps({"text": "héllo"}).encode() + b"\n")
    assert read_texts(path) == ["héllo"]


M_OK = [msg(U, "q"), msg(A, "a")]

BAD_CONVERSATIONS = [
    ('{"messages": [', "bad JSON", "bad JSON: Expecting value at column 15"),
    ('{"messages": [] "x"}', "bad JSON", "bad JSON: Expecting ',' delimiter at column 17"),
    ("[1, 2]", "not an object", "expected a JSON object, found list (JSON Lines needs one object per line)"),
    ("42", "not an object", "expected a JSON object, found integer"),
    ({"messages": [msg("bot", "x"), msg(A, "y")]}, "unknown role", "messages[0] has unknown role 'bot'"),
    ({"messages": [msg(U, "q"), msg("tool", "y")]}, "unknown role", "messages[1] has unknown role 'tool'"),
    ({"messages": [msg(U, "q"), msg(A, "")]}, "empty content", "messages[1] (assistant) has empty content"),
    (
        {"messages": [msg(U, "q"), msg(U, "again"), msg(A, "a")]},
        "roles out of order",
        "messages[1] has role 'user' where 'assistant' was expected",
    ),
    (
        {"messages": [msg(A, "hello"), msg(U, "q"), msg(A, "a")]},
        "roles out of order",
        "messages[0] has role 'assistant' where 'user' was expected",
    ),
    (
        {"messages": [msg(U, "q"), msg(A, "a"), msg(S, "s")]},
        "roles out of order",
        "messages[2] is a system message: only the first message may be one",
    ),
    ({"messages": [msg(U, "q")]}, "bad ending", "messages must end with an assistant message"),
    ({"messages": []}, "empty conversation", "messages has no messages"),
    ({"messages": "hi"}, "wrong type", "messages must be a list of messages, found string"),
    ({"messages": [msg(U, 5), msg(A, "a")]}, "wrong type", "messages[0].content must be a string, found integer"),
    (
        {"messages": [msg(U, [{"type": "text"}]), msg(A, "a")]},
        "wrong type",
        "messages[0].content must be a string, found list",
    ),
    ({"messages": ["hi", msg(A, "a")]}, "wrong type", "messages[0] must be an object with 'role' and 'content'"),
    ({"messages": [{"role": U}, msg(A, "a")]}, "missing field", "messages[0] has no 'content' (found keys ['role'])"),
    (
        {"prompt": "q", "completion": 3},
        "wrong type",
        "completion must be a string or a list of messages, found integer",
    ),
    ({"prompt": "q", "completion": ""}, "empty content", "completion (assistant) has empty content"),
    ({"prompt": [msg(U, "q"), msg(A, "a")], "completion": "b"}, "bad ending", "prompt must end with a user message"),
    (
        {"prompt": "q", "completion": [msg(A, "a"), msg(U, "more?")]},
        "bad ending",
        "completion must end with an assistant message",
    ),
    (
        {"prompt": "q", "completion": [msg(U, "a")]},
        "roles out of order",
        "completion[0] has role 'user' where 'assistant' was expected",
    ),
    ({"prompt": "q"}, "unknown format", "no known conversation format matches keys ['prompt']: expected 'messages'"),
    ({"text": "hello"}, "unknown format", "this looks like plain text (for pretraining, read_texts)"),
    ({"chosen": "a", "rejected": "b"}, "unknown format", "this looks like preference data (for rm/dpo"),
    ({}, "unknown format", "no known conversation format matches an empty object"),
]


@pytest.mark.parametrize(("record", "reason", "fragment"), BAD_CONVERSATIONS)
def test_bad_conversation_records(tmp_path, record, reason, fragment):
    path = jsonl(tmp_path, {"messages": M_OK}, "", record)
    assert_error_at(read_conversations, path, 3, fragment, reason)


HH_A = "\n\nHuman: q\n\nAssistant: a"
HH_B = "\n\nHuman: q\n\nAssistant: b"
BAD_PREFERENCES = [
    ({"prompt": "q", "completions": ["a"], "order": [0]}, "too few candidates", "at least 2 completions, found 1"),
    (
        {"prompt": "q", "completions": ["a", "b", "a"], "order": [0, 1, 2]},
        "duplicate candidates",
        "duplicate candidates: completions[2] repeats completions[0]",
    ),
    (
        {"prompt": "q", "completions": ["a", "b", "c"], "order": [[0, 1, 2]]},
        "all tied",
        "all candidates tied: no preference",
    ),
    (
        {"prompt": "q", "completions": ["a", "b", "c"], "order": [[2], [0, 1], [3]]},
        "candidate out of range",
        "order names candidate 3, which does not exist: there are 3 completions (indices 0..2)",
    ),
    (
        {"prompt": "q", "completions": ["a", "b", "c"], "order": [-1, 0, 1, 2]},
        "candidate out of range",
        "order names candidate -1",
    ),
    (
        {"prompt": "q", "completions": ["a", "b", "c"], "order": [2, 0]},
        "candidate not ranked",
        "candidate 1 is not ranked",
    ),
    (
        {"prompt": "q", "completions": ["a", "b", "c"], "order": [2, 0, 1, 0]},
        "candidate ranked twice",
        "candidate 0 is ranked twice (in order[1] and order[3])",
    ),
    (
        {"prompt": "q", "completions": ["a", "b"], "order": [0, "1"]},
        "wrong type",
        "order[1] must be a candidate index (an integer), found string",
    ),
    (
        {"prompt": "q", "completions": ["a", "b"], "order": [[0], [1.0]]},
        "wrong type",
        "order[1][0] must be a candidate index (an integer), found number",
    ),
    ({"prompt": "q", "completions": ["a", "b"], "order": "0>1"}, "wrong type", "order must be a list like"),
    ({"prompt": "q", "completions": "a", "order": [0]}, "wrong type", "completions must be a list of strings"),
    ({"prompt": "q", "completions": ["a", "b"]}, "missing field", "a K-way ranking needs 'order'"),
    ({"completions": ["a", "b"], "order": [0, 1]}, "missing field", "a K-way ranking needs 'prompt'"),
    (
        {"prompt": "q", "completions": ["a", "b"], "order": [0, 1], "labeler": 3},
        "wrong type",
        "labeler must be a string or null, found integer",
    ),
    (
        {"prompt": [msg(U, "q"), msg(A, "x")], "completions": ["a", "b"], "order": [0, 1]},
        "bad ending",
        "prompt must end with a user message",
    ),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty content", "prompt (user) has empty content"),
    (
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        "duplicate candidates",
        "duplicate candidates: chosen and rejected are the same text",
    ),
    (
        {"prompt": "q", "chosen": "a", "rejected": [msg(A, "b")]},
        "wrong type",
        "chosen is a string but rejected is a list",
    ),
    ({"prompt": "q", "chosen": 1, "rejected": "b"}, "wrong type", "chosen must be a string or a list of messages"),
    ({"chosen": "a", "rejected": "b"}, "unknown format", "without a 'prompt' must be HH-RLHF transcripts"),
    ({"chosen": HH_A, "rejected": HH_A}, "duplicate candidates", "chosen and rejected are the same conversation"),
    (
        {"chosen": HH_A, "rejected": "\n\nHuman: other\n\nAssistant: b"},
        "prompt mismatch",
        "chosen and rejected differ at message 0, before their final assistant turns (2 vs 2 messages)",
    ),
    ({"chosen": HH_A + "\n\nHuman: more\n\nAssistant: c", "rejected": HH_B}, "prompt mismatch", "differ at message 1"),
    (
        {"chosen": HH_A + "\n\nHuman: more", "rejected": HH_B},
        "bad ending",
        "chosen must end with an assistant message",
    ),
    ({"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": HH_B}, "empty content", "chosen[1] (assistant) has empty"),
    (
        {"chosen": "\n\nHuman: q\n\nHuman: r\n\nAssistant: a", "rejected": HH_B},
        "roles out of order",
        "chosen[1] has role 'user' where 'assistant' was expected",
    ),
    (
        {"chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "q"), msg("critic", "b")]},
        "unknown role",
        "rejected[1] has unknown role 'critic'",
    ),
    (
        {"chosen": [msg(A, "a")], "rejected": [msg(A, "b")]},
        "roles out of order",
        "chosen[0] has role 'assistant' where 'user' was expected",
    ),
    (
        {"prompt": [msg(U, "q")], "chosen": [msg(U, "q"), msg(A, "a")], "rejected": [msg(U, "q"), msg(A, "b")]},
        "roles out of order",
        "chosen[0] has role 'user' where 'assistant' was expected",
    ),
    ({"messages": M_OK}, "unknown format", "this looks like an SFT conversation"),
    (
        {"prompt": "q", "response": "a"},
        "unknown format",
        "no known preference format matches keys ['prompt', 'response']: expected 'prompt' + 'completions' + 'order'",
    ),
]


@pytest.mark.parametrize(("record", "reason", "fragment"), BAD_PREFERENCES)
def test_bad_preference_records(tmp_path, record, reason, fragment):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = jsonl(tmp_path, good, good, record, good)
    assert_error_at(read_preferences, path, 3, fragment, reason)


BAD_PROMPTS = [
    (
        {"messages": M_OK},
        "bad ending",
        "messages must end with a user message (the model answers it), found 'assistant'",
    ),
    ({"prompt": [msg(U, "q"), msg(A, "a")]}, "bad ending", "prompt must end with a user message"),
    ({"prompt": 3}, "wrong type", "prompt must be a string or a list of messages, found integer"),
    ({"prompt": "  "}, "empty content", "prompt (user) has empty content"),
    ({"prompt": [msg(S, "s")]}, "empty conversation", "prompt has only a system message"),
    ({"question": "q"}, "unknown format", "no known prompt format matches keys ['question']"),
]


@pytest.mark.parametrize(("record", "reason", "fragment"), BAD_PROMPTS)
def test_bad_prompt_records(tmp_path, record, reason, fragment):
    path = jsonl(tmp_path, {"prompt": "ok"}, record)
    assert_error_at(read_prompts, path, 2, fragment, reason)


@pytest.mark.parametrize(
    ("record", "reason", "fragment"),
    [
        ({"text": ""}, "empty content", "text is empty"),
        ({"text": ["a"]}, "wrong type", "text must be a string, found list"),
        ({"content": "a"}, "unknown format", "no known text format matches keys ['content']: expected 'text'"),
    ],
)
def test_bad_text_records(tmp_path, record, reason, fragment):
    path = jsonl(tmp_path, {"text": "ok"}, record)
    assert_error_at(read_texts, path, 2, fragment, reason)


def test_error_messages_are_one_line_even_for_hostile_values(tmp_path):
    path = jsonl(tmp_path, {"messages": [msg("evil\nrole" * 20, "x")]})
    message = assert_error_at(read_conversations, path, 1, "has unknown role 'evil\\nrole", "unknown role")
    assert len(message) < 200


def test_bad_utf8_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps({"text": "ok"}).encode() + b'\n{"text": "caf\xe9"}\n')
    assert_error_at(read_texts, path, 2, "not valid UTF-8 (byte 14 of the line)", "bad encoding")


def test_pretty_printed_json_lines_gets_a_hint(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps([{"messages": M_OK}], indent=2), encoding="utf-8")
    assert_error_at(read_conversations, path, 1, "JSON Lines needs one record per line", "bad JSON")


def test_a_json_file_holding_an_array_of_records_is_read_and_errors_name_the_element_s_line(tmp_path):
    path = tmp_path / "data.json"
    records = [{"messages": M_OK}, {"prompt": "Capital of France?", "completion": "Paris."}]
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    got = read_conversations(path)
    assert [c.messages[-1].content for c in got] == ["a", "Paris."]
    path.write_text(json.dumps(records), encoding="utf-8")  # one line, as json.dump writes it
    assert len(read_conversations(path)) == 2
    bad = [{"messages": M_OK}, {"messages": [msg(A, "a")]}]  # the second starts with the assistant
    path.write_text(json.dumps(bad, indent=2), encoding="utf-8")
    start = json.dumps(bad, indent=2).splitlines().index("  {", 2) + 1  # the line the second element opens on
    assert_error_at(read_conversations, path, start, "messages")
    assert len(read_conversations(path, skip_bad=True)) == 1
    path.write_text("[\n  " + json.dumps({"messages": M_OK}) + ',\n  {"messages": ]\n]', encoding="utf-8")
    assert_error_at(read_conversations, path, 3, "bad JSON", "bad JSON")


@pytest.mark.parametrize("reader", [read_conversations, read_preferences, read_prompts, read_texts])
def test_missing_and_empty_files(tmp_path, reader):
    missing = tmp_path / "nope.jsonl"
    assert str(error_of(reader, missing)) == f"{missing}: no such file or directory"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    err = error_of(reader, empty)
    assert str(err).startswith(f"{empty}: no ") and "the file is empty" in str(err) and err.line is None
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n\n", encoding="utf-8")
    assert str(error_of(reader, blank)).startswith(f"{blank}: no ")


def test_txt_is_not_a_conversation_source(tmp_path):
    path = tmp_path / "demos.txt"
    path.write_text("hello\n", encoding="utf-8")
    assert_error_at(read_conversations, path, None, "conversations cannot be read from a .txt file")
    assert_error_at(read_preferences, path, None, "preferences cannot be read from a .txt file")


def test_directories_that_are_not_datasets(tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    assert_error_at(read_conversations, folder, None, "must be a dataset saved with")
    assert_error_at(read_texts, folder, None, "holds no .txt files")
    (folder / "a.txt").write_text("\n\n", encoding="utf-8")
    assert_error_at(read_texts, folder, None, "no texts found: its files are empty or hold only blank lines")


def test_unknown_kind_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        read_with_report(jsonl(tmp_path, {"text": "x"}), "pictures")  # type: ignore[arg-type]


def test_skip_bad_counts_and_logs_one_summary_line(tmp_path, caplog):
    path = jsonl(
        tmp_path,
        {"messages": M_OK},
        "{not json",
        {"messages": [msg("bot", "x"), msg(A, "a")]},
        "",
        {"prompt": "q", "completion": "a"},
        "[]",
        "{also not json",
        {"messages": M_OK},
    )
    with caplog.at_level(logging.WARNING, logger="flywheel"):
        convs, report = read_with_report(path, "conversations", skip_bad=True)
    assert [c.as_dicts() for c in convs] == [M_OK, M_OK, M_OK]
    assert (report.total, report.n_skipped, report.n_read) == (7, 4, 3)
    assert dict(report.skipped) == {"bad JSON": 2, "unknown role": 1, "not an object": 1}
    assert report.first_error == f"{path}:2: bad JSON: Expecting property name enclosed in double quotes at column 2"
    records = [r for r in caplog.records if r.name == "flywheel"]
    assert len(records) == 1
    assert records[0].getMessage() == (
        f"skipped 4 of 7 records in {path}: 2 bad JSON, 1 unknown role, 1 not an object (first: {report.first_error})"
    )
    assert read_conversations(path, skip_bad=True) == convs


def test_skip_bad_is_silent_when_nothing_is_bad(tmp_path, caplog):
    path = jsonl(tmp_path, {"text": "a"}, {"text": "b"})
    with caplog.at_level(logging.DEBUG, logger="flywheel"):
        texts, report = read_with_report(path, "texts", skip_bad=True)
    assert texts == ["a", "b"] and report.n_skipped == 0 and report.first_error is None
    assert not [r for r in caplog.records if r.name == "flywheel"]


def test_skip_bad_still_raises_when_every_record_is_bad(tmp_path):
    path = jsonl(tmp_path, "{x", {"prompt": "q", "completions": ["a", "a"], "order": [0, 1]}, "{")
    err = error_of(read_preferences, path, skip_bad=True)
    assert str(err) == (
        f"{path}: all 3 records are bad: 2 bad JSON, 1 duplicate candidates "
        f"(first: {path}:1: bad JSON: Expecting property name enclosed in double quotes at column 2)"
    )


def test_without_skip_bad_the_first_bad_record_raises(tmp_path):
    path = jsonl(tmp_path, {"text": "a"}, {"text": ""}, "{")
    assert_error_at(read_texts, path, 2, "text is empty", "empty content")


def test_missing_datasets_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}", encoding="utf-8")
    assert_error_at(read_conversations, saved, None, "pip install datasets")
    parquet = tmp_path / "data.parquet"
    parquet.write_bytes(b"PAR1")
    assert_error_at(read_preferences, parquet, None, "pip install datasets")


def test_dataset_rows_go_through_the_record_parser(tmp_path, monkeypatch):
    """A stand-in `datasets` module (the real one is optional): rows are numbered from 1, nulls are dropped, a
    single-split DatasetDict is unwrapped and a multi-split one is refused."""

    class DatasetDict(dict):
        pass

    saved: dict[str, Any] = {}
    fake = types.ModuleType("datasets")
    fake.DatasetDict = DatasetDict  # type: ignore[attr-defined]
    fake.load_from_disk = lambda path: saved[path]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset_info.json").write_text("{}", encoding="utf-8")
    rows = [
        {"messages": M_OK, "prompt": None, "completion": None},
        {"messages": None, "prompt": "q", "completion": "a"},
        {"messages": [msg(U, "q"), msg("bot", "a")], "prompt": None, "completion": None},
    ]
    saved[str(folder)] = DatasetDict(train=rows)
    assert_error_at(read_conversations, folder, 3, "messages[1] has unknown role 'bot'", "unknown role")
    convs, report = read_with_report(folder, "conversations", skip_bad=True)
    assert [c.as_dicts() for c in convs] == [M_OK, [msg(U, "q"), msg(A, "a")]]
    assert report.skipped == {"unknown role": 1} and report.first_error.startswith(f"{folder}:3: ")
    saved[str(folder)] = DatasetDict(train=rows, test=rows)
    assert_error_at(read_conversations, folder, None, "the dataset has splits ['test', 'train']: give one split")


def test_real_saved_dataset_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"prompt": ["2+2?", "3+3?", "hi"], "chosen": ["4", "6", "hello"], "rejected": ["5", "7", "hello"]}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(tmp_path / "prefs"))
    assert_error_at(read_preferences, tmp_path / "prefs", 3, "duplicate candidates", "duplicate candidates")
    got = read_preferences(tmp_path / "prefs", skip_bad=True)
    assert [(r.prompt, r.completions) for r in got] == [
        ([Message(U, "2+2?")], ["4", "5"]),
        ([Message(U, "3+3?")], ["6", "7"]),
    ]
    datasets.DatasetDict(train=ds).save_to_disk(str(tmp_path / "dict"))
    assert len(read_preferences(tmp_path / "dict", skip_bad=True)) == 2
    mixed = datasets.Dataset.from_dict(
        {  # a table fills the columns a row lacks with nulls
            "messages": [M_OK, None, [msg(A, "a")]],
            "prompt": [None, "q", None],
            "completion": [None, "a", None],
        }
    )
    mixed.to_parquet(str(tmp_path / "sft.parquet"))
    assert_error_at(
        read_conversations, tmp_path / "sft.parquet", 3, "messages[0] has role 'assistant'", "roles out of order"
    )
    convs = read_conversations(tmp_path / "sft.parquet", skip_bad=True)
    assert [c.as_dicts() for c in convs] == [M_OK, [msg(U, "q"), msg(A, "a")]]


def test_a_folder_of_parquet_shards_is_read_in_name_order_and_errors_name_the_shard(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder = tmp_path / "shards"
    folder.mkdir()
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows[3:]), folder / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "train-00000-of-00002.parquet")
    convs = read_conversations(folder)
    assert [c.messages[0].content for c in convs] == ["q0", "q1", "q2", "q3", "q4"]
    assert convs[3].source == (str(folder / "train-00001-of-00002.parquet"), 1)  # where later errors point
    bad = rows[3:] + [{"prompt": "q5", "completion": ""}]
    pq.write_table(pa.Table.from_pylist(bad), folder / "train-00001-of-00002.parquet")
    assert_error_at(read_conversations, folder / "train-00001-of-00002.parquet", 3, "empty", "empty content")
    message = str(error_of(read_conversations, folder))
    assert message.startswith(f"{folder / 'train-00001-of-00002.parquet'}:3: "), message
    assert len(read_conversations(folder, skip_bad=True)) == 5

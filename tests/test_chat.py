"""Chat sessions (history, system prompt, few-shot context, regenerate, reset) and the `flywheel chat` command,
including the interactive mode driven for real through a pseudo-terminal."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flywheel.chat import ChatConfig, main, open_session, read_message
from flywheel.cli import main as cli_main
from flywheel.engine import ChatSession, Engine, SamplingParams
from flywheel.errors import UserError
from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
from flywheel.tokenization import render_prompt, train_tokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog. what is two plus three? it is five. " * 4,
    "hello there, how are you today? fine thanks, and you?",
] * 4
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok):
    return build_causal_lm(
        config_for_tokenizer(tok, "nano", initializer_range=0.3, max_position_embeddings=256), seed=0
    ).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, model):
    return str(save_pretrained(model, tok, tmp_path_factory.mktemp("chat") / "model"))


class Spy(Engine):
    """An engine that records the prompt ids of each stream() call."""

    prompts: list[list[int]]

    def stream(self, prompt_ids, params=None):
        self.prompts = [*getattr(self, "prompts", []), list(prompt_ids)]
        return super().stream(prompt_ids, params)


def test_reply_is_generated_from_the_rendered_conversation(tok, model):
    engine = Spy(model, tok)
    session = ChatSession(engine, system="Be brief.", few_shot=[("2+2?", "4"), ("3+3?", "6")])
    reply = session.send("5+5?", GREEDY)
    context = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "5+5?"},
    ]
    assert engine.prompts == [render_prompt(tok, context)]
    expected = engine.generate([render_prompt(tok, context)], GREEDY).tokens[0]
    assert reply == tok.decode(expected, skip_special_tokens=True) and reply
    assert session.history == [{"role": "user", "content": "5+5?"}, {"role": "assistant", "content": reply}]
    session.send("and 6+6?", GREEDY)  # the second turn sees the first exchange
    assert engine.prompts[1] == render_prompt(tok, context + session.history[1:3])


def test_stream_regenerate_reset_and_system(tok, model):
    session = ChatSession(Engine(model, tok), seed=3, params=SamplingParams(max_new_tokens=10))
    pieces = list(session.stream("hello"))
    first = "".join(pieces)
    assert len(session.history) == 2 and session.history[1]["content"] == first
    second = session.regenerate()
    assert second != first  # reply k is sampled with seed + k
    assert [m["role"] for m in session.history] == ["user", "assistant"] and session.history[1]["content"] == second
    again = ChatSession(Engine(model, tok), seed=3, params=SamplingParams(max_new_tokens=10))
    assert again.send("hello") == first and again.regenerate() == second  # reproducible
    session.system = "You are a fox."
    session.reset()
    assert session.history == [] and session.messages() == [{"role": "system", "content": "You are a fox."}]


def test_closing_a_reply_keeps_the_part_generated(tok, model):
    session = ChatSession(Engine(model, tok), params=SamplingParams(max_new_tokens=40, seed=0, stop_token_ids=[]))
    reply = session.stream("hello")
    next(reply)
    reply.close()
    assert session.history[-1]["role"] == "assistant"
    assert 0 < len(session.last.tokens) < 40 and session.history[-1]["content"] == session.last.text


def test_oldest_exchanges_are_dropped_to_fit_the_context(tok):
    small = build_causal_lm(config_for_tokenizer(tok, "nano", max_position_embeddings=64), seed=0).eval()
    session = ChatSession(Engine(small, tok), params=SamplingParams(max_new_tokens=8, temperature=0))
    for text in ["the quick brown fox", "jumps over the lazy dog", "what is two plus three", "hello there"]:
        session.send(text)
        assert len(render_prompt(tok, session.messages()[:-1])) + 8 <= 64
    assert session.history[-2]["content"] == "hello there"
    assert session.history[0]["content"] != "the quick brown fox"


def test_session_errors(tok, model):
    session = ChatSession(Engine(model, tok))
    with pytest.raises(UserError, match="empty message"):
        session.send("   ")
    with pytest.raises(UserError, match="nothing to regenerate"):
        session.regenerate()
    with pytest.raises(UserError, match="max_new_tokens"):
        session.send("hi", SamplingParams(max_new_tokens=0))
    assert session.history == []  # a failed turn leaves no trace


def test_read_message_joins_continued_lines_and_blocks():
    def reader(lines):  # input() raises EOFError at the end of input
        it = iter(lines)

        def read(prompt: str) -> str:
            for line in it:
                return line
            raise EOFError

        return read

    assert read_message(reader(["one"])) == "one"
    assert read_message(reader(["one \\", "two\\", "three"])) == "one \ntwo\nthree"
    assert read_message(reader(['"""', "a", "", "b", '"""'])) == "a\n\nb"
    with pytest.raises(EOFError):
        read_message(reader([]))


def _expected_replies(model_dir: str, *turns: str, **overrides) -> list[str]:
    """What `flywheel chat` should print for these turns ("/regenerate" re-samples the last reply)."""
    cfg = ChatConfig(model=model_dir, max_new_tokens=10, seed=5, **overrides)
    session = open_session(cfg)
    return [session.regenerate() if t == "/regenerate" else session.send(t) for t in turns]


def test_prompt_flag_prints_one_reply(model_dir, capsys):
    assert main([model_dir, "--prompt", "hello there", "--max-new-tokens", "10", "--seed", "5"]) == 0
    assert capsys.readouterr().out == _expected_replies(model_dir, "hello there")[0] + "\n"


def test_stdin_mode_for_scripts(model_dir):
    run = subprocess.run(
        [sys.executable, "-m", "flywheel", "chat", model_dir, "--max-new-tokens", "10", "--seed", "5"],
        input="what is two plus three?\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == _expected_replies(model_dir, "what is two plus three?")[0] + "\n"


@pytest.mark.parametrize(
    "args,message",
    [
        (["/no/such/model", "--prompt", "hi"], "model directory does not exist"),
        (["{model}", "--prompt", ""], "empty prompt"),
        (["{model}", "--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["{model}", "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["{model}", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be > 0"),
        (["{model}", "--prompt", "fox " * 300], "the model's context is 256 tokens"),
        (["{model}", "--prompt", "hi", "--few-shot", "/no/such.jsonl"], "few-shot file does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(model_dir, capsys, args, message):
    args = [a.replace("{model}", model_dir) for a in args]
    assert cli_main(["chat", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("flywheel chat: ")


def test_bad_input_at_the_real_command_line_has_no_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "flywheel", "chat", str(tmp_path / "missing"), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"flywheel chat: model directory does not exist: {tmp_path / 'missing'}"


def test_interactive_chat_in_a_terminal(model_dir, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    shots = tmp_path / "shots.jsonl"
    shots.write_text('{"user": "2+2?", "assistant": "4"}\n')
    replies = _expected_replies(model_dir, "hello there", "/regenerate", few_shot=str(shots))
    child = pexpect.spawn(
        sys.executable,
        ["-m", "flywheel", "chat", model_dir, "--max-new-tokens", "10", "--seed", "5", "--few-shot", str(shots)],
        encoding="utf-8",
        timeout=60,
        dimensions=(50, 200),
    )

    def reply(text: str) -> None:  # the terminal turns \n into \r\n
        child.expect_exact("assistant> " + text.replace("\n", "\r\n") + "\r\n")

    child.expect_exact("/help for commands")
    child.expect_exact("user> ")
    child.sendline("hello there")
    reply(replies[0])
    child.expect_exact("user> ")
    child.sendline("/regenerate")
    reply(replies[1])
    child.sendline("one \\")  # a continued line: the message is "one \ntwo"
    child.expect_exact("...> ")
    child.sendline("two")
    child.expect_exact("assistant> ")
    child.expect_exact("user> ")
    child.sendline("/history")
    child.expect_exact("[user] 2+2?")
    child.expect_exact("[user] one \r\ntwo")
    child.sendline("/system Talk like a fox.")
    child.expect_exact("(system prompt set)")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.sendline('"""')  # a block
    child.expect_exact("...> ")
    child.sendline("fox")
    child.sendline('"""')
    child.expect_exact("assistant> ")
    child.expect_exact("user> ")
    child.sendline("/history")
    child.expect_exact("[system] Talk like a fox.")
    child.expect_exact("[user] fox")
    child.sendline("/nope")
    child.expect_exact("unknown command /nope")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert replies[0] != replies[1]


def test_chat_checks_its_dtype_as_the_trainers_do(capsys):
    assert cli_main(["chat", "some/model", "--prompt", "hi", "--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flywheel chat: --dtype must be one of float32, bfloat16, float16, auto, got 'fp8'"

"""`flywheel chat MODEL_DIR`: talk to a model in the terminal, or answer one prompt for a script.

    flywheel chat runs/sft/final                          # interactive: replies stream as they are generated
    flywheel chat runs/sft/final --prompt "What is 2+3?"  # one reply on stdout, then exit
    echo "What is 2+3?" | flywheel chat runs/sft/final    # the same, the message read from stdin

Interactive input: Enter sends; end a line with a backslash to continue on the next line, or put \"\"\" on a line of
its own to start and end a block. Commands: /reset, /system [TEXT], /regenerate, /history, /help, /quit (or Ctrl-D).
Ctrl-C stops a reply that is being generated (the part so far is kept); at the prompt it quits.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from flywheel.config import parse_config
from flywheel.engine import ChatSession, Engine, SamplingParams
from flywheel.errors import UserError
from flywheel.models import HubOptions, check_dtype
from flywheel.utils import read_text

USER_PROMPT = "user> "
MORE_PROMPT = "...> "
REPLY_PREFIX = "assistant> "
BLOCK = '"""'
HELP = """commands:
  /reset            forget the conversation (the system prompt and few-shot examples stay)
  /system [TEXT]    set the system prompt (no TEXT: show it; /system - clears it)
  /regenerate       replace the last reply with a new one
  /history          show the conversation so far
  /help             this list
  /quit             leave (or Ctrl-D)
input: end a line with \\ to continue it, or wrap several lines in \"\"\" ... \"\"\"."""


@dataclass
class ChatConfig(HubOptions):
    model: str = field(default="", metadata={"help": "HF model directory with a tokenizer (or the first argument)"})
    prompt: str | None = field(default=None, metadata={"help": "answer this one message and exit"})
    system: str | None = field(default=None, metadata={"help": "system prompt"})
    few_shot: str | None = field(
        default=None,
        metadata={
            "help": 'JSONL file of {"user": ..., "assistant": ...} example exchanges put '
            "before the conversation (in-context learning)"
        },
    )
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens per reply"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature; 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely tokens; 0 = all"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass, in (0, 1]"})
    seed: int | None = field(default=None, metadata={"help": "seed: reply k uses seed + k (reproducible scripts)"})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto (the checkpoint's)"})
    backend: str = field(default="auto", metadata={"help": "engine forward: auto, compact (Llama family) or hf"})

    def validate(self) -> None:
        if not self.model:
            raise UserError("give a model directory: flywheel chat MODEL_DIR")
        check_dtype(self.dtype)
        self.sampling().validate()

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )


def load_few_shot(path: str) -> list[tuple[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise UserError("few-shot file does not exist", path=path)
    pairs = []
    for n, line in enumerate(read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            user, assistant = record["user"], record["assistant"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError('expected a JSON object with "user" and "assistant"', path=path, line=n) from None
        if not (isinstance(user, str) and isinstance(assistant, str)):
            raise UserError('"user" and "assistant" must be text', path=path, line=n)
        pairs.append((user, assistant))
    return pairs


def open_session(cfg: ChatConfig) -> ChatSession:
    from flywheel.models import load_causal_lm
    from flywheel.tokenization import load_tokenizer

    model = load_causal_lm(cfg.model, dtype=cfg.dtype, **cfg.hub_kwargs(cfg.model)).eval()
    tokenizer = load_tokenizer(cfg.model, **cfg.hub_kwargs(cfg.model))
    engine = Engine(model, tokenizer, backend=cfg.backend)  # type: ignore[arg-type]
    few_shot = load_few_shot(cfg.few_shot) if cfg.few_shot else []
    return ChatSession(engine, tokenizer, system=cfg.system, few_shot=few_shot, params=cfg.sampling(), seed=cfg.seed)


def print_reply(pieces, out: TextIO) -> None:
    """Print a reply as it streams; Ctrl-C stops it (the reply so far is kept)."""
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        pieces.close()
        out.write(" [stopped]")
    out.write("\n")
    out.flush()


def read_message(read=input) -> str:
    """One message: a line, lines joined by trailing backslashes, or a \"\"\" block. Raises EOFError at the end."""
    line = read(USER_PROMPT)
    if line.strip() == BLOCK:
        lines = []
        while (line := read(MORE_PROMPT)).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read(MORE_PROMPT)
    return "\n".join([*lines, line])


def command(session: ChatSession, text: str, out: TextIO) -> bool:
    """Run a /command. Returns False when the user asked to quit."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        out.write(HELP + "\n")
    elif name == "/reset":
        session.reset()
        out.write("(conversation cleared)\n")
    elif name == "/system":
        if arg:
            session.system = None if arg == "-" else arg
            out.write("(system prompt cleared)\n" if arg == "-" else "(system prompt set)\n")
        else:
            out.write(f"(system prompt: {session.system!r})\n")
    elif name == "/regenerate":
        stream = session.regenerate_stream()
        out.write(REPLY_PREFIX)
        print_reply(stream, out)
    elif name == "/history":
        for message in session.messages():
            out.write(f"[{message['role']}] {message['content']}\n")
    else:
        out.write(f"unknown command {name} (/help lists them)\n")
    return True


def interactive(session: ChatSession, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out.write(
        f"flywheel chat: {session.engine.model.config.model_type} model, {session.engine.backend} engine. "
        "/help for commands, Ctrl-D to quit.\n"
    )
    while True:
        try:
            text = read_message()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if not command(session, text.strip(), out):
                    return 0
                continue
            stream = session.stream(text)
            out.write(REPLY_PREFIX)
            print_reply(stream, out)
            if session.last is not None and session.last.finish_reason == "length":
                out.write("(reply cut at --max-new-tokens)\n")
        except UserError as e:  # e.g. a conversation longer than the context: say so and keep going
            err.write(f"flywheel chat: {e}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--model", argv[0], *argv[1:]]
    cfg = parse_config(ChatConfig, argv, prog="flywheel chat", description=__doc__.split("\n\n")[0])
    if cfg.prompt is None and sys.stdin.isatty():
        return interactive(open_session(cfg))
    text = cfg.prompt if cfg.prompt is not None else sys.stdin.read()
    if not text.strip():
        raise UserError("empty prompt" + (" (nothing on stdin)" if cfg.prompt is None else ""))
    session = open_session(cfg)
    for piece in session.stream(text.strip()):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0

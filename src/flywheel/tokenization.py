"""Chat rendering -> (ids, loss_mask) for ANY Hugging Face chat template, and tokenizers for small worlds.

`render_conversation` is the single place that decides what a model is trained on: SFT, RM, DPO, PPO prompts and the
server all go through it. It needs no `{% generation %}` tags: for each assistant turn i it renders the conversation up
to turn i with `add_generation_prompt=True` (the prompt the model sees at inference) and up to and including turn i
(the prompt + the answer + the end-of-turn markup), and checks that each rendering is a prefix of the next. The pieces
between those boundaries are tokenized one by one, so a response is tokenized exactly as it is when the engine
generates it after a separately tokenized prompt.

An answer (what SFT and DPO train on) ends at its first end-of-turn token: the tokenizer's EOS or an EOS id of the
model's generation config (Gemma's <end_of_turn>, Phi-3's <|end|>), which is where the engine stops. A reward model
reads its score at the last token of the full rendering, after the markup the template writes past that token
(`render_scored_response`); `TurnEnd` appends that markup to generated answers so that PPO and best-of-n read at the
same token. docs/chat-templates.md has the details.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flywheel.errors import UserError
from flywheel.utils import read_text

PAD = "<|pad|>"
EOS = "<|im_end|>"  # end of turn: the token the policy emits to stop
BOS = "<|endoftext|>"  # document separator in pretraining corpora
SPECIAL_TOKENS = [PAD, BOS, "<|im_start|>", EOS]

# ChatML, as Qwen and many others use. Our tokenizers' EOS is the end-of-turn token <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Messages = Sequence[dict[str, str]]
GENERATION_CONFIG = "generation_config.json"
GENERATION_STOPS_ATTR = "flywheel_generation_stops"  # the eos ids of the generation config, set by load_tokenizer


def _render_text(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except ValueError as err:
        raise UserError(f"the tokenizer has no usable chat template: {err}") from None
    except Exception as err:  # jinja raises its own TemplateError subclasses for template-side checks
        raise UserError(f"the chat template rejected the conversation: {err}") from None
    if not isinstance(text, str):
        raise UserError("apply_chat_template(tokenize=False) did not return text")
    return text


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: transformers' "longer than the specified maximum" warning; lengths are checked where they matter
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) if text else []


def set_generation_stops(tokenizer: Any, eos_token_id: int | list[int] | None) -> None:
    """Tell the renderer which ids the model's generation config stops at (`load_tokenizer` does this from the
    directory's generation_config.json): an assistant answer ends at the first of them, as the engine's output does."""
    ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    setattr(tokenizer, GENERATION_STOPS_ATTR, [int(i) for i in ids if i is not None])


def turn_stop_ids(tokenizer: Any) -> list[int]:
    """The ids that end an assistant turn for this tokenizer: its EOS plus its generation config's EOS ids."""
    return stop_token_ids(tokenizer, SimpleNamespace(eos_token_id=getattr(tokenizer, GENERATION_STOPS_ATTR, None)))


def end_of_turn_texts(tokenizer: Any) -> list[str]:
    """The texts of `turn_stop_ids` that are added (special) tokens, as the chat template writes them."""
    added = tokenizer.added_tokens_decoder
    return [added[i].content for i in turn_stop_ids(tokenizer) if i in added and added[i].content]


def _answer_end(answer: str, stops: Sequence[str]) -> int:
    """Where the policy's part of a rendered assistant turn ends: after the first end-of-turn token in it (what the
    engine stops at); markup after it (ChatML's and Gemma's "\n") is never generated. No end-of-turn: all of it."""
    hits = [answer.find(s) + len(s) for s in stops if s in answer]
    return min(hits) if hits else len(answer)


def _divergence(short: str, long: str, short_name: str, long_name: str) -> str:
    """Where two renderings that should share a prefix part, with 20 characters of context on each side."""
    i = next((k for k, (a, b) in enumerate(zip(short, long, strict=False)) if a != b), min(len(short), len(long)))
    lo = max(0, i - 20)
    return f"at character {i}, {short_name} gives {short[lo : i + 20]!r} but {long_name} {long[lo : i + 20]!r}"


def _final_suffix(through: str, full: str, markup: Sequence[str]) -> int | None:
    """Length of the suffix `through` has only because it is a whole conversation (Phi-3 appends eos_token after the
    last turn): the smallest k with through[:-k] a prefix of `full`, `full` ending with the same k characters, and
    those characters only special tokens and whitespace. None when there is no such k."""
    for k in _markup_suffixes(through, markup):
        if full.startswith(through[: len(through) - k]) and full.endswith(through[len(through) - k :]):
            return k
    return None


def _markup_suffixes(text: str, markup: Sequence[str]) -> Iterator[int]:
    """0, then the lengths of ever longer suffixes of `text` made of whole special tokens and whitespace."""
    tokens = sorted(markup, key=len, reverse=True)
    end = len(text)
    yield 0
    while end > 0:
        if text[end - 1].isspace():
            end -= 1
        else:
            token = next((t for t in tokens if text.endswith(t, 0, end)), None)
            if token is None:
                return
            end -= len(token)
        yield len(text) - end


def _conversation_end(tokenizer: Any, messages: Messages, full: str, markup: Sequence[str]) -> int:
    """Length of the markup `full` ends with only because the conversation ends there (Phi-3's eos_token), found by
    rendering one more user turn; 0 when there is none or the template refuses the longer conversation."""
    try:
        longer = _render_text(tokenizer, [*messages, {"role": "user", "content": "?"}], add_generation_prompt=False)
    except UserError:
        return 0
    return _final_suffix(full, longer, markup) or 0


def _markup(tokenizer: Any) -> list[str]:
    """The texts of the tokenizer's added (special) tokens."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.content]


def conversation_segments(tokenizer: Any, messages: Messages) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_answer) pieces whose concatenation is the full text.

    An answer ends at its first end-of-turn token (`end_of_turn_texts`); a suffix the template writes only at the
    very end of a conversation (Phi-3's eos_token) is allowed and belongs to no answer."""
    if not messages:
        raise UserError("empty conversation")
    full = _render_text(tokenizer, messages, add_generation_prompt=False)
    stops, markup = end_of_turn_texts(tokenizer), _markup(tokenizer)
    end = _conversation_end(tokenizer, messages, full, markup) if messages[-1]["role"] == "assistant" else 0
    segments: list[tuple[str, bool]] = []
    pos = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render_text(tokenizer, messages[: i + 1], add_generation_prompt=False)
        suffix = _check_prefixes(full[:pos], prompt, through, full, i, markup)
        through = through[: len(through) - (end if i == len(messages) - 1 else suffix)]
        if len(through) <= len(prompt):
            raise UserError(f"the chat template renders assistant turn {i} as nothing")
        answer = through[len(prompt) :]
        cut = _answer_end(answer, stops)
        segments.append((prompt[pos:], False))
        segments.append((answer[:cut], True))
        segments.append((answer[cut:], False))
        pos = len(through)
    segments.append((full[pos:], False))
    return [(text, is_answer) for text, is_answer in segments if text]


def _check_prefixes(before: str, prompt: str, through: str, full: str, i: int, markup: Sequence[str]) -> int:
    """Masks need each rendering to extend the previous one; say which one does not, and where. Returns the length
    of the final suffix of `through` (`_final_suffix`)."""
    where = f"the chat template is not prefix-stable at message {i} (an assistant turn)"
    if not prompt.startswith(before):
        diff = _divergence(before, prompt, "the earlier turns alone", "with this prompt")
        raise UserError(
            f"{where}: rendering the conversation up to this turn changes how its earlier turns render ({diff}); "
            "loss masks cannot be derived from it (pass --chat-template with a template that renders earlier turns "
            "the same way)"
        )
    if not through.startswith(prompt):
        diff = _divergence(prompt, through, "the generation prompt", "the rendered turn")
        raise UserError(
            f"{where}: its generation prompt is not how it renders the start of an assistant turn ({diff}), so the "
            "model would be trained on another prompt than it is sampled from (pass --chat-template with a template "
            "whose generation prompt matches)"
        )
    suffix = _final_suffix(through, full, markup)
    if suffix is None or len(through) - suffix < len(prompt):
        diff = _divergence(through, full, "the conversation up to this turn", "the whole one")
        raise UserError(
            f"{where}: later messages change how this turn and the ones before it render ({diff}), e.g. a template "
            "that drops earlier reasoning or moves the system prompt (pass --chat-template with a template that "
            "renders earlier turns the same way)"
        )
    return suffix


def render_conversation(tokenizer: Any, messages: Messages) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation, and a mask that is 1 on assistant answers (incl. their end-of-turn)."""
    ids: list[int] = []
    mask: list[int] = []
    for text, is_answer in conversation_segments(tokenizer, messages):
        piece = _encode(tokenizer, text)
        ids.extend(piece)
        mask.extend([int(is_answer)] * len(piece))
    return ids, mask


def special_token_in(tokenizer: Any, text: str) -> str | None:
    """The first of the tokenizer's special tokens written out in `text` (as `<|im_end|>`), or None. Rendered into a
    prompt, such text is read as that token (a turn boundary, an end of text), not as characters. Generated text never
    holds one (decoding skips them), so a model's answer passed back in always passes."""
    names = set(tokenizer.all_special_tokens or [])
    found = [(text.find(name), name) for name in names if name and name in text]
    return min(found)[1] if found else None


def special_text(tokenizer: Any, text: str) -> str | None:
    """Why `text` cannot go into a prompt as text (`special_token_in`), or None: what the server answers with."""
    token = special_token_in(tokenizer, text)
    if token is None:
        return None
    return f"contains {token!r}, a special token of the served model (it would be read as that token, not as text)"


def render_prompt(tokenizer: Any, messages: Messages) -> list[int]:
    """Ids the model sees before it writes the next assistant turn (the conversation + the generation prompt)."""
    if not messages:
        raise UserError("empty prompt")
    if messages[-1]["role"] == "assistant":
        raise UserError("a prompt must not end with an assistant message")
    return _encode(tokenizer, _render_text(tokenizer, messages, add_generation_prompt=True))


def render_scored_response(tokenizer: Any, prompt: Messages, response: str) -> tuple[list[int], list[int]]:
    """(answer, tail) ids of `response` as the model's next turn after `prompt`: the answer as the policy writes it
    (up to its end-of-turn token), and the markup the template writes after it when the conversation ends there
    (ChatML's "\n", Phi-3's "\n<|endoftext|>"). prompt + answer + tail is the template's full rendering; a reward is
    read at its last token."""
    conv = list(prompt) + [{"role": "assistant", "content": response}]
    segments = conversation_segments(tokenizer, conv)
    last = max(j for j, (_, is_answer) in enumerate(segments) if is_answer)
    tail = "".join(text for text, _ in segments[last + 1 :])
    return _encode(tokenizer, segments[last][0]), _encode(tokenizer, tail)


def render_response(tokenizer: Any, prompt: Messages, response: str) -> list[int]:
    """Ids of `response` as the model's next turn after `prompt`, including its end-of-turn token."""
    return render_scored_response(tokenizer, prompt, response)[0]


@dataclass(frozen=True)
class TurnEnd:
    """How the chat template closes a conversation's last assistant turn, for reading rewards after generation."""

    token_id: int | None  # the end-of-turn token that ends the policy's answer (None: the template has none)
    tail: tuple[int, ...]  # what the template writes after it: ChatML and Gemma "\n", Phi-3 "\n<|endoftext|>"

    def complete(self, response: Sequence[int]) -> list[int]:
        """`response` (ids as generated) followed by the tail when it ends with the end-of-turn token, so that the
        reward is read where it is read in training: at the last token of the template's rendering."""
        ended = len(response) > 0 and self.token_id is not None and response[-1] == self.token_id
        return list(response) + list(self.tail) if ended else list(response)

    def close(self, response: Sequence[int]) -> list[int]:
        """`response` as an answer that ends where it stops: one cut at a length limit (no end-of-turn token) gets
        the end-of-turn token and the tail, as the template renders a finished answer of that text; any other is
        `complete`d. Unchanged where the template has no end-of-turn token or the response is empty."""
        if not response or self.token_id is None or response[-1] == self.token_id:
            return self.complete(response)
        return [*response, self.token_id, *self.tail]

    def answer(self, response: Sequence[int], close_cut: bool = True) -> list[int]:
        """`response` as a ranked answer's tokens: up to its end-of-turn token, without the tail; with `close_cut`
        one cut at a length limit gets the end-of-turn token (as `close` reads it)."""
        if close_cut and response and self.token_id is not None and response[-1] != self.token_id:
            return [*response, self.token_id]
        return list(response)


def turn_end(tokenizer: Any) -> TurnEnd:
    """The template's `TurnEnd`, from the rendering of a one-question conversation."""
    prompt = [{"role": "user", "content": "Hi"}]
    answer, tail = render_scored_response(tokenizer, prompt, "Hello")
    stops = end_of_turn_texts(tokenizer)
    text = tokenizer.decode(answer, skip_special_tokens=False)
    ended = any(text.endswith(s) for s in stops)
    return TurnEnd(answer[-1] if ended else None, tuple(tail))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, *, chat_template: str = CHATML_TEMPLATE, model_max_length: int = 1024
) -> Any:
    """Train a byte-level BPE and wrap it as a `PreTrainedTokenizerFast` (pad != eos, ChatML template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=None,
        chat_template=chat_template,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


# What a directory holds when it holds a tokenizer (fast, or one transformers converts from a vocabulary file).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
CHAT_TEMPLATE_HELP = (
    "a Jinja chat template file that replaces the model's own (saved with the model it trains), or a shipped training "
    "template: qwen3-training, phi3-training, r1-distill-training (docs/chat-templates.md)"
)
# Training-friendly templates for families whose own template renders earlier turns differently in later prefixes.
SHIPPED_TEMPLATES = {p.stem: p for p in sorted((Path(__file__).parent / "templates").glob("*.jinja"))}


def load_tokenizer(
    path: str, chat_template: str | Path | None = None, *, revision: str | None = None, trust_remote_code: bool = False
) -> Any:
    """A tokenizer directory, a model's, or a hub id's (at `revision`); a real pad token is added where there is none
    (or it is EOS), and the model's generation_config.json says which ids end an assistant turn
    (`set_generation_stops`). chat_template: a Jinja file that replaces the tokenizer's template
    (`--chat-template`)."""
    from transformers import AutoTokenizer

    from flywheel.models import check_not_run_dir, describe_source, hub_error, resolve_model_path

    # A directory may hold a tokenizer alone (no config.json): only model directories need one.
    source = path if Path(path).is_dir() else resolve_model_path(path)
    if Path(path).is_dir() and not (Path(path) / "tokenizer_config.json").is_file():
        check_not_run_dir(Path(path), "tokenizer_config.json")
        if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
            raise UserError(
                f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...): a model directory needs the "
                "tokenizer it was trained with beside it"
            )
    hub = {"revision": revision} if revision else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    except (OSError, ValueError, ImportError) as err:
        source = describe_source(path, revision)
        raise UserError(f"cannot load a tokenizer from {source}: {hub_error(err, path, revision)}") from None
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # Reusing EOS as padding makes padded EOS tokens invisible to losses that mask padding; add a real pad.
        tok.add_special_tokens({"pad_token": PAD})
    gen_file = _generation_config_file(source, revision)
    if gen_file is not None:
        try:
            set_generation_stops(tok, json.loads(gen_file.read_text()).get("eos_token_id"))
        except (ValueError, TypeError, AttributeError):
            raise UserError("not a generation config (JSON with eos_token_id)", path=str(gen_file)) from None
    if chat_template:
        tok.chat_template = read_chat_template(chat_template)
    return tok


def _generation_config_file(source: str, revision: str | None) -> Path | None:
    """generation_config.json of a local directory, or of a hub model (cached or downloaded), if it has one."""
    local = Path(source) / GENERATION_CONFIG
    if local.is_file() or Path(source).is_dir():
        return local if local.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(
        source,
        GENERATION_CONFIG,
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )
    return Path(found) if found else None


def read_chat_template(path: str | Path) -> str:
    """The text of a Jinja chat template file (or of a shipped one, by name: SHIPPED_TEMPLATES; or the one a
    tokenizer directory saves, as TRL's chat_template_path takes), its syntax checked."""
    from jinja2 import TemplateError

    p = Path(path)
    if not p.is_file() and str(path) in SHIPPED_TEMPLATES:
        p = SHIPPED_TEMPLATES[str(path)]
    if p.is_dir():
        text, p = _saved_template(p)
    elif p.is_file():
        text = read_text(p)
    else:
        raise UserError(
            f"chat template file does not exist (shipped templates: {', '.join(SHIPPED_TEMPLATES)})", path=str(p)
        )
    if not text.strip():
        raise UserError("the chat template file is empty", path=str(p))
    try:  # transformers' own compiler (its extensions and tags); rendering errors are reported per conversation
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return text
    try:
        _compile_jinja_template(text)
    except TemplateError as err:
        line = getattr(err, "lineno", None)
        raise UserError(f"not a Jinja template: {getattr(err, 'message', err)}", path=str(p), line=line) from None
    return text


def _saved_template(directory: Path) -> tuple[str, Path]:
    """(text, file) of the chat template a tokenizer directory saves: chat_template.jinja, as transformers writes it,
    else the `chat_template` of its tokenizer_config.json (the default one of named templates)."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8"), directory / "chat_template.jinja"
    config = directory / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    except (ValueError, AttributeError):
        raise UserError("not a tokenizer config (a JSON object)", path=str(config)) from None
    if isinstance(template, list):
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if not isinstance(template, str):
        raise UserError(
            "no chat template in this directory (no chat_template.jinja, none in tokenizer_config.json)",
            path=str(directory),
        )
    return template, config


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """Write the tokenizer, and the ids that end an assistant turn as a generation_config.json where the model wrote
    none (a reward model's directory), so that every directory flywheel writes renders answers the same way."""
    tokenizer.save_pretrained(out_dir)
    gen_file = Path(out_dir) / GENERATION_CONFIG
    if not gen_file.exists() and getattr(tokenizer, GENERATION_STOPS_ATTR, None):
        stops = turn_stop_ids(tokenizer)
        gen = {"eos_token_id": stops if len(stops) > 1 else stops[0], "pad_token_id": tokenizer.pad_token_id}
        gen_file.write_text(json.dumps(gen, indent=2) + "\n")


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The ids that end an assistant turn: the tokenizer's EOS plus any EOS ids of the model's generation config."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    extra = getattr(generation_config, "eos_token_id", None)
    for i in extra if isinstance(extra, list) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids

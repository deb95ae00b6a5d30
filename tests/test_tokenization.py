"""render_conversation: masks for any chat template, prefix-stability check, tokenizer training/offline loading."""

from __future__ import annotations

import pytest
from tests.conftest import CORPUS

from flywheel.errors import UserError
from flywheel.tokenization import render_conversation, render_prompt, render_response, train_tokenizer

CONV = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{% endfor %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
UNSTABLE = "{{ messages | length }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"


def make_tok(template: str, specials: list[str], eos: str, bos: str | None = None):
    tok = train_tokenizer(CORPUS * 10, vocab_size=350, chat_template=template)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    if bos is not None:
        tok.bos_token = bos
    return tok


TEMPLATES = {
    "chatml": lambda: train_tokenizer(CORPUS * 10, vocab_size=350),
    "llama3": lambda: make_tok(
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        eos="<|eot_id|>",
        bos="<|begin_of_text|>",
    ),
    "zephyr": lambda: make_tok(ZEPHYR, ["<|user|>", "<|assistant|>", "<|system|>", "</s>"], eos="</s>"),
    "mistral": lambda: make_tok(MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], eos="</s>", bos="<s>"),
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_mask_covers_exactly_the_answers_and_their_end_of_turn(name):
    tok = TEMPLATES[name]()
    ids, mask = render_conversation(tok, CONV)
    assert len(ids) == len(mask)
    masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    eos = tok.eos_token
    assert masked.replace("\n", "").replace(" ", "") == f"Itis4.{eos}Paris.{eos}".replace(" ", "")
    # Everything is rendered: the ids decode to the template's own text.
    full = tok.apply_chat_template(CONV, tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == full
    # The last masked token is the end-of-turn token, and the answer never starts inside the prompt markup.
    last = max(i for i, m in enumerate(mask) if m)
    assert ids[last] == tok.eos_token_id


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompt_plus_response_equals_rendered_turn(name):
    tok = TEMPLATES[name]()
    prompt = CONV[:1]
    p_ids = render_prompt(tok, prompt)
    r_ids = render_response(tok, prompt, "It is 4.")
    ids, mask = render_conversation(tok, CONV[:2])
    # The engine sees exactly the prompt ids, then produces the response ids: training must see the same tokens.
    assert ids[: len(p_ids) + len(r_ids)] == p_ids + r_ids
    assert mask[len(p_ids) : len(p_ids) + len(r_ids)] == [1] * len(r_ids)
    assert sum(mask[: len(p_ids)]) == 0
    assert r_ids[-1] == tok.eos_token_id


def test_system_message_is_never_trained_on():
    tok = TEMPLATES["chatml"]()
    ids, mask = render_conversation(tok, [{"role": "system", "content": "Be brief."}] + CONV[:2])
    assert "Be brief" not in tok.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_template_that_is_not_prefix_stable_is_rejected():
    tok = make_tok(UNSTABLE, [], eos="<|im_end|>")
    with pytest.raises(UserError, match="not prefix-stable"):
        render_conversation(tok, CONV)


def test_prompt_must_end_with_a_user_turn(tokenizer):
    with pytest.raises(UserError, match="must not end with an assistant"):
        render_prompt(tokenizer, CONV[:2])
    with pytest.raises(UserError, match="empty"):
        render_prompt(tokenizer, [])


def test_trained_tokenizer_roundtrips_offline(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Émile 🙂 says: the capital of France is Paris."
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.pad_token_id == tokenizer.pad_token_id and loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.padding_side == "left"
    assert render_conversation(loaded, CONV) == render_conversation(tokenizer, CONV)

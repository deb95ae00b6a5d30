"""The prefix check: templates that only add a final suffix are accepted, rejected ones say exactly why, and
`--chat-template PATH` trains with a template that works. The templates are written here to follow the rendering
rules of Phi-3, Qwen3, Mistral-v0.3 and DeepSeek-R1-distill."""

from __future__ import annotations

import json
import re

import pytest
from tests.conftest import CORPUS

from flywheel.cli import main
from flywheel.errors import UserError
from flywheel.models import build_causal_lm, config_for_tokenizer, save_pretrained
from flywheel.tokenization import load_tokenizer, render_conversation, train_tokenizer

# Qwen3: reasoning (`<think>...</think>`) of assistant turns before the last user message is dropped.
QWEN3 = (
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- set c = m['content'] %}"
    "{%- if m['role'] == 'assistant' and loop.index0 < ns.last_user %}{%- set c = c.split('</think>')[-1] %}"
    "{%- endif %}{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
# The same rules, but every turn keeps its reasoning: what a training template for Qwen3 looks like.
QWEN3_TRAINING = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)
# Mistral-v0.3: the system prompt is written into the last user message.
MISTRAL_V03 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
    "{%- set msgs = messages[1:] %}{%- else %}{%- set sys = '' %}{%- set msgs = messages %}{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}{%- for m in msgs %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}{{- bos_token }}"
    "{%- for m in msgs %}{%- if m['role'] == 'user' %}"
    "{%- if sys and loop.index0 == ns.last_user %}{{- '[INST] ' + sys + '\n\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- else %}{{- m['content'] + eos_token }}{%- endif %}{%- endfor %}"
)
# DeepSeek-R1-distill: the generation prompt opens a <think> block that rendered assistant turns do not have.
R1 = (
    "{{ bos_token }}{%- for m in messages %}{%- if m['role'] == 'user' %}{{ '<|User|>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}{{ '<|Assistant|>' + m['content'].split('</think>')[-1] + eos_token }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|Assistant|><think>\n' }}{%- endif %}"
)
# Phi-3/3.5: eos_token once at the very end of a conversation rendered without a generation prompt.
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

THINK = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>two and two</think>It is 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "<think>three and three</think>It is 6."},
]
SYSTEM = [{"role": "system", "content": "Be brief."}] + [{**m, "content": m["content"][-7:]} for m in THINK]


def tok_with(template: str, specials: list[str], eos: str = "<|im_end|>", bos: str | None = None):
    tok = train_tokenizer(CORPUS * 10, vocab_size=350, chat_template=template)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    if bos is not None:
        tok.bos_token = bos
    return tok


def test_a_template_that_only_appends_eos_at_the_very_end_is_accepted():
    tok = tok_with(PHI3, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], eos="<|endoftext|>")
    conv = [{"role": "system", "content": "Be brief."}] + THINK + [{"role": "user", "content": "4 + 4?"}]
    conv.append({"role": "assistant", "content": "8"})
    ids, mask = render_conversation(tok, conv)
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(conv, tokenize=False)
    masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    # without the generation config's <|end|>, an answer runs to EOS: the final suffix is still no answer's part
    assert masked == "".join(m["content"] + "<|end|>\n" for m in conv if m["role"] == "assistant")


@pytest.mark.parametrize(
    ("template", "specials", "eos", "conv", "why"),
    [
        (QWEN3, [], "<|im_end|>", THINK, r"later messages change how this turn .* render \(at character \d+, .*think"),
        (
            MISTRAL_V03,
            ["<s>", "</s>", "[INST]", "[/INST]"],
            "</s>",
            SYSTEM,
            r"later messages change .*'<s>\[INST\] Be brief",
        ),
        (
            R1,
            ["<|User|>", "<|Assistant|>", "<|end_of_sentence|>"],
            "<|end_of_sentence|>",
            THINK,
            r"its generation prompt is not how it renders the start of an assistant turn .*<think>",
        ),
    ],
    ids=["qwen3-drops-earlier-think", "mistral-v0.3-moves-the-system-prompt", "r1-generation-prompt-adds-think"],
)
def test_a_rejected_template_says_where_and_why(template, specials, eos, conv, why):
    tok = tok_with(template, specials, eos=eos, bos="<s>" if "<s>" in specials else None)
    with pytest.raises(UserError, match="not prefix-stable at message") as err:
        render_conversation(tok, conv)
    assert len(str(err.value).splitlines()) == 1
    assert re.search(why, str(err.value)), str(err.value)
    assert "--chat-template" in str(err.value)


@pytest.fixture
def qwen3_model(tmp_path):
    tok = tok_with(QWEN3, [])
    model = build_causal_lm(config_for_tokenizer(tok, "nano", max_position_embeddings=256), seed=0)
    save_pretrained(model, tok, tmp_path / "base")
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"messages": THINK}) + "\n" for _ in range(4)))
    return tmp_path / "base", data


def test_sft_with_chat_template_trains_on_a_template_the_models_own_is_rejected_for(qwen3_model, tmp_path, capsys):
    base, data = qwen3_model
    flags = ["--model", str(base), "--data", str(data), "--max-steps", "1", "--eval-split", "0", "--progress", "false"]
    assert main(["sft", *flags, "--out", str(tmp_path / "plain")]) == 2
    assert "not prefix-stable" in capsys.readouterr().err
    template = tmp_path / "qwen3_training.jinja"
    template.write_text(QWEN3_TRAINING)
    assert main(["sft", *flags, "--out", str(tmp_path / "run"), "--chat-template", str(template)]) == 0
    saved = load_tokenizer(str(tmp_path / "run" / "final"))
    assert saved.chat_template == QWEN3_TRAINING  # the next stage renders with it too
    ids, mask = render_conversation(saved, THINK)
    assert "<think>two and two</think>" in saved.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_rm_dpo_and_ppo_take_chat_template_and_bad_template_files_are_one_line_errors(qwen3_model, tmp_path, capsys):
    from flywheel.train.dpo import DPOConfig
    from flywheel.train.ppo.config import PPOConfig
    from flywheel.train.reward import RewardConfig

    for cls in (RewardConfig, PPOConfig, DPOConfig):
        assert "chat_template" in cls.__dataclass_fields__, cls
    base, _ = qwen3_model
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": THINK[:3], "chosen": "<think>x</think>6", "rejected": "5"}) + "\n")
    template = tmp_path / "t.jinja"
    template.write_text(QWEN3_TRAINING)
    rm = ["rm", "--model", str(base), "--data", str(prefs), "--max-steps", "1", "--eval-split", "0"]
    assert main([*rm, "--out", str(tmp_path / "rm0"), "--progress", "false"]) == 2  # the prompt's earlier think
    assert "not prefix-stable" in capsys.readouterr().err
    assert main([*rm, "--out", str(tmp_path / "rm"), "--progress", "false", "--chat-template", str(template)]) == 0
    assert load_tokenizer(str(tmp_path / "rm" / "final")).chat_template == QWEN3_TRAINING
    dpo = ["dpo", "--model", str(base), "--data", str(prefs), "--max-steps", "1", "--eval-split", "0"]
    assert main([*dpo, "--out", str(tmp_path / "dpo0"), "--progress", "false"]) == 2  # DPO renders the same way
    assert main([*dpo, "--out", str(tmp_path / "dpo"), "--progress", "false", "--chat-template", str(template)]) == 0
    assert load_tokenizer(str(tmp_path / "dpo" / "final")).chat_template == QWEN3_TRAINING
    capsys.readouterr()
    missing = tmp_path / "missing.jinja"
    assert main([*rm, "--out", str(tmp_path / "rm2"), "--chat-template", str(missing)]) == 2
    assert capsys.readouterr().err.strip().startswith(f"flywheel rm: {missing}: chat template file does not exist")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    assert main([*rm, "--out", str(tmp_path / "rm3"), "--chat-template", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flywheel rm: {broken}:") and "not a Jinja template" in err and len(err.splitlines()) == 1


def test_a_tokenizer_directory_gives_its_chat_template(qwen3_model, tmp_path, capsys):
    """TRL's chat_template_path also takes a tokenizer's directory: its saved template (chat_template.jinja, or the
    one in tokenizer_config.json, the default of named ones) is used."""
    from flywheel.tokenization import read_chat_template

    jinja_dir, config_dir, named_dir, empty_dir = (tmp_path / n for n in ("a", "b", "c", "d"))
    for d in (jinja_dir, config_dir, named_dir, empty_dir):
        d.mkdir()
    (jinja_dir / "chat_template.jinja").write_text(QWEN3_TRAINING)
    (config_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": QWEN3_TRAINING}))
    named = [{"name": "tool_use", "template": "{{ 1 }}"}, {"name": "default", "template": QWEN3_TRAINING}]
    (named_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    (empty_dir / "tokenizer_config.json").write_text("{}")
    assert read_chat_template(jinja_dir) == read_chat_template(config_dir) == read_chat_template(named_dir)
    assert read_chat_template(named_dir) == QWEN3_TRAINING
    base, _ = qwen3_model
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": THINK[:3], "chosen": "<think>x</think>6", "rejected": "5"}) + "\n")
    rm = ["rm", "--model", str(base), "--data", str(prefs), "--max-steps", "1", "--eval-split", "0"]
    assert main([*rm, "--out", str(tmp_path / "rm"), "--chat_template_path", str(config_dir)]) == 0
    assert load_tokenizer(str(tmp_path / "rm" / "final")).chat_template == QWEN3_TRAINING
    capsys.readouterr()
    assert main([*rm, "--out", str(tmp_path / "rm2"), "--chat-template", str(empty_dir)]) == 2
    assert (
        capsys.readouterr().err.strip() == f"flywheel rm: {empty_dir}: no chat template in this directory (no "
        "chat_template.jinja, none in tokenizer_config.json)"
    )


# Mistral's older rule: roles must alternate user/assistant from the first message (a system message is refused).
MISTRAL_STRICT = (
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_skip_bad_skips_records_the_chat_template_rejects_and_errors_name_file_and_line(
    stage, tmp_path, capsys, caplog
):
    tok = tok_with(MISTRAL_STRICT, ["<s>", "</s>", "[INST]", "[/INST]"], eos="</s>", bos="<s>")
    save_pretrained(build_causal_lm(config_for_tokenizer(tok, "nano"), seed=0), tok, tmp_path / "base")
    capsys.readouterr()  # transformers' progress bars
    user = {"role": "user", "content": "What is 2 + 2?"}
    system = {"role": "system", "content": "Be brief."}
    if stage == "sft":
        good = {"messages": [user, {"role": "assistant", "content": "It is 4."}]}
        bad = {"messages": [system, *good["messages"]]}
    else:
        good = {"prompt": [user], "chosen": "It is 4.", "rejected": "It is 5."}
        bad = {**good, "prompt": [system, user]}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, good, bad, good]))
    flags = [stage, "--model", str(tmp_path / "base"), "--data", str(data), "--max-steps", "1", "--eval-split", "0"]
    flags += ["--progress", "false"]
    assert main([*flags, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"flywheel {stage}: {data}:3: the chat template rejected the conversation: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )
    with caplog.at_level("WARNING", logger="flywheel"):
        assert main([*flags, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    assert (
        f"skipped 1 of 4 records in {data}: 1 rejected by the chat template (first: {data}:3: the chat" in caplog.text
    )
    if stage == "rm":  # the reward model's other inputs: reference conversations, and `flywheel score`
        convs = tmp_path / "convs.jsonl"
        answer = {"role": "assistant", "content": "It is 4."}
        convs.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [[user, answer], [system, user, answer]]))
        caplog.clear()
        with caplog.at_level("WARNING", logger="flywheel"):
            assert main([*flags, "--out", str(tmp_path / "r"), "--skip-bad", "--reference-data", str(convs)]) == 0
        assert f"skipped 1 of 2 records in {convs}: 1 rejected by the chat template (first: {convs}:2:" in caplog.text
        score = ["score", "--model", str(tmp_path / "b" / "final"), "--data", str(convs)]
        capsys.readouterr()
        assert main(score) == 2 and f"{convs}:2: the chat template rejected" in capsys.readouterr().err
        assert main([*score, "--skip-bad"]) == 0 and len(capsys.readouterr().out.splitlines()) == 1
    data.write_text(json.dumps(bad) + "\n")
    assert main([*flags, "--out", str(tmp_path / "c"), "--skip-bad"]) == 2
    assert "all 1 records are bad: 1 rejected by the chat template" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "family", "specials", "eos", "bos"),
    [
        ("qwen3-training", QWEN3, ["<|im_start|>"], "<|im_end|>", None),
        ("phi3-training", PHI3, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<|endoftext|>", None),
        ("r1-distill-training", R1, ["<|User|>", "<|Assistant|>"], "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>"),
    ],
)
def test_shipped_training_templates_render_every_prefix_alike_and_the_family_s_turns(name, family, specials, eos, bos):
    """The shipped training templates (`--chat-template NAME`) render multi-turn conversations with reasoning and a
    system message prefix-stably, and a conversation's final turn as the family's own template does."""
    from flywheel.tokenization import SHIPPED_TEMPLATES, read_chat_template

    assert name in SHIPPED_TEMPLATES
    shipped = tok_with(read_chat_template(name), specials, eos=eos, bos=bos)
    own = tok_with(family, specials, eos=eos, bos=bos)
    for conv in (THINK, SYSTEM if name != "qwen3-training" else THINK[:2], THINK[:2]):
        ids, mask = render_conversation(shipped, conv)
        assert len(ids) == len(mask) and any(mask)
    # the last answer reads as in the family's rendering (what the model sees at inference is its own format)
    last = shipped.apply_chat_template(THINK[:2], tokenize=False)
    theirs = own.apply_chat_template(THINK[:2], tokenize=False)
    if name == "r1-distill-training":  # R1 strips the reasoning from rendered turns; the training template keeps it
        theirs = theirs.replace("It is 4.", "<think>two and two</think>It is 4.")
    if name == "phi3-training":  # Phi-3 writes eos_token once after the whole conversation
        theirs = theirs.removesuffix(eos)
    assert last == theirs
    if name != "phi3-training":  # the family's own template is rejected on a second turn with reasoning
        with pytest.raises(UserError):
            render_conversation(own, THINK)

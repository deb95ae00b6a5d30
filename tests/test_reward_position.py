"""One reading position: the reward is read at the last token of the chat template's full rendering, in reward-model
training, `RewardModel.score`, best-of-n (`score_ids`), PPO's Reward role and plain transformers, for templates whose
end-of-turn token is not EOS (Gemma-, Phi-3- and Llama-3-style), a ChatML/Qwen-style one and one that writes nothing
after the end-of-turn token (Phi-4-style). The templates are written here to follow each family's rendering rules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tests.conftest import CORPUS

from flywheel.cli import main
from flywheel.models import build_causal_lm, config_for_tokenizer, load_sequence_classifier, save_pretrained
from flywheel.tokenization import (
    load_tokenizer,
    render_conversation,
    render_prompt,
    render_scored_response,
    set_generation_stops,
    train_tokenizer,
    turn_end,
)

# Gemma-2/3 rules: "model" for the assistant role, <end_of_turn> then "\n" after every turn, BOS first; EOS is <eos>.
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Phi-3/3.5 rules: <|role|>\n ... <|end|>\n per turn; without a generation prompt eos_token (<|endoftext|>) is appended
# once, at the very end of the conversation.
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Qwen2.5 rules: ChatML with a default system prompt when the conversation has none.
QWEN = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3 rules: header tokens, content trimmed, <|eot_id|> ends a turn with nothing after it; a base model's EOS is
# <|end_of_text|>, the generation config adds <|eot_id|>.
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{{ m['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Phi-4 rules: ChatML with <|im_sep|> after the role and nothing after <|im_end|>.
PHI4 = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# name -> (template, extra special tokens, eos, bos, the generation config's eos ids, end-of-turn, tail text)
FAMILIES = {
    "gemma": (GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<eos>", "<bos>",
              ["<eos>", "<end_of_turn>"], "<end_of_turn>", "\n"),
    "phi3": (PHI3, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<|endoftext|>", None,
             ["<|endoftext|>", "<|assistant|>", "<|end|>"], "<|end|>", "\n<|endoftext|>"),
    "qwen": (QWEN, [], "<|im_end|>", None, ["<|im_end|>", "<|endoftext|>"], "<|im_end|>", "\n"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>"], "<|end_of_text|>", "<|begin_of_text|>", ["<|end_of_text|>", "<|eot_id|>"],
               "<|eot_id|>", ""),
    "phi4": (PHI4, ["<|im_sep|>"], "<|im_end|>", None, ["<|im_end|>"], "<|im_end|>", ""),
}  # fmt: skip

CONV = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def family_tokenizer(name: str):
    template, specials, eos, bos, stops, _, _ = FAMILIES[name]
    tok = train_tokenizer(CORPUS * 10, vocab_size=350, chat_template=template)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    if bos is not None:
        tok.bos_token = bos
    set_generation_stops(tok, tok.convert_tokens_to_ids(stops))
    return tok


@pytest.mark.parametrize("name", list(FAMILIES))
def test_answers_end_at_the_end_of_turn_token_and_the_tail_completes_the_rendering(name):
    tok = family_tokenizer(name)
    eot, tail_text = FAMILIES[name][5], FAMILIES[name][6]
    ids, mask = render_conversation(tok, CONV)  # two assistant turns: Phi-3's final eos is not a prefix problem
    assert ids == tok.apply_chat_template(CONV, return_dict=True)["input_ids"]
    masked = tok.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert masked == f"It is 4.{eot}Paris.{eot}"  # never the "\n" or the final <|endoftext|> after it
    answer, tail = render_scored_response(tok, CONV[:1], "It is 4.")
    assert answer[-1] == tok.convert_tokens_to_ids(eot) and tok.decode(tail, skip_special_tokens=False) == tail_text
    full = tok.apply_chat_template(CONV[:2], return_dict=True)["input_ids"]
    assert render_prompt(tok, CONV[:1]) + answer + tail == full
    end = turn_end(tok)
    assert end.token_id == tok.convert_tokens_to_ids(eot) and list(end.tail) == tail
    assert end.complete(answer) == answer + tail and end.complete(answer[:-1]) == answer[:-1]


PROMPTS = ["Say something about the cat", "Say something about Paris", "What is 12 + 30?"]
ANSWERS = ["the cat says please", "hello world", "It is 42.", "Paris is the capital of France please"]


def rm_for(name: str, root) -> tuple:
    """A reward model trained by `flywheel rm` (a few steps, normalised) from a tiny policy with this template."""
    tok = family_tokenizer(name)
    policy = build_causal_lm(config_for_tokenizer(tok, "nano", max_position_embeddings=256), seed=0)
    policy.generation_config.eos_token_id = tok.convert_tokens_to_ids(FAMILIES[name][4])
    save_pretrained(policy, tok, root / "policy")
    rows = [
        {"prompt": p, "completions": [ANSWERS[i % 4], ANSWERS[(i + 1) % 4]], "order": [[i % 2], [1 - i % 2]]}
        for i, p in enumerate(PROMPTS * 3)
    ]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--lr", "1e-2", "--batch-size", "4", "--max-steps", "3", "--eval-split", "0", "--progress", "false"]
    out = str(root / "rm")
    assert (
        main(["rm", "--model", str(root / "policy"), "--data", str(root / "prefs.jsonl"), "--out", out, *flags]) == 0
    )
    return root / "policy", root / "rm" / "final"


PLAIN = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path, conversations = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
scores = []
with torch.no_grad():
    for conversation in conversations:
        batch = tokenizer.apply_chat_template(conversation, return_dict=True, return_tensors="pt")
        scores.append(model(**batch).logits[0, 0].item() - getattr(model.config, "flywheel_reward_offset", 0.0))
assert not any(name.split(".")[0] == "flywheel" for name in sys.modules)
print(json.dumps(scores))
"""


@pytest.mark.parametrize("name", list(FAMILIES))
def test_plain_transformers_in_a_process_without_flywheel_gives_flywheels_scores(name, tmp_path):
    from flywheel.train.reward import RewardModel

    policy_dir, rm_dir = rm_for(name, tmp_path)
    rm = RewardModel.from_pretrained(rm_dir)
    assert abs(rm.offset) > 1e-4  # the normalisation offset is part of what must be reproduced
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] + [CONV[:3]]
    answers = ANSWERS
    conversations = [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers, strict=True)]
    plain = subprocess.run(
        [sys.executable, "-c", PLAIN, str(rm_dir), json.dumps(conversations)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    expected = torch.tensor(json.loads(plain.stdout.splitlines()[-1]))
    torch.testing.assert_close(rm.score(prompts, answers), expected, atol=1e-5, rtol=0)
    # `flywheel score` writes the same numbers, one line per conversation
    data = tmp_path / "convs.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    assert main(["score", "--model", str(rm_dir), "--data", str(data), "--out", str(tmp_path / "scores.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [line["messages"] for line in lines] == conversations
    torch.testing.assert_close(torch.tensor([line["score"] for line in lines]), expected, atol=1e-5, rtol=0)
    # best-of-n scores what the engine returns: the prompt ids and the answer up to its end-of-turn token
    tok = load_tokenizer(str(policy_dir))
    generated = [render_scored_response(tok, p, a)[0] for p, a in zip(prompts, answers, strict=True)]
    stops = tok.convert_tokens_to_ids(FAMILIES[name][4])
    assert all(g[-1] in stops for g in generated)
    by_ids = rm.score_ids([render_prompt(tok, p) for p in prompts], generated)
    torch.testing.assert_close(by_ids, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_training_and_generation_time_scores_are_equal(name, tmp_path):
    from flywheel.data.formats import Message, Ranking
    from flywheel.engine.engine import default_stop_ids
    from flywheel.models import load_causal_lm
    from flywheel.train.ppo.roles import Reward
    from flywheel.train.ppo.rollout import build_sequences
    from flywheel.train.reward import collate_groups, encode_rankings, reward_offset, sequence_rewards

    policy_dir, rm_dir = rm_for(name, tmp_path)
    tok = load_tokenizer(str(rm_dir))  # the RM's directory says which tokens end a turn, as the policy's does
    assert tok.flywheel_generation_stops == load_tokenizer(str(policy_dir)).flywheel_generation_stops
    model = load_sequence_classifier(str(rm_dir)).eval()
    offset = reward_offset(model.config)
    rankings = [Ranking([Message("user", p)], ANSWERS[:2], [[0], [1]]) for p in PROMPTS]
    groups = encode_rankings(tok, rankings, max_length=256)
    with torch.no_grad():  # what rm_loss reads during training
        training = sequence_rewards(model, collate_groups(groups, tok.pad_token_id)) - offset
    # generation time: the engine's rollout rows (left-padded prompt, answer up to the stop token, right padding)
    prompts = [g.prompt_ids for g in groups for _ in range(g.k)]
    responses = [r for g in groups for r in g.responses]
    stops = default_stop_ids(load_causal_lm(str(policy_dir)), load_tokenizer(str(policy_dir)))
    assert all(r[-1] in stops for r in responses)
    s = build_sequences(prompts, responses, [True] * len(responses), tok.pad_token_id)
    reward = Reward(model, bias=offset, turn_end=turn_end(tok))
    ppo = reward.forward(s.sequences, s.attention_mask, s.position_ids, s.prompt_len, s.response_mask)
    torch.testing.assert_close(ppo, training, atol=1e-5, rtol=0)
    from flywheel.train.reward import RewardModel

    best_of_n = RewardModel(model, tok).score_ids(prompts, responses)
    torch.testing.assert_close(best_of_n, training, atol=1e-5, rtol=0)
    # a response cut at the length limit (no end-of-turn token) is read as an answer that ends there, as training
    # reads a ranked answer of that text (here the cut answers are the full ones less their end-of-turn token)
    cut = [r[:-1] for r in responses]
    s = build_sequences(prompts, cut, [False] * len(cut), tok.pad_token_id)
    rows = (s.sequences, s.attention_mask, s.position_ids, s.prompt_len, s.response_mask)
    torch.testing.assert_close(reward.forward(*rows), training, atol=1e-5, rtol=0)
    torch.testing.assert_close(RewardModel(model, tok).score_ids(prompts, cut), training, atol=1e-5, rtol=0)
    # or where it stops (close_cut=False), in both places: a position training never reads
    ppo_cut = Reward(model, bias=offset, turn_end=turn_end(tok), close_cut=False).forward(*rows)
    rm_cut = RewardModel(model, tok).score_ids(prompts, cut, close_cut=False)
    torch.testing.assert_close(ppo_cut, rm_cut, atol=1e-5, rtol=0)
    assert not torch.allclose(ppo_cut, ppo, atol=1e-4)


def test_score_cli_writes_json_lines_to_stdout_and_rejects_bad_records(tmp_path, capsys):
    _, rm_dir = rm_for("qwen", tmp_path)
    data = tmp_path / "convs.jsonl"
    good = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["score", "--model", str(rm_dir), "--data", str(data)]) == 2
    assert f"{data}:2:" in capsys.readouterr().err
    assert main(["score", "--model", str(rm_dir), "--data", str(data), "--skip-bad", "--normalize", "false"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    from flywheel.train.reward import RewardModel

    raw = RewardModel.from_pretrained(rm_dir).score([good["messages"][:1]], ["world"], normalize=False)
    assert len(out) == 1 and abs(out[0]["score"] - float(raw[0])) < 1e-5
    assert main(["score", "--data", str(data)]) == 2 and "--model is required" in capsys.readouterr().err


_BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_GQA = dict(_BASE, num_key_value_heads=2)
ARCHITECTURES = {  # tiny configs of ten architectures' sequence classifiers (GQA where the architecture has it)
    "llama": _GQA,
    "qwen2": _GQA,
    "qwen3": dict(_GQA, head_dim=8),
    "mistral": _GQA,
    "gemma2": dict(_GQA, head_dim=8),
    "gemma3_text": dict(_GQA, head_dim=8),
    "phi3": _GQA,
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32),
    "gpt_neox": _BASE,
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_reads_the_reward_at_the_same_token(arch, tmp_path):
    """Gemma-style template on ten architectures: RewardModel.score (prompt shared or not), best-of-n's score_ids,
    PPO's reward role and plain transformers agree, the offset included; no head has a bias to absorb it."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from flywheel.train.ppo.roles import Reward
    from flywheel.train.ppo.rollout import build_sequences
    from flywheel.train.reward import RewardModel, normalize_rewards

    tok = family_tokenizer("gemma")
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    config = AutoConfig.for_model(arch, vocab_size=len(tok), num_labels=1, **ids, **ARCHITECTURES[arch])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    assert model.score.bias is None  # so the offset cannot hide in the weights
    assert normalize_rewards(model, 0.25) == 0.25  # stored in the config, for plain transformers to subtract
    save_pretrained(model, tok, tmp_path / "rm")
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")  # as a user loads it (its class may follow the model type)
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    answers = ANSWERS[:3]
    with torch.no_grad():
        plain = torch.tensor(
            [
                model(**tok.apply_chat_template(p + [{"role": "assistant", "content": a}], return_dict=True,
                                                return_tensors="pt")).logits[0, 0].item() - 0.25
                for p, a in zip(prompts, answers, strict=True)
            ]
        )  # fmt: skip
    rm = RewardModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(rm.score(prompts, answers), plain, atol=1e-5, rtol=0)
    separate = RewardModel.from_pretrained(tmp_path / "rm", share_prompt=False).score(prompts, answers)
    torch.testing.assert_close(separate, plain, atol=1e-5, rtol=0)
    prompt_ids = [render_prompt(rm.tokenizer, p) for p in prompts]
    generated = [render_scored_response(rm.tokenizer, p, a)[0] for p, a in zip(prompts, answers, strict=True)]
    torch.testing.assert_close(rm.score_ids(prompt_ids, generated), plain, atol=1e-5, rtol=0)
    s = build_sequences(prompt_ids, generated, [True] * len(generated), rm.pad_id)
    reward = Reward(rm.model, bias=rm.offset, turn_end=turn_end(rm.tokenizer))
    ppo = reward.forward(s.sequences, s.attention_mask, s.position_ids, s.prompt_len, s.response_mask)
    torch.testing.assert_close(ppo, plain, atol=1e-5, rtol=0)


def test_complete_turns_appends_the_tail_to_rows_that_end_with_the_end_of_turn_token_only():
    from flywheel.tokenization import TurnEnd
    from flywheel.train.ppo.roles import complete_turns
    from flywheel.train.ppo.rollout import build_sequences

    eot, pad = 9, 0
    s = build_sequences([[5, 6], [4, 5, 6], [3]], [[7, eot], [7, 8, 8], [eot]], [True, False, True], pad)
    seq, attn, pos, lengths = complete_turns(
        s.sequences, s.attention_mask, s.position_ids, s.prompt_len, s.response_mask.sum(1), TurnEnd(eot, (10, 11))
    )
    assert seq.tolist() == [
        [0, 5, 6, 7, eot, 10, 11, 0],
        [4, 5, 6, 7, 8, 8, 0, 0],
        [0, 0, 3, eot, 10, 11, 0, 0],
    ]
    assert attn.tolist() == [[0, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]]
    assert [p[m.bool()].tolist() for p, m in zip(pos, attn, strict=True)] == [
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3],
    ]
    assert lengths.tolist() == [4, 3, 3]
    assert TurnEnd(eot, (10, 11)).complete([7, eot]) == [7, eot, 10, 11]
    assert TurnEnd(None, ()).complete([7, eot]) == [7, eot]


def test_close_cut_ends_a_cut_response_with_the_end_of_turn_token_and_the_tail():
    from flywheel.tokenization import TurnEnd
    from flywheel.train.ppo.roles import complete_turns
    from flywheel.train.ppo.rollout import build_sequences

    eot, pad = 9, 0
    s = build_sequences([[5, 6], [4, 5, 6], [3]], [[7, eot], [7, 8, 8], [eot]], [True, False, True], pad)
    seq, attn, pos, lengths = complete_turns(
        s.sequences,
        s.attention_mask,
        s.position_ids,
        s.prompt_len,
        s.response_mask.sum(1),
        TurnEnd(eot, (10, 11)),
        close_cut=True,
    )
    assert seq.tolist() == [
        [0, 5, 6, 7, eot, 10, 11, 0, 0],
        [4, 5, 6, 7, 8, 8, eot, 10, 11],
        [0, 0, 3, eot, 10, 11, 0, 0, 0],
    ]
    assert [p[m.bool()].tolist() for p, m in zip(pos, attn, strict=True)] == [
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5, 6, 7, 8],
        [0, 1, 2, 3],
    ]
    assert lengths.tolist() == [4, 6, 3]
    end = TurnEnd(eot, (10, 11))
    assert end.close([7, 8]) == [7, 8, eot, 10, 11] and end.close([7, eot]) == end.complete([7, eot])
    assert end.close([]) == [] and TurnEnd(None, ()).close([7, 8]) == [7, 8]
    # no end-of-turn token in the template: nothing to close with, the rows stay as they are
    same = complete_turns(
        s.sequences, s.attention_mask, s.position_ids, s.prompt_len, s.response_mask.sum(1), TurnEnd(None, ())
    )
    assert torch.equal(same[0], s.sequences)

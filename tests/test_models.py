"""Checkpoints are plain HF directories: they load in bare transformers, and load_* gives clear errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from flywheel.errors import UserError
from flywheel.models import (
    build_causal_lm,
    config_for_tokenizer,
    count_parameters,
    load_causal_lm,
    load_sequence_classifier,
    save_pretrained,
)

PLAIN_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
path, kind = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(path)
cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
model = cls.from_pretrained(path).eval()
ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
with torch.no_grad():
    out = model(ids).logits
assert not any(m.startswith("flywheel") for m in sys.modules), "flywheel was imported"
row = out[0, -1, :5] if out.ndim == 3 else out[0]
print(json.dumps({"logits": row.tolist(), "pad": tok.pad_token_id, "eos": tok.eos_token_id}))
"""


def _plain_load(path, kind):
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(path), kind], capture_output=True, text=True, cwd="/", check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_causal_lm_checkpoint_loads_in_plain_transformers(model_dir, tokenizer):
    got = _plain_load(model_dir, "lm")
    model = load_causal_lm(str(model_dir)).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(ids).logits[0, -1, :5]
    torch.testing.assert_close(torch.tensor(got["logits"]), want, rtol=0, atol=1e-6)
    assert got["pad"] == tokenizer.pad_token_id != got["eos"]


def test_reward_model_checkpoint_loads_in_plain_transformers(model_dir, tokenizer, tmp_path):
    rm = load_sequence_classifier(str(model_dir))
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tokenizer.pad_token_id
    d = rm.score.weight.shape[1]
    std = float(rm.score.weight.detach().std())
    assert abs(std - 1 / (d + 1) ** 0.5) < 0.3 / (d + 1) ** 0.5  # InstructGPT head init
    out = save_pretrained(rm, tokenizer, tmp_path / "rm")
    got = _plain_load(out, "rm")
    assert len(got["logits"]) == 1
    # Loading a saved classifier keeps its trained head (no re-initialisation).
    again = load_sequence_classifier(str(out))
    assert torch.equal(again.score.weight, rm.score.weight)


def test_tiny_sizes(tokenizer):
    small = build_causal_lm(config_for_tokenizer(tokenizer, "tiny"))
    assert 0.1e6 < count_parameters(small) < 1.5e6
    with pytest.raises(UserError, match="unknown model size"):
        config_for_tokenizer(tokenizer, "huge")


def test_missing_or_bad_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"))


def test_a_mistyped_run_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch, model_dir, tokenizer):
    """`runs/sft1` where `runs/` is a local directory is a path (offline, a hub lookup retries for most of a minute);
    a run directory given for its model names the model inside it."""
    from flywheel.models import is_hub_id
    from flywheel.tokenization import load_tokenizer

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and is_hub_id("gpt2")
    (tmp_path / "runs").mkdir()
    assert not is_hub_id("runs/nope")
    with pytest.raises(UserError, match=r"does not exist: runs/nope \(runs/ is a local directory"):
        load_causal_lm("runs/nope")
    (tmp_path / "runs" / "sft1").mkdir()
    shutil.copytree(model_dir, tmp_path / "runs" / "sft1" / "final")
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(UserError, match="runs/sft1 is a run directory, not a model: its model is runs/sft1/final"):
            load("runs/sft1")


def test_save_is_atomic(tmp_path, tiny_model, tokenizer, monkeypatch):
    target = tmp_path / "final"
    save_pretrained(tiny_model, tokenizer, target)
    before = sorted(p.name for p in target.iterdir())

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_pretrained(tiny_model, tokenizer, target)
    assert sorted(p.name for p in target.iterdir()) == before  # the old directory is intact
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temp dirs left behind


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_disable_dropout_makes_training_mode_forwards_deterministic(kind, tokenizer):
    """Llama reads its attention dropout as a float at forward time; GPT-2 has nn.Dropout modules: both go to 0, and
    the config says so (what a saved model records)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from flywheel.models import DROPOUT_FIELDS, disable_dropout

    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, attention_dropout=0.5)  # fmt: skip
        model = LlamaForCausalLM(config)
        model.config._attn_implementation = "eager"  # the path that applies attention dropout
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.5,
                            embd_pdrop=0.5, attn_pdrop=0.5)  # fmt: skip
        model = GPT2LMHeadModel(config)
    model.train()
    ids = torch.randint(0, len(tokenizer), (2, 12))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is live
    disable_dropout(model)
    assert torch.equal(model(ids).logits, model(ids).logits)
    assert all(getattr(model.config, name, 0.0) in (0.0, None) for name in DROPOUT_FIELDS)

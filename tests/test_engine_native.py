"""The native decode step (engine/native_decode.c): equal to the torch compact forward and to HF, built once and
atomically, and a clean fallback to the torch path when it cannot be built or is turned off."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from flywheel.engine import Engine, SamplingParams, compact, native
from flywheel.engine.compact import CompactCausalLM
from test_engine import PROMPTS, _hf_greedy, _model

NATIVE_FAMILIES = ["llama", "llama-gqa-bias-rope", "qwen2", "qwen3", "mistral"]
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


def _torch_path(model) -> CompactCausalLM:
    forward = CompactCausalLM(model, native_step=False)
    assert not forward.uses_native and forward.native_reason == "native_step=False"
    return forward


@needs_cc
@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_native_steps_equal_the_torch_steps_with_padding_and_dropped_rows(family):
    model = _model(family)
    fast, ref = CompactCausalLM(model), _torch_path(model)
    assert fast.uses_native, fast.native_reason
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p) :], valid[i, width - len(p) :] = torch.tensor(p), True
    steps = 14  # past the mistral config's 6-slot sliding window
    with torch.inference_mode():
        logits, state = fast.start(ids, valid, width + steps)
        ref_logits, ref_state = ref.start(ids, valid, width + steps)
        for t in range(steps):
            tokens = ref_logits.argmax(-1)
            logits, ref_logits = fast.step(state, tokens), ref.step(ref_state, tokens)
            assert logits.dtype == torch.float32 and logits.shape == ref_logits.shape
            torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-5)
            n = state.n  # the written slots (the rest of the cache is never read before a step writes it)
            torch.testing.assert_close(state.kv[..., :n, :], ref_state.kv[..., :n, :], atol=2e-5, rtol=1e-5)
            if t == 5:  # drop rows 0 and 2: the cache is copied, rows keep their own positions
                rows = torch.tensor([3, 1])
                fast.keep(state, rows)
                ref.keep(ref_state, rows)
                ref_logits = ref_logits[rows]


@needs_cc
def test_native_engine_equals_hf_generate_and_the_torch_path():
    model = _model("llama-gqa-bias-rope")
    engine = Engine(model)
    assert engine._forward.uses_native
    greedy = SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[])
    assert engine.generate(PROMPTS, greedy).tokens == _hf_greedy(model, PROMPTS, 24, eos=None)
    sampled = SamplingParams(max_new_tokens=24, temperature=0.8, top_k=50, top_p=0.95, seed=3)
    ours = engine.generate(PROMPTS, sampled)
    theirs = Engine(model, native_step=False).generate(PROMPTS, sampled)
    assert ours.tokens == theirs.tokens
    for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


@needs_cc
def test_native_step_follows_weight_updates():
    model = _model("llama")
    engine = Engine(model)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[])
    before = engine.generate(PROMPTS, greedy).tokens
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.0)  # bumps every version counter: the packed panels must be rebuilt
    after = engine.generate(PROMPTS, greedy).tokens
    assert after != before
    assert after == _hf_greedy(model, PROMPTS, 12, eos=None)


@needs_cc
def test_the_library_is_built_once_into_the_cache_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_CACHE_DIR", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path / "native" and path.exists()
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime  # found, not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_no_compiler_or_off_falls_back_to_the_torch_step(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("FLYWHEEL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-flywheel")
    native.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="flywheel.engine.native"):
            engine = Engine(_model("llama"))
        assert not engine._forward.uses_native
        assert "native decode step unavailable" in caplog.text and "no-such-compiler-flywheel" in caplog.text
        greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[])
        assert engine.generate(PROMPTS, greedy).tokens == _hf_greedy(engine.model, PROMPTS, 12, eos=None)
        native.reset()
        monkeypatch.delenv("CC")
        monkeypatch.setenv("FLYWHEEL_NATIVE", "0")
        assert not Engine(_model("llama"))._forward.uses_native
        assert "FLYWHEEL_NATIVE=0" in CompactCausalLM(_model("llama")).native_reason
    finally:
        native.reset()


def test_bf16_unsupported_activations_and_large_models_stay_on_the_torch_step(monkeypatch):
    model = _model("llama")
    assert "float32" in CompactCausalLM(model, torch.bfloat16).native_reason
    model.config.hidden_act = "gelu"
    assert "activation" in CompactCausalLM(model).native_reason
    model.config.hidden_act = "silu"
    monkeypatch.setattr(compact, "NATIVE_MAX_PARAMS", 1000)
    assert "parameters" in CompactCausalLM(model).native_reason


@needs_cc
def test_native_step_uses_the_grown_rope_table_for_long_prompts():
    model = _model("llama")  # 128 positions; the tables start at 256 and grow on demand
    model.config.max_position_embeddings = 1024
    engine = Engine(model)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[])
    engine.generate(PROMPTS, greedy)
    long = [[(7 * i) % 300 + 3 for i in range(400)], [5, 9, 17]]
    tokens = engine.generate(long, greedy).tokens
    weights = engine._forward._weights
    assert weights.rope.shape[0] > 400 and weights.native.rope is weights.rope
    assert tokens == Engine(model, native_step=False).generate(long, greedy).tokens

"""Streaming: text pieces that never split a UTF-8 character, and that add up to the decoded generation."""

from __future__ import annotations

import pytest
import torch

from flywheel.engine import Detokenizer, Engine, SamplingParams
from flywheel.models import build_causal_lm, config_for_tokenizer
from flywheel.tokenization import train_tokenizer

TEXT = "héllo wörld — 你好，世界 🙂🎉 naïve café"


@pytest.fixture(scope="module")
def tok():
    # A 300-token BPE: few merges, so multi-byte characters are split over several byte tokens.
    corpus = ["hello world, the quick brown fox jumps over the lazy dog " * 3, TEXT, "café naïve"] * 5
    return train_tokenizer(corpus, vocab_size=300)


def _pieces(tok, ids: list[int]) -> list[str]:
    detok = Detokenizer(tok)
    return [detok.push(i) for i in ids] + [detok.flush()]


def test_detokenizer_holds_back_partial_characters(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the text should have characters split across tokens"
    pieces = _pieces(tok, ids)
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some token completed no character and was held back
    assert "🙂" in pieces and "你" in pieces


def test_detokenizer_skips_special_tokens_and_flushes_an_incomplete_end(tok):
    emoji = tok("🙂", add_special_tokens=False)["input_ids"]
    assert len(emoji) > 1
    ids = tok("ok ", add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + emoji[:-1]
    pieces = _pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert pieces[-1].endswith("\ufffd") and "<|im_end|>" not in "".join(pieces)


def test_engine_stream_equals_generate(tok):
    model = build_causal_lm(config_for_tokenizer(tok, "nano", initializer_range=0.3), seed=0).eval()
    engine = Engine(model, tok)
    prompt = tok("hello", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=4)
    stream = engine.stream(prompt, params)
    pieces = list(stream)
    gen = engine.generate([prompt], params)
    assert stream.tokens == gen.tokens[0] and stream.logprobs == pytest.approx(gen.logprobs[0])
    assert stream.finish_reason == gen.finish_reasons[0]
    assert "".join(pieces) == tok.decode(gen.tokens[0], skip_special_tokens=True) == stream.text


def test_engine_streams_a_memorised_multibyte_text(tok):
    """A model trained to recite TEXT streams it piece by piece, each piece whole characters, then stops."""
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    seq = torch.tensor([[tok.bos_token_id, *ids, tok.eos_token_id]])
    model = build_causal_lm(config_for_tokenizer(tok, "nano"), seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(input_ids=seq, labels=seq).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    stream = Engine(model, tok).stream([tok.bos_token_id, *ids[:2]], SamplingParams(temperature=0, max_new_tokens=80))
    pieces = list(stream)
    assert tok.decode(ids[:2]) + "".join(pieces) == TEXT
    assert stream.finish_reason == "stop" and stream.tokens[-1] == tok.eos_token_id
    assert not any("\ufffd" in p for p in pieces)
    assert len(stream.tokens) > len(pieces) + 1  # some tokens were held back until their character completed
    assert {"🙂", "🎉", "你", "好"} <= set(pieces)


def test_closing_a_stream_stops_generation(tok):
    model = build_causal_lm(config_for_tokenizer(tok, "nano", initializer_range=0.3), seed=0).eval()
    stream = Engine(model, tok).stream([5, 6, 7], SamplingParams(max_new_tokens=50, seed=0, stop_token_ids=[]))
    first = next(stream)
    stream.close()
    assert first and 0 < len(stream.tokens) < 50 and stream.finish_reason is None
    assert list(stream) == []


@pytest.mark.parametrize("backend", ["compact", "hf"])
def test_interleaved_streams_do_not_disturb_each_other(tok, backend):
    """A server interleaves the steps of concurrent streams: each generation must keep its own cache."""
    model = build_causal_lm(config_for_tokenizer(tok, "nano", initializer_range=0.3), seed=0).eval()
    engine = Engine(model, tok, backend=backend)
    jobs = [
        ([5, 6, 7], SamplingParams(max_new_tokens=20, seed=1, stop_token_ids=[])),
        ([8, 9], SamplingParams(max_new_tokens=15, temperature=0, stop_token_ids=[])),
    ]
    streams = [engine.stream(prompt, params) for prompt, params in jobs]
    texts = ["", ""]
    while any(s.finish_reason is None for s in streams):
        for i, s in enumerate(streams):
            texts[i] += next(s, "")
    for (prompt, params), stream, text in zip(jobs, streams, texts, strict=True):
        alone = engine.generate([prompt], params)
        assert stream.tokens == alone.tokens[0]
        assert text == tok.decode(alone.tokens[0], skip_special_tokens=True)

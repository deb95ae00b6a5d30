"""Engine: greedy == HF generate, sampled log-probs == a fresh forward pass, per-row stops, live weights, bad input.

Tiny random models of several families; initializer_range 0.3 so that greedy outputs are varied (at HF's default 0.02
a random model repeats one token, which would make equality tests weak).
"""

from __future__ import annotations

import pytest
import torch

from flywheel.engine import Engine, SamplingParams
from flywheel.engine.compact import unsupported_reason
from flywheel.engine.sampling import filter_top_k, filter_top_p, sample
from flywheel.errors import UserError
from flywheel.models import tiny_llama_config

VOCAB = 384
PAD, EOS = 0, 2
PROMPTS = [[5, 9, 17], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [100], [7, 300, 8, 301, 9, 302, 10]]


def _config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1, initializer_range=0.3)
    small = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, max_position_embeddings=128)
    if family in ("llama", "llama-hf"):
        return tiny_llama_config(
            VOCAB,
            "nano",
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=1,
            max_position_embeddings=128,
            initializer_range=0.3,
        )
    if family == "llama-gqa-bias-rope":  # GQA, q/k/v/o biases, untied head, scaled RoPE
        return tf.LlamaConfig(
            **common,
            **small,
            num_attention_heads=4,
            num_key_value_heads=2,
            attention_bias=True,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        )
    if family == "qwen2":
        return tf.Qwen2Config(**common, **small, num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen3":
        return tf.Qwen3Config(**common, **small, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    if family == "mistral":  # a window shorter than the sequences, so the sliding mask matters
        return tf.MistralConfig(**common, **small, num_attention_heads=4, num_key_value_heads=4, sliding_window=6)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            pad_token_id=PAD,
            eos_token_id=EOS,
            bos_token_id=1,
            initializer_range=0.3,
        )
    raise ValueError(family)


FAMILIES = ["llama", "llama-hf", "llama-gqa-bias-rope", "qwen2", "qwen3", "mistral", "gpt2"]


def _model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family)).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    return model


def _engine(model, family: str, **kw) -> Engine:
    engine = Engine(model, backend="hf" if family == "llama-hf" else "auto", **kw)
    expected = "hf" if family in ("llama-hf", "gpt2") else "compact"
    assert engine.backend == expected, unsupported_reason(model)
    return engine


def _hf_greedy(model, prompts, max_new_tokens: int, eos: int | None) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=eos,
    )[:, width:].tolist()
    rows = []
    for row in out:  # HF pads a finished row: cut after its EOS
        rows.append(row[: row.index(eos) + 1] if eos is not None and eos in row else row)
    return rows


def _full_forward_logprobs(model, prompt: list[int], generated: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logp.gather(-1, torch.tensor(generated)[:, None])[:, 0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_generate_token_for_token(family):
    model = _model(family)
    engine = _engine(model, family)
    gen = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[]))
    expected = _hf_greedy(model, PROMPTS, 24, eos=None)
    assert gen.tokens == expected
    assert gen.finish_reasons == ["length"] * len(PROMPTS)
    assert all(len(set(row)) > 5 for row in gen.tokens), "degenerate outputs make this test weak"
    # greedy log-probs are log_softmax(logits) of the argmax token
    for prompt, row, logprobs in zip(PROMPTS, gen.tokens, gen.logprobs, strict=True):
        assert logprobs == pytest.approx(_full_forward_logprobs(model, prompt, row, 0.0), abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_stop_on_their_own_like_hf(family):
    model = _model(family)
    engine = _engine(model, family)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[]))
    stop = free.tokens[1][6]  # a token row 1 produces mid-way: that row (and any other producing it) stops there
    gen = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=[stop]))
    assert gen.tokens == _hf_greedy(model, PROMPTS, 24, eos=stop)
    for row, free_row, reason in zip(gen.tokens, free.tokens, gen.finish_reasons, strict=True):
        if stop in free_row:
            assert row == free_row[: free_row.index(stop) + 1] and reason == "stop"
        else:
            assert row == free_row and reason == "length"
    assert len(gen.tokens[1]) <= 7 and gen.finish_reasons[1] == "stop"


def test_steps_yields_the_loop_with_per_row_budgets():
    engine = _engine(_model("llama"), "llama")
    params = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    full = engine.generate(PROMPTS, params).tokens
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    budgets = [3, 10, 1, 5]
    for step in engine.steps(PROMPTS, params, max_new_tokens=budgets):
        for row, token in zip(step.rows, step.tokens, strict=True):
            tokens[row].append(token)
    assert tokens == [row[:b] for row, b in zip(full, budgets, strict=True)]  # greedy: a cap only truncates
    assert engine.stop_ids_for(params) == [] and engine.stop_ids_for(SamplingParams()) == list(engine.stop_ids)
    with pytest.raises(UserError, match="budgets"):
        engine.steps(PROMPTS, params, max_new_tokens=[1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_sampled_logprobs_equal_a_fresh_forward_pass(family, temperature, top_k, top_p):
    model = _model(family)
    engine = _engine(model, family)
    params = SamplingParams(
        max_new_tokens=16, temperature=temperature, top_k=top_k, top_p=top_p, seed=3, stop_token_ids=[]
    )
    gen = engine.generate(PROMPTS, params)
    for prompt, row, logprobs in zip(PROMPTS, gen.tokens, gen.logprobs, strict=True):
        assert len(row) == 16 and all(isinstance(x, float) for x in logprobs)
        assert logprobs == pytest.approx(_full_forward_logprobs(model, prompt, row, temperature), abs=1e-4)
        if top_k:  # every sampled token is inside the top-k of its (temperature-scaled) distribution
            assert min(logprobs) > -20


def test_seeded_sampling_is_deterministic_and_seed_sensitive():
    model = _model("llama")
    engine = Engine(model)
    p = SamplingParams(max_new_tokens=12, seed=7, stop_token_ids=[])
    a, b = engine.generate(PROMPTS, p), engine.generate(PROMPTS, p)
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, seed=8, stop_token_ids=[]))
    assert a == b
    assert a.tokens != c.tokens


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dropping_finished_rows_does_not_change_any_row(family):
    model = _model(family)
    stops = list(range(3, VOCAB, 9))  # ~1 in 9 tokens stops a row: rows finish at different steps
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=11, stop_token_ids=stops)
    prompts = PROMPTS * 3
    results = [Engine(model, compact_at=at).generate(prompts, params) for at in (0.0, 0.5, 1.0)]
    lengths = {len(row) for row in results[0].tokens}
    assert len(lengths) > 3, "rows should finish at different steps"
    for other in results[1:]:
        assert other.tokens == results[0].tokens
        assert other.finish_reasons == results[0].finish_reasons
        for x, y in zip(other.logprobs, results[0].logprobs, strict=True):
            assert x == pytest.approx(y, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "llama-hf", "gpt2"])
def test_k_samples_from_one_prefill_equal_k_separate_generations(family, monkeypatch):
    """Group rollouts: K samples of each prompt share its prefill (the KV cache is copied to K rows, not recomputed)
    and equal generating the prompt K times over; rows still stop on their own."""
    model = _model(family)
    engine = _engine(model, family)
    k, stops = 4, list(range(3, VOCAB, 9))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5, stop_token_ids=stops)
    repeated = [p for p in PROMPTS for _ in range(k)]
    separate = engine.generate(repeated, params)
    prefilled = []
    start = type(engine._forward).start

    def counting_start(self, ids, valid, capacity):
        prefilled.append(ids.shape[0])
        return start(self, ids, valid, capacity)

    monkeypatch.setattr(type(engine._forward), "start", counting_start)
    grouped = engine.generate(PROMPTS, params, samples_per_prompt=k)
    assert prefilled == [len(PROMPTS)]  # one prefill row per prompt, not K
    assert grouped.tokens == separate.tokens and grouped.finish_reasons == separate.finish_reasons
    assert len({tuple(t) for t in grouped.tokens[:k]}) > 1  # the K samples of a prompt differ
    for x, y in zip(grouped.logprobs, separate.logprobs, strict=True):
        assert x == pytest.approx(y, abs=1e-5)
    budgets = list(engine.steps(PROMPTS, params, max_new_tokens=[2] * len(PROMPTS), samples_per_prompt=k))
    assert len(budgets) <= 2 and max(budgets[0].rows) == len(PROMPTS) * k - 1
    with pytest.raises(UserError, match="samples_per_prompt"):
        engine.generate(PROMPTS, params, samples_per_prompt=0)


def test_row_stops_at_the_end_of_the_context():
    from transformers import AutoModelForCausalLM

    cfg = tiny_llama_config(VOCAB, "nano", max_position_embeddings=16, initializer_range=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    gen = Engine(model).generate(
        [list(range(3, 17))[:13], [5, 6]], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    )
    assert [len(r) for r in gen.tokens] == [3, 8]
    assert gen.finish_reasons == ["length", "length"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_engine_uses_the_current_weights_at_every_call(family):
    model = _model(family)
    engine = _engine(model, family)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[])
    before = engine.generate(PROMPTS, greedy)
    # an optimizer step in place, as PPO does between rollouts
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(input_ids=torch.tensor([PROMPTS[1]]), labels=torch.tensor([PROMPTS[1]])).loss
    loss.backward()
    opt.step()
    model.eval()
    after = engine.generate(PROMPTS, greedy)
    assert after.tokens != before.tokens
    assert after.tokens == _hf_greedy(model, PROMPTS, 12, eos=None)
    # a parameter replaced by a new tensor (not an in-place update)
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight = torch.nn.Parameter(emb.weight.flip(0).clone())
        if getattr(model.config, "tie_word_embeddings", False):
            model.get_output_embeddings().weight = emb.weight
    assert engine.generate(PROMPTS, greedy).tokens == _hf_greedy(model, PROMPTS, 12, eos=None)
    # or a different module altogether
    other = _model(family, seed=5)
    engine.update_weights(other)
    assert engine.generate(PROMPTS, greedy).tokens == _hf_greedy(other, PROMPTS, 12, eos=None)


def test_generic_path_samples_with_dropout_off_and_restores_train_mode():
    model = _model("gpt2")
    model.config.resid_pdrop = model.config.embd_pdrop = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    engine = Engine(model)
    greedy = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    a, b = engine.generate(PROMPTS, greedy), engine.generate(PROMPTS, greedy)
    assert a == b and model.training


def test_bf16_compact_forward_tracks_the_fp32_model():
    model = _model("llama")
    gen = Engine(model, dtype="bf16").generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=0, stop_token_ids=[]))
    for prompt, row, logprobs in zip(PROMPTS, gen.tokens, gen.logprobs, strict=True):
        ref = _full_forward_logprobs(model, prompt, row, 1.0)
        assert logprobs == pytest.approx(ref, abs=0.15)
    assert next(model.parameters()).dtype == torch.float32


def test_default_stop_ids_come_from_the_model_config():
    model = _model("llama")
    engine = Engine(model)
    assert engine.stop_ids == [EOS]
    row = engine.generate([[5, 6]], SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[])).tokens[0]
    engine.stop_ids = [row[1]]
    gen = engine.generate([[5, 6]], SamplingParams(max_new_tokens=4, temperature=0))
    assert gen.tokens[0] == row[: row.index(row[1]) + 1] and gen.finish_reasons == ["stop"]


@pytest.mark.parametrize(
    "prompts,params,message",
    [
        ([], SamplingParams(), "non-empty list of prompts"),
        ([[1, 2], []], SamplingParams(), "prompt 1 is empty"),
        ([5, 6], SamplingParams(), "not a list of token ids"),
        ([[1, VOCAB]], SamplingParams(), "outside the vocabulary"),
        ([[3] * 128], SamplingParams(), "context is 128 tokens"),
        ([[1, 2]], SamplingParams(max_new_tokens=0), "max_new_tokens must be > 0"),
        ([[1, 2]], SamplingParams(max_new_tokens=-3), "max_new_tokens must be > 0"),
        ([[1, 2]], SamplingParams(top_p=0.0), "top_p must be in (0, 1]"),
        ([[1, 2]], SamplingParams(top_p=1.5), "top_p must be in (0, 1]"),
        ([[1, 2]], SamplingParams(temperature=-1.0), "temperature"),
        ([[1, 2]], SamplingParams(top_k=-1), "top_k"),
    ],
)
def test_bad_input_is_a_one_line_user_error(prompts, params, message):
    engine = Engine(_model("llama"))
    with pytest.raises(UserError) as err:
        engine.generate(prompts, params)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_stream_needs_a_tokenizer_and_compact_backend_needs_a_supported_model():
    with pytest.raises(UserError, match="needs a tokenizer"):
        Engine(_model("llama")).stream([1, 2])
    with pytest.raises(UserError, match="compact engine backend cannot run"):
        Engine(_model("gpt2"), backend="compact")


def test_top_k_and_top_p_keep_the_right_sets():
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(3, 500) * 4, torch.randn(2, 500) * 0.01])  # peaky rows, and near-flat rows
    logp = torch.log_softmax(logits, dim=-1)
    kept = torch.isfinite(filter_top_k(logp, 7))
    assert kept.sum(-1).tolist() == [7] * 5
    assert torch.equal(kept, logp >= logp.topk(7).values[:, -1:])
    for p in (0.3, 0.9, 0.999):
        got = torch.isfinite(filter_top_p(logp, p))
        for r in range(logp.shape[0]):  # brute force: sort, keep while the mass before a token is < p
            order = logp[r].argsort(descending=True).tolist()
            want, mass = set(), 0.0
            for i in order:
                if mass >= p:
                    break
                want.add(i)
                mass += logp[r, i].exp().item()
            assert set(got[r].nonzero()[:, 0].tolist()) == want
    # top-p applies to the renormalised top-k distribution (HF's order)
    both = torch.isfinite(filter_top_p(filter_top_k(logp, 3), 0.999))
    assert both.sum(-1).max() <= 3


def test_sampler_draws_from_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    tokens, logprobs = sample(logits, temperature=0.8, top_k=4, top_p=0.9, generator=g)
    probs = torch.softmax(logits[0] / 0.8, dim=-1)
    keep = filter_top_p(filter_top_k(torch.log_softmax(logits[:1] / 0.8, -1), 4), 0.9)[0]
    expected = torch.softmax(keep, dim=-1)
    freq = torch.bincount(tokens, minlength=6).float() / tokens.numel()
    assert torch.allclose(freq, expected, atol=0.015)
    assert (expected[freq == 0] == 0).all() and (freq[expected == 0] == 0).all()
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-6)  # untruncated, temperature-scaled
    greedy, lp = sample(logits[:2], temperature=0)
    assert greedy.tolist() == [0, 0] and lp[0].item() == pytest.approx(torch.log_softmax(logits[0], -1)[0].item())


def test_prompts_may_hold_numpy_or_tuple_ids():
    import numpy as np

    engine = Engine(_model("llama"))
    greedy = SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[])
    as_lists = engine.generate(PROMPTS[:2], greedy)
    assert engine.generate([list(np.array(PROMPTS[0])), tuple(PROMPTS[1])], greedy) == as_lists


def test_weight_updates_do_not_grow_the_rope_tables():
    model = _model("llama")
    engine = Engine(model)
    greedy = SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[])
    sizes = []
    for _ in range(4):
        engine.generate(PROMPTS, greedy)
        sizes.append(engine._forward._weights.rope.shape[0])
        with torch.no_grad():
            model.model.norm.weight.mul_(1.01)  # an in-place update: the weights are re-read next call
    assert len(set(sizes)) == 1 and sizes[0] <= 256
    from transformers import AutoModelForCausalLM

    long = Engine(AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB, "nano", max_position_embeddings=1024)))
    long.generate([[5] * 300], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[]))
    assert long._forward._weights.rope.shape[0] >= 320  # grown when a longer sequence needs it


@pytest.mark.parametrize("family", ["llama", "llama-gqa-bias-rope", "qwen3", "mistral"])
@pytest.mark.parametrize("prompts", [PROMPTS, [[5, 9, 17, 3], [40, 41, 42, 43]]], ids=["padded", "same-length"])
def test_prefill_logits_equal_hf_at_each_prompts_last_token(family, prompts):
    from flywheel.engine.compact import CompactCausalLM

    model = _model(family)
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    with torch.no_grad():
        logits, state = CompactCausalLM(model).start(ids, valid, width + 4)
        for i, p in enumerate(prompts):
            ref = model(input_ids=torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)
    assert state.n == width and state.pos[:, 0].tolist() == [len(p) for p in prompts]


# Requests of a server: different prompts, settings and budgets; (step at which each joins the running batch).
JOINS = [
    (0, PROMPTS[1], SamplingParams(max_new_tokens=20, temperature=1.0, seed=3, stop_token_ids=[EOS])),
    (2, PROMPTS[2], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[])),
    (3, PROMPTS[3], SamplingParams(max_new_tokens=15, temperature=0.7, top_k=10, seed=9, stop_token_ids=[EOS])),
    (5, PROMPTS[0], SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.8, seed=4, stop_token_ids=[])),
    (5, PROMPTS[1], SamplingParams(max_new_tokens=4, temperature=1.0, seed=8, stop_token_ids=[])),
]


def _run_joins(engine, joins, cancel_at=None):
    """Drive a running batch: each request joins at its step; -> per request (tokens, logprobs), steps run."""
    batch = engine.batch()
    owner, out, waiting, t = {}, {}, list(enumerate(joins)), 0
    while len(batch) or waiting:
        for i, (at, prompt, params) in [w for w in waiting if w[1][0] <= t]:
            assert batch.joinable
            for row in batch.add([prompt], params):
                owner[row], out[i] = i, ([], [])
            waiting.remove((i, (at, prompt, params)))
        if cancel_at is not None and t == cancel_at[0]:
            batch.cancel([r for r, i in owner.items() if i == cancel_at[1]])
        if len(batch):
            step = batch.step()
            for row, token, logprob in zip(step.rows, step.tokens, step.logprobs, strict=True):
                out[owner[row]][0].append(token)
                out[owner[row]][1].append(logprob)
        t += 1
    return out, t


@pytest.mark.parametrize("family", ["llama", "llama-hf", "llama-gqa-bias-rope", "qwen3", "mistral", "gpt2"])
@pytest.mark.parametrize("native", [True, False])
def test_requests_joining_a_running_batch_equal_separate_generations(family, native):
    """Continuous batching: prompts join the running batch between steps (each with its own settings, budget and
    seed) and rows leave it as they finish; every request gets the tokens of its own generation alone."""
    if not native and family in ("llama-hf", "gpt2"):
        pytest.skip("the native step is a compact-forward option")
    model = _model(family)
    engine = _engine(model, family, native_step=native)
    alone = [engine.generate([prompt], params) for _, prompt, params in JOINS]
    got, steps = _run_joins(engine, JOINS)
    for i, gen in enumerate(alone):
        assert got[i][0] == gen.tokens[0], f"request {i}"
        assert got[i][1] == pytest.approx(gen.logprobs[0], abs=1e-4)
    assert steps < sum(len(g.tokens[0]) for g in alone)  # they did share steps


def test_a_cancelled_row_leaves_and_the_others_are_unchanged():
    model = _model("llama")
    engine = _engine(model, "llama")
    alone = [engine.generate([prompt], params) for _, prompt, params in JOINS]
    got, _ = _run_joins(engine, JOINS, cancel_at=(4, 0))
    assert len(got[0][0]) == 4  # request 0 made 4 tokens (steps 0-3), then left
    assert got[0][0] == alone[0].tokens[0][:4]
    for i in range(1, len(JOINS)):
        assert got[i][0] == alone[i].tokens[0]


def test_a_join_writes_into_free_rows_in_place_and_no_row_attends_over_slots_none_needs():
    """A row that joins is written into a free row of the running cache (no copy of the others) once the cache has
    room; the steps attend over the slots of the longest live row only, not over a long-finished prompt's."""
    model = _model("llama")
    engine = _engine(model, "llama")
    batch = engine.batch()
    params = SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[])
    long_prompt = list(range(10, 60))
    (first,) = batch.add([long_prompt], params)
    (second,) = batch.add([[5, 6]], SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[]))
    for _ in range(6):
        batch.step()
    assert batch.rows == [second]  # the long prompt's row finished after 4 tokens
    store = batch._state.store  # made with spare rows and slots when the second row joined
    batch.add([[7]], params)  # joins at the next step
    batch.step()
    assert batch._state.store is store and batch._state.b == 2
    assert batch._state.n - batch._state.lo == 2 + 6  # the second row's prompt and tokens; slots before: skipped
    with pytest.raises(UserError, match="outside the vocabulary"):
        batch.add([[VOCAB]], params)
    assert len(batch) == 2  # a rejected prompt leaves the batch as it was


@pytest.mark.parametrize("family", ["llama", "llama-hf"])
def test_requests_that_join_between_two_steps_are_merged_in_one_copy(family):
    """Several adds between two steps (a server admitting seeded requests one group each) join the running cache
    together: one merge, and every request still gets the tokens of its own generation alone."""
    model = _model(family)
    engine = _engine(model, family)
    joins = [(0, PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=1.0, seed=1, stop_token_ids=[]))]
    joins += [
        (2, PROMPTS[i % 4], SamplingParams(max_new_tokens=3 + i, temperature=1.0, seed=10 + i, stop_token_ids=[]))
        for i in range(4)
    ]
    alone = [engine.generate([prompt], params) for _, prompt, params in joins]
    merges = []
    batch_type = type(engine.batch().forward)
    original = batch_type.merge
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch_type, "merge", lambda self, *a: merges.append(len(a[2])) or original(self, *a))
        got, _ = _run_joins(engine, joins)
    assert merges == [4]  # the four requests of step 2 joined in one merge
    for i, gen in enumerate(alone):
        assert got[i][0] == gen.tokens[0], f"request {i}"


@pytest.mark.parametrize("family", ["llama", "llama-hf"])
def test_prompts_with_their_own_settings_share_one_prefill_and_equal_their_generations_alone(family):
    """`add` with one setting per prompt (a server's requests: own temperature, top-k/p, stop ids, budget, seed):
    one prefill for all, and each prompt's tokens are those of its own generation alone."""
    model = _model(family)
    engine = _engine(model, family)
    settings = [params for _, _, params in JOINS[:4]]
    prompts = [prompt for _, prompt, _ in JOINS[:4]]
    alone = [engine.generate([prompt], params) for prompt, params in zip(prompts, settings, strict=True)]
    batch = engine.batch()
    starts = []
    original = type(batch.forward).start
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(batch.forward), "start", lambda self, *a: starts.append(1) or original(self, *a))
        rows = batch.add(prompts, settings, max_new_tokens=[50, 50, 3, 50])
    assert len(starts) == 1
    got = {row: [] for row in rows}
    while batch:
        step = batch.step()
        for row, token in zip(step.rows, step.tokens, strict=True):
            got[row].append(token)
    for i, gen in enumerate(alone):
        expected = gen.tokens[0][:3] if i == 2 else gen.tokens[0]  # prompt 2's budget capped at 3
        assert got[rows[i]] == expected, f"prompt {i}"
    with pytest.raises(UserError, match="2 sampling settings for 4 prompts"):
        batch.add(prompts, settings[:2])
    with pytest.raises(UserError, match="temperature"):
        batch.add(prompts[:1], [SamplingParams(temperature=-1.0)])


def test_compaction_moves_only_the_rows_past_the_live_count_into_finished_places():
    from flywheel.engine.loop import DecodeBatch

    batch = DecodeBatch(forward=None, prepare=None, stop_ids=None)
    batch._alive = [True, False, True, False, True, True]
    assert batch._live_slots() == [0, 4, 2, 5]  # slots 0 and 2 stay; 4 and 5 fill the finished 1 and 3
    batch._alive = [False, False, True]
    assert batch._live_slots() == [2]
    batch._alive = [True, True, False]
    assert batch._live_slots() == [0, 1]  # nothing moves


def test_a_tiny_temperature_samples_the_argmax_without_overflow():
    """softmax(logits / T) tends to the argmax as T -> 0; logits / 1e-40 itself overflows float32 (inf - inf = NaN)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 20
    logits[:, -1] = float("-inf")  # a masked token stays masked
    for temperature in (5e-324, 1e-300, 1e-46, 1e-40, 1e-20, 1e-4):  # the first three are 0 in float32
        for top_p in (1.0, 0.9):
            tokens, logp = sample(logits, temperature=temperature, top_p=top_p, generator=gen)
            assert torch.equal(tokens, logits.argmax(-1)) and torch.allclose(logp, torch.zeros(4), atol=1e-6)
    # Above the threshold nothing changes: the same draws as dividing directly.
    u = torch.rand(4, generator=gen)
    tokens, logp = sample(logits, temperature=0.7, uniform=u)
    expected = torch.softmax(logits / 0.7, dim=-1)
    assert torch.allclose(logp.exp(), expected.gather(-1, tokens[:, None])[:, 0])

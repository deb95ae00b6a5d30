"""The differentiable compact forward equals HF's: hidden states, logits and every parameter's gradient."""

from __future__ import annotations

import pytest
import torch

from flywheel import fastforward

VOCAB = 97
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    attention_dropout=0.0,
    pad_token_id=0,
)


def _causal_lm(kind: str, **kw):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cfg_cls = {
        "llama": LlamaConfig,
        "gqa": LlamaConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "mistral": MistralConfig,
    }[kind]
    extra: dict = {
        "gqa": dict(num_key_value_heads=2),
        "qwen3": dict(num_key_value_heads=2, head_dim=32),
        "mistral": dict(num_key_value_heads=2, sliding_window=5),
        "qwen2": dict(num_key_value_heads=2),
        "llama": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    }[kind]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg_cls(**{**BASE, **extra, **kw}))
    with torch.no_grad():  # norms away from 1 so that their gradients and the q/k norms are really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch(padding: str):
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 12))
    attn = torch.ones_like(ids)
    lengths = [12, 9, 5]
    for row, n in enumerate(lengths):
        if padding == "left":
            attn[row, : 12 - n] = 0
        elif padding == "right":
            attn[row, n:] = 0
    ids = ids.masked_fill(attn == 0, 0)
    pos = (attn.cumsum(1) - 1).clamp_min(0) if padding == "left" else None
    if padding == "positions":  # arbitrary explicit position ids, e.g. restarting inside a row
        pos = torch.cat([torch.arange(6), torch.arange(2, 8)]).expand(3, 12)
    return ids, attn, pos


KINDS = ["llama", "gqa", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding", ["left", "right", "none", "positions"])
def test_hidden_states_and_logits_equal_hf(kind, padding):
    model = _causal_lm(kind)
    assert fastforward.unsupported_reason(model) is None
    ids, attn, pos = _batch(padding)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
        hidden = fastforward.hidden_states(model, ids, attn, pos)
        logits = fastforward.causal_lm_logits(model, ids, attn, pos)
        last = fastforward.causal_lm_logits(model, ids, attn, pos, keep=4)
    real = attn.bool()  # padding positions compute nothing anyone reads
    torch.testing.assert_close(hidden[real], ref.hidden_states[-1][real], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[real], ref.logits[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(last[real[:, -4:]], ref.logits[:, -4:][real[:, -4:]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_gradients_equal_hf(kind, padding):
    model = _causal_lm(kind)
    ids, attn, pos = _batch(padding)
    real = attn.bool()
    weights = torch.randn(*ids.shape, VOCAB)  # a loss that reaches every logit of every real position

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn()[real] * weights[real]).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ours = grads(lambda: fastforward.causal_lm_logits(model, ids, attn, pos))
    ref = grads(lambda: model(input_ids=ids, attention_mask=attn, position_ids=pos).logits)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ref[name].abs().sum() > 0, name
        scale = float(ref[name].abs().max())  # fp32 sums in another order: error relative to the largest entry
        torch.testing.assert_close(
            ours[name], ref[name], rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=lambda m, n=name: f"{n}: {m}"
        )


def test_sequence_classifier_backbone():
    from transformers import AutoModelForSequenceClassification

    config = _causal_lm("qwen2").config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    ids, attn, pos = _batch("left")
    with torch.no_grad():
        ref = model.base_model(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
        ours = fastforward.hidden_states(model, ids, attn, pos)
        kept = fastforward.hidden_states(model, ids, attn, pos, keep=3)
    real = attn.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(kept, ours[:, -3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("additive", [False, True])
def test_custom_4d_block_mask_equals_hf(additive):
    """The reward model's shared-prompt rows: answers see the prompt and themselves, positions restart."""
    model = _causal_lm("gqa").eval()
    model.set_attn_implementation("eager" if additive else "sdpa")
    ids, _, _ = _batch("none")
    seg = torch.tensor([0] * 4 + [1] * 3 + [2] * 5)  # prompt, answer 1, answer 2
    pos = torch.tensor([0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]).expand(3, 12)
    allowed = torch.ones(12, 12, dtype=torch.bool).tril() & ((seg[None, :] == 0) | (seg[:, None] == seg[None, :]))
    mask = allowed.expand(3, 1, 12, 12)
    if additive:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert fastforward.unsupported_reason(model, mask) is None
    with torch.no_grad():
        ref = model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        ours = fastforward.hidden_states(model, ids, mask, pos)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_bf16_autocast_close_to_hf(kind):
    model = _causal_lm(kind)
    ids, attn, pos = _batch("left")
    real = attn.bool()
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
            ours = fastforward.causal_lm_logits(model, ids, attn, pos)
    assert ours.dtype == ref.dtype == torch.bfloat16
    err_hf = (ref.float() - exact)[real].abs().max()
    err_ours = (ours.float() - exact)[real].abs().max()
    assert err_ours <= 2 * err_hf + 1e-3, (err_ours, err_hf)  # as close to fp32 as HF's own bf16 forward
    torch.testing.assert_close(ours.float()[real], ref.float()[real], rtol=0, atol=0.05)


def test_bf16_autocast_gradients_close_to_hf():
    model = _causal_lm("qwen3")
    ids, attn, pos = _batch("left")
    real = attn.bool()
    weights = torch.randn(*ids.shape, VOCAB)

    def grads(fn, bf16: bool = True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = fn()
        (out.float()[real] * weights[real]).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact = grads(lambda: model(input_ids=ids, attention_mask=attn, position_ids=pos).logits, bf16=False)
    ours = grads(lambda: fastforward.causal_lm_logits(model, ids, attn, pos))
    ref = grads(lambda: model(input_ids=ids, attention_mask=attn, position_ids=pos).logits)
    cos = torch.nn.functional.cosine_similarity
    assert cos(ours, ref, dim=0) > 0.999, cos(ours, ref, dim=0)
    assert cos(ours, exact, dim=0) > 0.999, cos(ours, exact, dim=0)

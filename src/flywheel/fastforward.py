"""A differentiable compact forward for the Llama family (Llama, Mistral, Qwen2, Qwen3), for training.

The training counterpart of `flywheel.engine.compact`: the same arithmetic as the HF backbone's forward, run on the HF
module's own parameters with autograd, so gradients land in `model.parameters()` and checkpoints stay plain
transformers. Per layer it runs one q/k/v matmul and one gate/up matmul (the weights concatenated inside the forward;
autograd splits their gradients back), RoPE from tables computed once per model and device by the model's own rotary
module (every RoPE scaling it supports is reproduced), and eager attention with the padding mask applied to the scores
(torch's CPU flash-SDPA backward is slow in bf16: docs/benchmarks.md). Under bf16 autocast the residual stream stays
in float32 as in HF; matmuls run in bf16 and RoPE in the matmuls' dtype.

    from flywheel import fastforward
    hidden = fastforward.hidden_states(model, ids, attention_mask, position_ids)            # (B, T, H)
    logits = fastforward.causal_lm_logits(model, ids, attention_mask, position_ids, keep=R + 1)  # (B, R+1, V)

Both fall back to the HF forward whenever this one cannot apply (`unsupported_reason`): another architecture, LoRA
adapters, gradient checkpointing, FSDP-sharded layers, forward hooks, attention dropout while training. Masks: 2-D
padding masks (left or right padding, any position ids) and custom 4-D masks (bool or additive, as the reward
model's shared-prompt rows use). Under DDP call them inside the wrapper's forward (`distributed.Wrapped.call`), as
the trainers do, so that gradients are synced.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

from flywheel.engine import compact

# Per rotary module: (device, length) -> cos and signed-sin tables (length, D) in float32.
_ROPE: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, tuple[torch.Tensor, torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def unsupported_reason(model: Any, attention_mask: torch.Tensor | None = None) -> str | None:
    """Why the fast forward cannot run `model` (None when it can): the engine's rules plus the training-time ones."""
    reason = compact.unsupported_reason(model, lm_head=False)
    if reason is not None:
        return reason
    inner = model.model
    if getattr(inner, "gradient_checkpointing", False) and inner.training:
        return "gradient checkpointing is on"
    if inner.training and float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout while training"
    if _is_fsdp(inner.layers[0]):
        return "the layers are FSDP-sharded (their parameters are gathered by their own forward)"
    if any(m._forward_hooks or m._forward_pre_hooks for m in (model, inner, *inner.layers)):
        return "forward hooks are registered on the model, its backbone or a layer (they would not run)"
    if attention_mask is not None and attention_mask.dim() == 4:
        if any(w is not None for w in _windows(model)):
            return "a custom 4-D attention mask on a model with sliding-window layers"
    elif attention_mask is not None and attention_mask.dim() != 2:
        return f"a {attention_mask.dim()}-D attention mask"
    return None


def _is_fsdp(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(module, FSDPModule)


def hidden_states(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    keep: int | None = None,
) -> torch.Tensor:
    """The backbone's last hidden states (B, T, H), after the final norm; only the `keep` last positions when given
    (B, keep, H): the last layer then computes only those queries. Falls back to `model.base_model(...)`."""
    if unsupported_reason(model, attention_mask) is not None:
        out = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return out if keep is None else out[:, -keep:]
    return _forward(model, input_ids, attention_mask, position_ids, keep)


def causal_lm_logits(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    *,
    keep: int | None = None,
) -> torch.Tensor:
    """LM logits (B, T, V), or of the `keep` last positions only (B, keep, V). Falls back to `model(...).logits`."""
    if unsupported_reason(model, attention_mask) is not None or getattr(model, "lm_head", None) is None:
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep or 0,
            use_cache=False,
        ).logits
    return model.lm_head(_forward(model, input_ids, attention_mask, position_ids, keep))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _rope_tables(model: Any, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables (>= length, D) in float32 (`compact.rope_tables`), cached per rotary module."""
    rotary = model.model.rotary_emb
    cache = _ROPE.setdefault(rotary, {})
    for (dev, n), tables in cache.items():
        if dev == device and n >= length:
            return tables
    n = max(256, 1 << (length - 1).bit_length())
    tables = compact.rope_tables(rotary, n, device)
    cache.clear()  # one device at a time; a model moved to another device rebuilds its tables
    cache[(device, n)] = tables
    return tables


def _fused(mods: list[torch.nn.Linear], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weights (and biases) of projections that share an input, concatenated along the output dimension, in the
    matmul's dtype (cast before the concatenation: half the bytes to copy under bf16 autocast)."""
    w = torch.cat([m.weight.to(dtype) for m in mods])
    if all(m.bias is None for m in mods):
        return w, None
    return w, torch.cat(
        [(m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)).to(dtype) for m in mods]
    )


class _RMSNormTo(torch.autograd.Function):
    """LlamaRMSNorm of a float32 input (the residual stream under autocast), returned in the matmuls' dtype: the cast
    the next matmul would make is fused in, and the backward is three ops instead of autograd's chain."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        xhat = x * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        return (xhat * weight).to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        xhat, rstd, weight = ctx.saved_tensors
        grad = grad.float()
        grad_w = (grad * xhat).flatten(0, -2).sum(0)
        g = grad * weight
        grad_x = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        return grad_x, grad_w, None, None


def _norm_in(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The RMSNorm in front of a matmul: fused with the cast to `dtype` where the residual stream is float32."""
    if x.dtype == torch.float32 and dtype != torch.float32 and weight.dtype == torch.float32:
        return _RMSNormTo.apply(x, weight, eps, dtype)
    return compact.rms_norm(x, weight, eps)


def _mask(
    attention_mask: torch.Tensor | None, t: int, device: torch.device, window: int | None
) -> torch.Tensor | None:
    """(B, 1, T, T) or (1, 1, T, T) bool, True = masked out: the future, padding keys and keys outside the sliding
    window; or the complement of a custom 4-D mask (bool: True = attend; additive: 0 = attend, < 0 = masked). Every
    query keeps itself so that no row is fully masked (no NaN reaches the backward); a real token always sees
    itself, so only padding rows, which nothing reads, can differ from HF's."""
    eye = torch.eye(t, dtype=torch.bool, device=device)
    if attention_mask is not None and attention_mask.dim() == 4:
        masked = ~attention_mask if attention_mask.dtype == torch.bool else attention_mask < 0
        return masked & ~eye
    idx = torch.arange(t, device=device)
    masked = idx[None, :] > idx[:, None]  # (T, T) [query, key]
    if window is not None:
        masked = masked | (idx[None, :] <= idx[:, None] - window)
    if attention_mask is None or bool(attention_mask.all()):
        return masked[None, None]
    masked = masked | ~attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    return masked & ~eye


def _windows(model: Any) -> list[int | None]:
    return compact._windows(model.config, len(model.model.layers))


def _forward(
    model: Any,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    keep: int | None,
) -> torch.Tensor:
    cfg, inner = model.config, model.model
    b, t = ids.shape
    dev = ids.device
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    eps = cfg.rms_norm_eps
    if position_ids is None:  # HF's default: the column index (right padding or none)
        position_ids = torch.arange(t, device=dev).expand(b, t)
    x = F.embedding(ids, inner.embed_tokens.weight)  # (B, T, hidden), the parameters' dtype: the residual stream
    dtype = _compute_dtype(x)
    cos, sin = _rope_tables(model, int(position_ids.max()) + 1, dev)
    cos = cos[position_ids].to(dtype)[:, :, None]  # (B, T, 1, D)
    sin = sin[position_ids].to(dtype)[:, :, None]
    windows = _windows(model)
    masks = {w: _mask(attention_mask, t, dev, w) for w in set(windows)}
    act = F.silu if cfg.hidden_act == "silu" else _act(cfg.hidden_act)
    n_layers = len(inner.layers)
    for i, (layer, window) in enumerate(zip(inner.layers, windows, strict=True)):
        a, m = layer.self_attn, layer.mlp
        last = i == n_layers - 1 and keep is not None and keep < t
        h = _norm_in(x, layer.input_layernorm.weight, eps, dtype)
        w, bias = _fused([a.q_proj, a.k_proj, a.v_proj], dtype)
        qkv = F.linear(h, w, bias).view(b, t, hq + 2 * hkv, d)  # (B, T, Hq + 2 Hkv, D)
        if getattr(a, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm of q and k before RoPE
            qk = torch.cat(
                [
                    compact.rms_norm(qkv[:, :, :hq], a.q_norm.weight, eps),
                    compact.rms_norm(qkv[:, :, hq : hq + hkv], a.k_norm.weight, eps),
                ],
                dim=2,
            ).to(dtype)
        else:
            qk = qkv[:, :, : hq + hkv]
        qk = qk * cos + qk.roll(d // 2, dims=-1) * sin  # RoPE on q and k at once
        q = qk[:, :, :hq].transpose(1, 2)  # (B, Hq, T, D)
        k = qk[:, :, hq:].transpose(1, 2)  # (B, Hkv, T, D)
        v = qkv[:, :, hq + hkv :].transpose(1, 2)
        mask = masks[window]
        if last:  # only the kept positions' queries matter after the last layer
            q, mask, x = q[:, :, -keep:], mask[:, :, -keep:], x[:, -keep:]
        att = _attention(q, k, v, mask, a.scaling)  # (B, T', Hq * D)
        x = x + F.linear(att, a.o_proj.weight, a.o_proj.bias)
        h = _norm_in(x, layer.post_attention_layernorm.weight, eps, dtype)
        w, bias = _fused([m.gate_proj, m.up_proj], dtype)
        gate, up = F.linear(h, w, bias).chunk(2, dim=-1)
        x = x + F.linear(act(gate) * up, m.down_proj.weight, m.down_proj.bias)
    x = compact.rms_norm(x, inner.norm.weight, eps)
    return x if keep is None else x[:, -keep:]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Eager attention as HF computes it (softmax in float32). q: (B, Hq, T', D); k, v: (B, Hkv, T, D); mask:
    (B or 1, 1, T', T) True = masked out. Grouped-query heads broadcast instead of being repeated."""
    b, hq, tq, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, hkv, g * tq, d)  # the g query heads of one kv head, stacked along the query axis
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, hkv, g, tq, t) * scaling
    scores = scores.masked_fill(mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs.view(b, hkv, g * tq, t), v)  # (B, Hkv, g*T', D)
    return out.view(b, hq, tq, d).transpose(1, 2).reshape(b, tq, hq * d)


def _act(name: str) -> Any:
    from transformers.activations import ACT2FN

    return ACT2FN[name]

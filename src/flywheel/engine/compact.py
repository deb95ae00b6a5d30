"""A compact forward for the Llama family (Llama, Mistral, Qwen2, Qwen3) on the Hugging Face module's own weights.

Why: on a small CPU model one HF decode step is mostly Python and dispatch overhead (masks rebuilt, cache objects,
hooks, kwargs plumbing), so a loop around HF's forward cannot be much faster than `generate`. This module does the same
arithmetic as `LlamaForCausalLM.forward` with far fewer ops per step: q/k/v and gate/up projections fused into one
matmul each, rotary tables computed once (by the model's own rotary module, so every RoPE scaling it supports is
reproduced exactly), and a preallocated KV cache with an additive mask over its slots instead of a growing cache.

The weights are read from the live module: `sync()` compares each parameter's storage pointer and version counter
(bumped by every in-place update: optimizer steps, `load_state_dict`, `copy_`) and rebuilds the fused copies only when
something changed, so a policy trained in place between rollouts is always generated from its current weights.

Layout: prompts are left-padded to a common length P; slot s of the cache holds the token at column s. Padding slots
are never attended to (a padding query attends to itself only, so no row is fully masked and no NaN appears).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from flywheel.engine import native
from flywheel.models import count_parameters

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_UNSUPPORTED_ROPE = ("dynamic", "longrope")  # these change their frequencies with the sequence length
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)
_HAS_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
# The native decode step keeps its own float32 copy of the weights (panels); its gain is the per-op overhead it
# removes, which matters for small models and fades where a step is all GEMM. Above this size: the torch step.
NATIVE_MAX_PARAMS = 200_000_000


def unsupported_reason(model: Any, *, lm_head: bool = True) -> str | None:
    """Why the compact forward cannot run `model` (None when it can). `lm_head=False`: the backbone only (also for
    `*ForSequenceClassification` models, whose head is `score`)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "per-layer"
    if rope_type in _UNSUPPORTED_ROPE or rope_type == "per-layer":
        return f"RoPE type {rope_type!r} is not supported"
    inner = getattr(model, "model", None)
    if inner is None or getattr(inner, "rotary_emb", None) is None or getattr(inner, "layers", None) is None:
        return "unexpected module structure (no model.rotary_emb or model.layers)"
    if lm_head and getattr(model, "lm_head", None) is None:
        return "unexpected module structure (no lm_head)"
    for layer in inner.layers:
        a, m = layer.self_attn, layer.mlp
        linears = [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
        if not all(type(lin) is torch.nn.Linear for lin in linears):
            return "projections are not plain nn.Linear (quantized or adapted?)"
    if getattr(cfg, "hidden_act", None) is None:
        return "no hidden_act in the config"
    return None


def rope_tables(rotary: torch.nn.Module, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables (length, D) in float32 from a HF rotary module (every RoPE scaling it supports):
    rotate_half(x) * sin == roll(x, D/2) * cat(-sin1, sin2), bit for bit, in fewer ops. The engine and the training
    fast forward (`flywheel.fastforward`) both apply RoPE with these."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        probe = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = rotary(probe, torch.arange(length, device=device)[None])  # (1, N, D) float32
    half = cos.shape[-1] // 2
    return cos[0].float(), torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly LlamaRMSNorm: normalise in float32, cast back, then scale in the input dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused op, bit-identical to the formula below in fp32
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class Linear:
    """y = x @ W.T + b for 2-D x, with W kept in the layout that multiplies fastest on this CPU.

    A decode step streams every weight from memory once (the model does not fit in L2), so the packed layouts that
    oneDNN and MKL multiply without re-packing the weight at every call are the fastest (docs/engine.md), measured on
    the 5M model's decode linears at 16 rows, weights not cache-hot:
    - bf16: oneDNN-packed, 2.6 ms per step vs 3.3 ms through F.linear (Xeon with AMX). The plain layout is kept for
      prefills of more than 256 rows, where oneDNN's packed kernel is slower.
    - fp32 on a CPU with AVX-512 (that Xeon): MKL-packed, 4.6 ms per step vs 6.4 ms through F.linear.
    - fp32 on an AVX2-only CPU (an AMD EPYC): oneDNN-packed, 2,048 x 256 at 16 rows in 470 vs 724 us (MKL-packed)
      and 770 us (F.linear) at 2 threads; a whole decode step 15-20% faster than on MKL's layout, prefills too.
    The values are those of F.linear up to fp32 rounding (bit-identical in our checks at 16 rows and more).
    """

    PACKED_MAX_ROWS = 256

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], dtype: torch.dtype):
        w = torch.cat([t.detach() for t in weights]).to(dtype)  # (out, in): projections sharing an input, fused
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ValueError("some but not all fused projections have a bias")
        self.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases]).to(dtype)  # type: ignore
        self.out_features = w.shape[0]
        self.w = w  # (out, in)
        cpu = w.device.type == "cpu"
        self.packed = (
            _mkldnn_pack(w)
            if cpu and (dtype == torch.bfloat16 or dtype == torch.float32 and not _HAS_AVX512)
            else None
        )
        self.mkl = _mkl_pack(w) if cpu and dtype == torch.float32 and self.packed is None else None
        # fp32 prefills are faster oneDNN-packed too
        self.packed_max_rows = self.PACKED_MAX_ROWS if dtype == torch.bfloat16 else 1 << 62

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mkl is not None:
            return torch.ops.mkl._mkl_linear(x, self.mkl, self.w, self.bias, _MKL_ROWS)
        if self.packed is not None and x.shape[0] <= self.packed_max_rows:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.w, self.bias)

    def add_to(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """x + a @ W.T + b (the residual add done in place on the fresh matmul output)."""
        return self(a).add_(x)


def _mkldnn_pack(w: torch.Tensor) -> torch.Tensor | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        probe = torch.ones(1, w.shape[1], dtype=w.dtype)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError):  # oneDNN without bf16 support on this CPU, or an older torch
        return None
    return packed


_MKL_ROWS = 16  # the row count MKL's packed layout is tuned for; any row count multiplies correctly


def _mkl_pack(w: torch.Tensor) -> torch.Tensor | None:
    if not torch.backends.mkl.is_available():
        return None
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, _MKL_ROWS)
        torch.ops.mkl._mkl_linear(torch.ones(1, w.shape[1]), packed, w, None, _MKL_ROWS)
    except (RuntimeError, AttributeError):  # a torch built without MKL's packed GEMM
        return None
    return packed


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: Linear  # q, k, v projections fused: out = (Hq + 2*Hkv) * D
    o: Linear
    ln2: torch.Tensor
    gate_up: Linear  # gate and up projections fused: out = 2 * ffn
    down: Linear
    q_norm: torch.Tensor | None  # Qwen3's per-head RMSNorm of q and k (before RoPE)
    k_norm: torch.Tensor | None
    window: int | None  # sliding-window size of this layer (Mistral, some Qwen layers), None = full attention


def _param(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(dtype)


def _windows(cfg: Any, n_layers: int) -> list[int | None]:
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return [None] * n_layers
    types = getattr(cfg, "layer_types", None)
    if cfg.model_type == "mistral" or types is None:
        return [window] * n_layers
    return [window if t == "sliding_attention" else None for t in types]


@dataclass
class _Weights:
    """One snapshot of the model's weights in the engine's layout (a generation keeps the one it started with)."""

    layers: list[_Layer]
    embed: torch.Tensor  # (V, hidden)
    norm: torch.Tensor  # (hidden,)
    lm_head: Linear
    rope: torch.Tensor  # (positions, 2, D) RoPE cos and signed sin (rotate_half(x) * sin == roll(x, D/2) * this)
    native: native.NativeWeights | None = None  # the same weights for the native decode step, when it runs


@dataclass
class KVState:
    """The state of one generation: its weights snapshot, KV cache, attention bias and positions.

    The cache and bias are the first `b` rows of buffers that may hold more rows and slots (`store`,
    `bias_store`), so that rows join and leave in place (`CompactCausalLM.merge`, `keep`): rows are outermost, so
    the first `b` rows are contiguous."""

    w: _Weights
    store: torch.Tensor  # (rows, L, 2*Hkv, S, D): per row and layer, the k heads then the v heads of every slot
    bias_store: torch.Tensor  # (rows, S) additive attention bias: -inf at padding slots, 0 elsewhere
    pos: torch.Tensor  # (B, 1) int64 position of each row's next token
    n: int  # slots written so far
    b: int  # rows in use
    lo: int = 0  # no row attends to a slot before this one
    scratch: dict = field(default_factory=dict)  # the native step's work buffer, kept across steps

    @property
    def kv(self) -> torch.Tensor:
        """(B, L, 2*Hkv, S, D) the cache of the rows in use."""
        return self.store[: self.b]

    @property
    def bias(self) -> torch.Tensor:
        """(B, S)"""
        return self.bias_store[: self.b]

    @property
    def capacity(self) -> int:
        """Slots each row can hold."""
        return self.store.shape[3]


class CompactCausalLM:
    """Prefill/decode on a preallocated KV cache: `logits, state = start(ids, valid, capacity)`, then
    `step(state, tokens)` per token; both give float32 logits (B, V). `keep(state, rows)` drops finished rows,
    `merge(state, rows, other, extra)` lets the rows of another generation join.
    Each generation has its own state, so several can be interleaved (streams in a server).

    native_step: run float32 CPU decode steps in the native library (`flywheel.engine.native`) when it can be built;
    `native_reason` says why they do not."""

    def __init__(self, model: Any, dtype: torch.dtype | None = None, *, native_step: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the compact forward cannot run this model: {reason}")
        self.model = model
        self.dtype = dtype or next(model.parameters()).dtype
        cfg = model.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scaling = self.head_dim**-0.5
        self.ffn = cfg.intermediate_size
        from transformers.activations import ACT2FN

        self.act = F.silu if cfg.hidden_act == "silu" else ACT2FN[cfg.hidden_act]
        self._fingerprint: tuple | None = None
        self._weights: _Weights | None = None
        self.native_reason = self._native_reason(cfg) if native_step else "native_step=False"
        self._lib = native.load() if self.native_reason is None else None
        if self.native_reason is None and self._lib is None:
            self.native_reason = native.unavailable_reason()

    def _native_reason(self, cfg: Any) -> str | None:
        """Why decode steps cannot run natively (None when they can): the C step is float32, CPU, SiLU only."""
        if self.dtype != torch.float32:
            return f"dtype {self.dtype} (the native step is float32)"
        if self.device.type != "cpu":
            return f"device {self.device.type}"
        if cfg.hidden_act != "silu":
            return f"activation {cfg.hidden_act!r}"
        if self.n_heads % self.n_kv:
            return "query heads are not a multiple of the key/value heads"
        n_params = count_parameters(self.model)
        if n_params > NATIVE_MAX_PARAMS:
            return (
                f"{n_params / 1e6:.0f}M parameters: above {NATIVE_MAX_PARAMS / 1e6:.0f}M the native step's extra "
                "copy of the weights costs more memory than its per-op savings are worth"
            )
        return None

    @property
    def uses_native(self) -> bool:
        """Decode steps run in the native library (`flywheel.engine.native`)."""
        return self._lib is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sync(self, positions: int = 0) -> _Weights:
        """The current weights (and RoPE tables for at least `positions`): re-read from the module if any parameter
        was replaced or updated in place since the last call."""
        params = list(self.model.parameters())
        fingerprint = (self.dtype, tuple((p.data_ptr(), p._version) for p in params))
        w = self._weights
        if w is not None and w.rope.shape[0] < positions:  # RoPE tables depend on positions only, not on the weights
            rope = self._rope(max(positions, 2 * w.rope.shape[0]))
            w = self._weights = dataclasses.replace(w, rope=rope, native=w.native and w.native.with_rope(rope))
        if fingerprint == self._fingerprint and w is not None:
            return w
        dt = self.dtype
        inner = self.model.model
        windows = _windows(self.model.config, len(inner.layers))
        layers = []
        for layer, window in zip(inner.layers, windows, strict=True):
            a, m = layer.self_attn, layer.mlp
            layers.append(
                _Layer(
                    ln1=_param(layer.input_layernorm.weight, dt),
                    qkv=Linear(
                        [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight],
                        [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias],
                        dt,
                    ),
                    o=Linear([a.o_proj.weight], [a.o_proj.bias], dt),
                    ln2=_param(layer.post_attention_layernorm.weight, dt),
                    gate_up=Linear([m.gate_proj.weight, m.up_proj.weight], [m.gate_proj.bias, m.up_proj.bias], dt),
                    down=Linear([m.down_proj.weight], [m.down_proj.bias], dt),
                    q_norm=_param(getattr(getattr(a, "q_norm", None), "weight", None), dt),
                    k_norm=_param(getattr(getattr(a, "k_norm", None), "weight", None), dt),
                    window=window,
                )
            )
        rope = w.rope if w is not None else self._rope(max(positions, 256))
        embed, norm = _param(inner.embed_tokens.weight, dt), _param(inner.norm.weight, dt)
        lm_head = Linear([self.model.lm_head.weight], [self.model.lm_head.bias], dt)
        self._weights = _Weights(
            layers=layers,
            embed=embed,
            norm=norm,
            lm_head=lm_head,
            rope=rope,
            native=self._native_weights(layers, windows, embed, norm, lm_head, rope),
        )
        self._fingerprint = fingerprint
        return self._weights

    def _native_weights(
        self,
        layers: list[_Layer],
        windows: list[int | None],
        embed: torch.Tensor,
        norm: torch.Tensor,
        lm_head: Linear,
        rope: torch.Tensor,
    ) -> native.NativeWeights | None:
        if self._lib is None:
            return None
        tables = [
            dict(
                ln1=layer.ln1.contiguous(),
                qkv=native.panels(layer.qkv.w),
                qkv_bias=layer.qkv.bias,
                o=native.panels(layer.o.w),
                o_bias=layer.o.bias,
                ln2=layer.ln2.contiguous(),
                gate_up=native.panels(layer.gate_up.w),
                gate_up_bias=layer.gate_up.bias,
                down=native.panels(layer.down.w),
                down_bias=layer.down.bias,
                q_norm=layer.q_norm,
                k_norm=layer.k_norm,
            )
            for layer in layers
        ]
        dims = [len(layers), embed.shape[1], self.n_heads, self.n_kv, self.head_dim, self.ffn, lm_head.out_features]
        return native.NativeWeights(
            tables,
            [wnd or 0 for wnd in windows],
            embed.contiguous(),
            norm.contiguous(),
            native.panels(lm_head.w),
            lm_head.bias,
            rope,
            dims,
            self.eps,
            self.scaling,
        )

    def _rope(self, length: int) -> torch.Tensor:
        """cos and signed sin tables (length, 2, D) in the engine's dtype, from the model's own rotary module (one
        table, so that a step gathers both with one index)."""
        cos, sin = rope_tables(self.model.model.rotary_emb, length, self.device)
        return torch.stack([cos, sin], dim=1).to(self.dtype)

    def start(self, ids: torch.Tensor, valid: torch.Tensor, capacity: int) -> tuple[torch.Tensor, KVState]:
        """Prefill left-padded prompts. ids, valid: (B, P); capacity: total slots (P + new tokens).
        Returns the next-token logits (B, V) and the generation's state."""
        b, p = ids.shape
        dev = self.device
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        w = self.sync(positions=int(positions[:, -1].max()) + capacity - p + 1)
        # Not zeroed: the prefill writes every prompt slot (padding included) and a step writes its slot before
        # anything attends to it, so no slot is read unwritten.
        kv = torch.empty(b, len(w.layers), 2 * self.n_kv, capacity, self.head_dim, dtype=self.dtype, device=dev)
        # 0 = attend, -inf = padding; SDPA would convert a boolean mask at every call of every layer.
        bias = torch.zeros(b, capacity, dtype=self.dtype, device=dev)
        bias[:, :p].masked_fill_(~valid, float("-inf"))
        state = KVState(w=w, store=kv, bias_store=bias, pos=positions[:, -1:] + 1, n=p, b=b)
        q_idx = torch.arange(p, device=dev)
        causal = q_idx[None, :] <= q_idx[:, None]  # (P, P) [query, key]
        allowed = (causal & valid[:, None, :]) | torch.eye(p, dtype=torch.bool, device=dev)  # (B, P, P)
        mask = torch.zeros(b, 1, p, p, dtype=self.dtype, device=dev).masked_fill_(~allowed[:, None], float("-inf"))
        # The linears run on the prompts' real tokens only (a third of the slots were padding in
        # bench/engine_vs_hf.py); attention and the cache keep the padded layout.
        if bool(valid.all()):
            return self._forward(state, ids, positions, 0, mask), state
        real = valid.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of the real tokens, row by row
        last = valid.sum(-1).cumsum(0) - 1  # (B,) each row's last token among them (left padding: its last column)
        return self._forward(state, ids, positions, 0, mask, real=real, last=last), state

    def step(self, state: KVState, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return the next-token logits (B, V)."""
        n, lo = state.n, state.lo
        assert n < state.capacity, "KV cache is full: capacity was too small"
        if state.w.native is not None:
            kv, bias = state.kv, state.bias
            out = native.step(self._lib, state.w.native, tokens, state.pos, kv, bias, lo, n, state.scratch)
        else:
            mask = state.bias[:, None, None, lo : n + 1]  # (B, 1, 1, n+1-lo)
            out = self._forward(state, tokens[:, None], state.pos, n, mask, lo=lo)
        state.pos += 1
        state.n = n + 1
        return out

    def keep(self, state: KVState, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current batch, repeats allowed), in that order. In place when they fit
        the cache's rows: only the rows whose index changes are copied (`DecodeBatch` orders them so that the
        fewest move)."""
        m = len(rows)
        if m > state.store.shape[0]:
            state.store = state.kv[rows].contiguous()
            state.bias_store = state.bias[rows].contiguous()
        else:
            moved = (rows != torch.arange(m, device=rows.device)).nonzero().squeeze(1)
            if len(moved):
                src = rows[moved]
                # the right-hand side is gathered before anything is written, so any order of rows is safe
                state.store[moved, :, :, state.lo : state.n] = state.store[src, :, :, state.lo : state.n]
                state.bias_store[moved] = state.bias_store[src]
        state.pos = state.pos[rows]
        state.b = m
        state.lo = _first_attended(state.bias, state.n)

    @staticmethod
    def mergeable(state: KVState) -> bool:
        return True

    def merge(self, state: KVState, rows: torch.Tensor, others: list[KVState], extra: int) -> KVState:
        """`rows` of `state` (as in `keep`) then every row of each of `others`, with room for `extra` more tokens
        per row.

        Each row keeps its slots in order, right-aligned on the common write slot (left padding where a row is
        shorter). When the joining rows fit the cache's free rows and slots, they are written in place and only
        their own slots are copied; otherwise a new cache is made with room to spare (rows and slots), holding only
        the slots some row still attends to. Positions are per row, so no row's numbers change (a sliding window
        counts slots, which keep their gaps)."""
        if any(state.w.layers is not other.w.layers for other in others):
            raise RuntimeError("cannot merge generations made with different weights")
        joining = [(other, _first_attended(other.bias, other.n)) for other in others]
        spans = [other.n - first for other, first in joining]
        m, k, n = len(rows), sum(other.b for other in others), state.n
        w = max([state.w, *(other.w for other in others)], key=lambda x: x.rope.shape[0])  # the longest RoPE table
        if m + k <= state.store.shape[0] and n + extra <= state.capacity and max(spans) <= n:
            lo_kept = state.lo
            self.keep(state, rows)  # the kept rows (and their positions) first, in place
            lo = min([state.lo if m else n, *(n - span for span in spans)])
            at = m
            for (other, first), span in zip(joining, spans, strict=True):
                new = slice(at, at + other.b)
                state.store[new, :, :, n - span : n] = other.kv[:, :, :, first : other.n]
                state.bias_store[new, : n - span] = float("-inf")
                state.bias_store[new, n - span : n] = other.bias[:, first : other.n]
                state.bias_store[new, n:] = 0
                if state.w.native is None:  # masked, but 0 * NaN would still poison SDPA's sum of values
                    state.store[new, :, :, lo : n - span] = 0
                at += other.b
            if state.w.native is None and m and lo < lo_kept:  # slots the kept rows never needed zeroed
                state.store[:m, :, :, lo:lo_kept] = 0
            state.pos = torch.cat([state.pos, *(other.pos for other in others)])
            state.b, state.lo, state.w = m + k, lo, w
            return state
        first = _first_attended(state.bias[rows], n)
        parts = [(state.store[rows, :, :, first:n], state.bias[rows, first:n])] if m else []
        parts += [(o.kv[:, :, :, f : o.n], o.bias[:, f : o.n]) for o, f in joining]
        span = max(bias.shape[1] for _, bias in parts)
        rows_cap = m + k + max(4, (m + k) // 2)
        slots = span + extra + max(64, (span + extra) // 2)
        shape = (rows_cap, *state.store.shape[1:3], slots, state.store.shape[4])
        # The native step never reads a masked slot; SDPA does (0 * NaN would poison its sum), so there the cache
        # starts zeroed and every slot holds a finite value.
        store = state.store.new_empty(shape) if w.native is not None else state.store.new_zeros(shape)
        bias = state.bias_store.new_zeros(rows_cap, slots)
        bias[:, :span] = float("-inf")
        at = 0
        for src_kv, src_bias in parts:
            r, length = src_bias.shape
            store[at : at + r, :, :, span - length : span] = src_kv
            bias[at : at + r, span - length : span] = src_bias
            at += r
        pos = torch.cat([state.pos[rows], *(other.pos for other in others)])
        return KVState(
            w=w, store=store, bias_store=bias, pos=pos, n=span, b=m + k, lo=_first_attended(bias[: m + k], span)
        )

    def _window_mask(self, mask: torch.Tensor, start: int, end: int, window: int, lo: int) -> torch.Tensor:
        q_slot = torch.arange(start, end, device=mask.device)[:, None]
        k_slot = torch.arange(lo, end, device=mask.device)[None, :]
        outside = k_slot <= q_slot - window  # HF's sliding_window_overlay keeps kv_idx > q_idx - window
        return mask.masked_fill(outside, float("-inf"))

    def _forward(
        self,
        state: KVState,
        ids: torch.Tensor,
        positions: torch.Tensor,
        start: int,
        mask: torch.Tensor,
        real: torch.Tensor | None = None,
        last: torch.Tensor | None = None,
        lo: int = 0,
    ) -> torch.Tensor:
        """ids, positions: (B, T), written at slots start..start+T-1; mask: (B, 1, T, start+T-lo) additive (0 / -inf)
        over slots lo..start+T-1 (no row attends to a slot before lo).
        real: (N,) indices into the flattened (B*T) tokens that are not padding, and last: (B,) the index into `real`
        of each row's last column: the linears run on those rows only. Returns the next-token logits (B, V) in
        float32."""
        b, t = ids.shape
        end = start + t
        hq, hkv, d = self.n_heads, self.n_kv, self.head_dim
        gqa = {} if hq == hkv or not _SDPA_HAS_GQA else {"enable_gqa": True}
        w, kv = state.w, state.kv
        cos, sin = w.rope[positions][:, None].unbind(-2)  # (B, 1, T, D) each
        masks = {None: mask}
        flat = ids.reshape(-1) if real is None else ids.reshape(-1)[real]
        x = F.embedding(flat, w.embed)  # (B*T or N, hidden), 2-D for the linears
        for i, layer in enumerate(w.layers):
            if layer.window not in masks:
                masks[layer.window] = self._window_mask(mask, start, end, layer.window, lo)
            # One fused op: in fp32 bit-identical to HF's LlamaRMSNorm; in bf16 it rounds once where HF rounds before
            # and after the weight (8 ops; measured no further from the fp32 model in tests/test_engine.py)
            h = F.rms_norm(x, layer.ln1.shape, layer.ln1, self.eps)
            qkv = layer.qkv(h)  # (B*T or N, (Hq + 2*Hkv) * D)
            if real is not None:  # back to the padded layout (padding rows are zeros; no real query attends to them)
                qkv = qkv.new_zeros(b * t, qkv.shape[1]).index_copy_(0, real, qkv)
            qkv = qkv.view(b, t, hq + 2 * hkv, d).transpose(1, 2)  # (B, H, T, D)
            if layer.q_norm is not None:
                qkv = torch.cat(
                    [
                        rms_norm(qkv[:, :hq], layer.q_norm, self.eps),
                        rms_norm(qkv[:, hq : hq + hkv], layer.k_norm, self.eps),
                        qkv[:, hq + hkv :],
                    ],
                    dim=1,
                )
            qk = qkv[:, : hq + hkv]
            # RoPE on q and k at once, in place; HF's rounding order (addcmul rounds once in bf16, which moved our
            # bf16 log-probs further from the fp32 model's in tests/test_engine.py: 0.08-0.13 -> 0.13-0.16)
            torch.add(qk * cos, qk.roll(d // 2, dims=-1) * sin, out=qk)
            cache = kv[:, i]  # (B, 2*Hkv, S, D)
            cache[:, :, start:end] = qkv[:, hq:]  # the k then v heads, in one copy
            keys, values = cache[:, :hkv, lo:end], cache[:, hkv:, lo:end]
            if hq != hkv and not gqa:
                keys = keys.repeat_interleave(hq // hkv, dim=1)
                values = values.repeat_interleave(hq // hkv, dim=1)
            q, layer_mask = qkv[:, :hq], masks[layer.window]
            if t > 1 and i == len(w.layers) - 1:
                # Only the last position's output is read: the last layer attends from it alone and runs its
                # projections and MLP on one row per prompt (its keys and values are all in the cache already).
                q, layer_mask, t = q[:, :, -1:], layer_mask[:, :, -1:], 1
                x = x[last] if last is not None else x.view(b, -1, x.shape[-1])[:, -1]  # (B, hidden)
                real = None
            att = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=layer_mask, scale=self.scaling, **gqa
            )  # (B, Hq, T, D)
            att = att.transpose(1, 2).reshape(b * t, hq * d)
            x = layer.o.add_to(x, att if real is None else att[real])
            h = F.rms_norm(x, layer.ln2.shape, layer.ln2, self.eps)
            gate, up = layer.gate_up(h).split([self.ffn, self.ffn], dim=-1)
            x = layer.down.add_to(x, self.act(gate) * up)
        x = F.rms_norm(x, w.norm.shape, w.norm, self.eps)  # (B, hidden)
        return w.lm_head(x).float()


def _first_attended(bias: torch.Tensor, n: int) -> int:
    """The earliest of slots 0..n-1 that any row of `bias` (B, S) attends to (n when there are no rows)."""
    if bias.shape[0] == 0:
        return n
    return int((bias[:, :n] == 0).int().argmax(-1).min())

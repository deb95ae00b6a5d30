"""The generic path: any Hugging Face causal LM, driven through its own forward and `DynamicCache`.

It has the same interface as `CompactCausalLM` (`start`, `step`, `keep`, `merge`), so the decoding loop does not care
which one runs. It is as fast as HF `generate` (one HF forward per step), and exists so that every architecture works.
`merge` needs a cache whose layers are all plain `DynamicLayer`s (no sliding-window or quantized layers);
`mergeable` says whether a generation's cache is one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class HFState:
    """The state of one generation: HF's cache, the attention mask so far, and each row's next position."""

    cache: Any  # transformers DynamicCache
    mask: torch.Tensor  # (B, S) int64 attention mask over all tokens so far
    pos: torch.Tensor  # (B,) position of the next token


class HFCausalLM:
    """Prefill/decode through `model.forward` with left padding, explicit position ids and a `DynamicCache`."""

    def __init__(self, model: Any):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._has_positions = "position_ids" in params
        self._has_logits_to_keep = "logits_to_keep" in params
        # transformers 5.x names the cache argument `cache` (`past_key_values` is deprecated there), 4.x the latter
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def _run(self, state: HFState, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": state.mask, self._cache_arg: state.cache}
        kwargs["use_cache"] = True
        if self._has_positions:
            kwargs["position_ids"] = positions
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        state.cache = out["cache"] if "cache" in out else out.past_key_values
        return out.logits[:, -1].float()  # (B, V)

    def start(self, ids: torch.Tensor, valid: torch.Tensor, capacity: int) -> tuple[torch.Tensor, HFState]:
        """Prefill left-padded prompts. ids, valid: (B, P). `capacity` is unused: the cache grows."""
        from transformers import DynamicCache

        del capacity
        mask = valid.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF generate computes from the mask
        state = HFState(cache=DynamicCache(config=self.model.config), mask=mask, pos=positions[:, -1] + 1)
        return self._run(state, ids, positions), state

    def step(self, state: HFState, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (B,) and return the next-token logits (B, V)."""
        state.mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], 1)], dim=1)
        out = self._run(state, tokens[:, None], state.pos[:, None])
        state.pos = state.pos + 1
        return out

    def keep(self, state: HFState, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the current batch), in that order."""
        state.cache.batch_select_indices(rows)
        state.mask = state.mask[rows]
        state.pos = state.pos[rows]

    @staticmethod
    def mergeable(state: HFState) -> bool:
        from transformers.cache_utils import DynamicLayer

        layers = getattr(state.cache, "layers", None)
        return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)

    def merge(self, state: HFState, rows: torch.Tensor, others: list[HFState], extra: int) -> HFState:
        """`rows` of `state` then every row of each of `others`, left-padded to a common length (`extra` is unused:
        the cache grows). Columns that no remaining row attends to are dropped."""
        del extra
        if not all(self.mergeable(st) for st in (state, *others)):
            raise RuntimeError("this model's cache cannot be merged (it has non-dynamic layers)")
        parts = []
        for st, keep in [(state, rows), *((other, None) for other in others)]:
            mask = st.mask if keep is None else st.mask[keep]
            first = int(mask.argmax(-1).min())  # the earliest column any of these rows attends to
            parts.append((st, keep, first, mask.shape[1] - first))
        n = max(length for *_, length in parts)

        def pad(t: torch.Tensor, keep: torch.Tensor | None, first: int, length: int) -> torch.Tensor:
            """(B, H, S, D) keys or values -> the kept rows' columns from `first`, left-padded to n."""
            return torch.nn.functional.pad((t if keep is None else t[keep])[..., first:, :], (0, 0, n - length, 0))

        for i, mine in enumerate(state.cache.layers):
            layers = [st.cache.layers[i] for st, *_ in parts]
            mine.keys = torch.cat(
                [pad(la.keys, keep, f, ln) for la, (_, keep, f, ln) in zip(layers, parts, strict=True)]
            )
            mine.values = torch.cat(
                [pad(la.values, keep, f, ln) for la, (_, keep, f, ln) in zip(layers, parts, strict=True)]
            )
        masks = [
            torch.nn.functional.pad((st.mask if keep is None else st.mask[keep])[:, first:], (n - length, 0))
            for st, keep, first, length in parts
        ]
        pos = torch.cat([state.pos[rows], *(other.pos for other in others)])
        return HFState(cache=state.cache, mask=torch.cat(masks), pos=pos)

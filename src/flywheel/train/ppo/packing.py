"""Shared-prompt rows for the K rollouts of one prompt: the prompt runs through the layers once, not K times.

GRPO, RLOO and every `--num-generations K` rollout batch hold K responses to each prompt, K consecutive rows that
repeat the same (left-padded) prompt. `pack_rollouts` lays each group out as one row

    [prompt][response 1][response 2] ... [response K]        (real tokens only, right-padded to the longest group)

with a 4-D attention mask in which a response sees the prompt and its own earlier tokens, and the position ids each
token had in its own row; so every hidden state equals the one the K separate rows give (the reward model's
shared-prompt rows, `flywheel.train.reward.collate_groups`, are built the same way). `Packed.index` maps each
(row, response slot) of the (B, R) layout the roles return to the packed position before that slot, so the roles
gather their (B, R, H) hidden states from the packed forward and nothing downstream changes.

It pays when the prompt is a large share of the row: tokens fall from B (P + R) to B / K (P + K R'), R' the mean
response length, while the eager attention grows from B (P + R)^2 to B / K (P + K R')^2 score entries.
`pack_rollouts` compares both sides' matmul FLOPs and returns None where packing would cost more (long responses,
many samples), where the rows do not come in groups of one prompt, or with K = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flywheel import fastforward
from flywheel.data.batching import shared_prompt_mask


@dataclass
class Packed:
    ids: torch.Tensor  # (G, T) token ids, one row per prompt group
    mask: torch.Tensor  # (G, 1, T, T) bool, True = query may attend to key
    pos: torch.Tensor  # (G, T) position ids (each token's position in its own unpacked row)
    index: torch.Tensor  # (B, R) flat index into G * T: the position whose hidden state precedes response slot r

    def applies(self, module: torch.nn.Module) -> bool:
        """Whether `module`'s forward can run the packed rows (the fast forward with a custom 4-D mask)."""
        return fastforward.unsupported_reason(module, self.mask) is None

    def hidden(self, module: torch.nn.Module) -> torch.Tensor:
        """(B, R, H): `module`'s last hidden states before each response slot, from one forward of the packed rows."""
        h = fastforward.hidden_states(module, self.ids, self.mask, self.pos)  # (G, T, H)
        return h.flatten(0, 1)[self.index]


def matmul_flops(config: Any, tokens: int, score_entries: int) -> float:
    """Forward matmul FLOPs of the layers for `tokens` tokens whose attention has `score_entries` query-key pairs
    per head (the eager attention computes every one of them, masked or not)."""
    h = config.hidden_size
    hq = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or hq
    d = getattr(config, "head_dim", None) or h // hq
    linear = 2 * (h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * config.intermediate_size)
    return config.num_hidden_layers * (tokens * linear + 4 * hq * d * score_entries)


def pack_rollouts(
    seq: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, prompt_len: int, k: int, config: Any
) -> Packed | None:
    """Pack rollout rows (prompts left-padded to `prompt_len`, responses right-padded after it; each group of `k`
    consecutive rows one prompt) into shared-prompt rows, or None when that would not save work (see the module)."""
    b, width = seq.shape
    r = width - prompt_len
    if k < 2 or b % k:
        return None
    ids_l, attn_l, pos_l = seq.tolist(), attn.tolist(), pos.tolist()
    groups: list[tuple[list[int], list[int], list[int]]] = []  # (ids, positions, segment: 0 prompt, j + 1 answer j)
    index: list[list[int]] = []  # per row: positions in its group's packed row
    for g in range(b // k):
        first = g * k
        head = ids_l[first][:prompt_len]
        if any(
            ids_l[i][:prompt_len] != head or attn_l[i][:prompt_len] != attn_l[first][:prompt_len]
            for i in range(first + 1, first + k)
        ):
            return None
        keep = [c for c in range(prompt_len) if attn_l[first][c]]
        ids = [head[c] for c in keep]
        positions = [pos_l[first][c] for c in keep]
        seg = [0] * len(ids)
        p = len(ids)
        for j in range(k):
            row = first + j
            n = sum(attn_l[row][prompt_len:])
            start = len(ids)
            ids += ids_l[row][prompt_len : prompt_len + n]
            positions += pos_l[row][prompt_len : prompt_len + n]
            seg += [j + 1] * n
            # slot 0 is predicted from the prompt's last token, slot s from the answer's token s - 1; padding slots
            # read the prompt's last token (any finite value: the response mask drops them)
            index.append([(p - 1) if s == 0 or s >= n else start + s - 1 for s in range(r)])
        groups.append((ids, positions, seg))
    t = max(len(x[0]) for x in groups)
    g_n = len(groups)
    if matmul_flops(config, g_n * t, g_n * t * t) >= matmul_flops(config, b * width, b * width * width):
        return None

    def padded(col: int, fill: int) -> torch.Tensor:  # (G, T): one column of `groups`, right-padded to T
        return torch.tensor([x[col] + [fill] * (t - len(x[col])) for x in groups], device=seq.device)

    rows_at = (torch.arange(b, device=seq.device) // k * t)[:, None]  # each row's group's first flat position
    index_t = torch.tensor(index, device=seq.device) + rows_at
    return Packed(padded(0, 0), shared_prompt_mask(padded(2, -1)), padded(1, 0), index_t)

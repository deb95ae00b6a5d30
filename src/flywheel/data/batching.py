"""Token-level batches: packing for pretraining, padded SFT batches with loss masks, and the masked LM loss."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

LMSample = dict[str, list[int]]  # {"input_ids": [...], "loss_mask": [...]} (mask 1 = predict this token)


T = TypeVar("T")


def split_heldout(items: Sequence[T], frac: float, seed: int) -> tuple[list[T], list[T]]:
    """(train, held out): a seeded `frac` of `items` held out (at least one), both lists in the items' order.

    Nothing is held out when frac <= 0 or there are fewer than two items. Pretraining, SFT, the reward model and DPO
    all split with this, so the same (items, frac, seed) always gives the same held-out set.
    """
    if frac <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, int(len(items) * frac))])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def pack(docs: Iterable[list[int]], seq_len: int, sep_id: int) -> list[LMSample]:
    """Concatenate documents (each followed by `sep_id`) and cut the stream into blocks of `seq_len` tokens.

    The tail that does not fill a block is dropped. Attention crosses document boundaries (standard packing); the
    separator teaches the model where documents end.
    """
    blocks: list[LMSample] = []
    buf: list[int] = []
    for ids in docs:
        buf.extend(ids)
        buf.append(sep_id)
        while len(buf) >= seq_len:
            blocks.append({"input_ids": buf[:seq_len], "loss_mask": [1] * seq_len})
            buf = buf[seq_len:]
    return blocks


def pack_masked(samples: Iterable[LMSample], seq_len: int) -> list[LMSample]:
    """Pack (ids, mask) samples into blocks of at most `seq_len` without splitting a sample (first-fit in order)."""
    blocks: list[LMSample] = []
    cur: LMSample = {"input_ids": [], "loss_mask": []}
    for s in samples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(s["input_ids"]) > seq_len:
            blocks.append(cur)
            cur = {"input_ids": [], "loss_mask": []}
        cur["input_ids"] = cur["input_ids"] + s["input_ids"][:seq_len]
        cur["loss_mask"] = cur["loss_mask"] + s["loss_mask"][:seq_len]
    if cur["input_ids"]:
        blocks.append(cur)
    return blocks


def collate_lm(samples: list[LMSample], pad_id: int) -> dict[str, Any]:
    """Right-pad to the longest sample. `weight` = number of predicted tokens (mask on targets, after the shift)."""
    length = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(samples), length), dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.bool)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n] = torch.tensor(s["input_ids"])
        attn[row, :n] = 1
        mask[row, :n] = torch.tensor(s["loss_mask"], dtype=torch.bool)
    target_mask = mask[:, 1:]  # (B, T-1): token t+1 is predicted from positions <= t
    return {
        "input_ids": ids,  # (B, T)
        "attention_mask": attn,  # (B, T)
        "target_mask": target_mask,  # (B, T-1)
        "weight": int(target_mask.sum()),
        "tokens": int(attn.sum()),
    }


def shared_prompt_mask(segments: torch.Tensor) -> torch.Tensor:
    """(R, T) segment ids of rows `[prompt][answer 1]..[answer K]` (0 = prompt, k + 1 = answer k, -1 = padding) ->
    (R, 1, T, T) bool attention mask, True = the query may attend to the key: a key not after the query, in the prompt
    or in the query's own answer; padding sees itself only (no query row is empty)."""
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & ((segments[:, None, :] == 0) | (segments[:, :, None] == segments[:, None, :]))
    allowed &= (segments >= 0)[:, None, :] | torch.eye(t, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The batch with every tensor on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _has_plain_head(model: torch.nn.Module) -> bool:
    """True when logits = lm_head(last hidden state), so we may project only the positions we need."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    base = getattr(model, "base_model", model)
    return base is not model and model.get_output_embeddings() is not None


def masked_token_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_mask: torch.Tensor
) -> torch.Tensor:
    """Logits (N, V) predicting the N masked targets. Projects only those positions through the LM head: on SFT data
    most positions are prompt tokens, and the vocabulary projection is the largest matmul of a small model."""
    if _has_plain_head(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return model.get_output_embeddings()(hidden[:, :-1][target_mask])  # (N, V)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    return logits[:, :-1][target_mask]


def lm_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed next-token cross-entropy over the masked targets (the loop divides by the step's `weight`)."""
    logits = masked_token_logits(model, batch["input_ids"], batch["attention_mask"], batch["target_mask"])
    targets = batch["input_ids"][:, 1:][batch["target_mask"]]  # (N,)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), {}


@torch.no_grad()
def eval_lm_loss(
    model: torch.nn.Module,
    samples: list[LMSample],
    pad_id: int,
    batch_size: int = 16,
    *,
    device: torch.device | str | None = None,
) -> float:
    """Mean per-token loss over `samples` (held-out loss, the alignment-tax comparison). Batches are built on the CPU
    and moved to `device` (default: where the model's weights are)."""
    device = next(model.parameters()).device if device is None else device
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = collate_lm(samples[i : i + batch_size], pad_id)
        if batch["weight"] == 0:
            continue
        loss, _ = lm_loss(model, to_device(batch, device))
        total += float(loss)
        count += batch["weight"]
    return total / max(count, 1)

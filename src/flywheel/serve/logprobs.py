"""Log-probs in OpenAI's shape: each generated token's text, UTF-8 bytes and log-prob, and the most likely
alternatives at its position (`top_logprobs`).

    pieces = TokenPieces(tokenizer)
    pieces.entry(token_id, logprob, top=[(id, logprob), ...])
    -> {"token": " Paris", "logprob": -0.31, "bytes": [32, 80, ...], "top_logprobs": [{"token", "logprob", "bytes"}]}

The log-prob of a sampled token is the engine's: log softmax(logits / T) of that token (before top-p; for T = 0,
log softmax(logits)), the distribution it was drawn from. The engine reports only that one value per token, so the
alternatives come from the model's own Hugging Face forward, under the same temperature, only for requests that ask
for `top_logprobs`: along the row as it is generated for streamed answers (`TopLogprobs`, one cached forward per
token), in one forward over the finished answer otherwise (`top_logprobs_after`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from flywheel.engine.hf_forward import HFCausalLM
from flywheel.engine.sampling import scale

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet (each byte is drawn as one printable character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_decoder()


class TokenPieces:
    """Text and bytes of single tokens (cached). Byte-level BPE tokens give their exact bytes, also when a token
    holds part of a character (its text is then `bytes:\\xe6\\x97`, as OpenAI writes it); other tokenizers give the
    UTF-8 of the token decoded alone. The bytes are what the token adds to the answer's text, so that a choice's
    entries add up to its `content`: a special token (left out of the text) has its name as text and bytes None
    (OpenAI's "no bytes representation"), and NUL bytes (removed from the text) are left out."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self._cache: dict[int, tuple[str, list[int] | None]] = {}

    def piece(self, token_id: int) -> tuple[str, list[int] | None]:
        """(text, UTF-8 bytes) of one token; bytes None for a special token."""
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self.special:
            piece: tuple[str, list[int] | None] = (str(self.tokenizer.convert_ids_to_tokens(token_id)), None)
        else:
            raw = self._bytes(token_id).replace(b"\x00", b"")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            piece = (text, list(raw))
        self._cache[token_id] = piece
        return piece

    def _bytes(self, token_id: int) -> bytes:
        if self.byte_level:
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(token, str) and all(ch in _BYTES for ch in token):
                return bytes(_BYTES[ch] for ch in token)
        return self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False).encode("utf-8")

    def entry(self, token_id: int, logprob: float, top: list[tuple[int, float]] | None = None) -> dict[str, Any]:
        text, raw = self.piece(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": self.alternatives(top or [])}

    def alternatives(self, top: list[tuple[int, float]]) -> list[dict[str, Any]]:
        out = []
        for token_id, logprob in top:
            text, raw = self.piece(token_id)
            out.append({"token": text, "logprob": logprob, "bytes": raw})
        return out


def scaled_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in float32 (T = 0: log softmax(logits)): the distribution a token is drawn from."""
    logits = logits.float()
    return torch.log_softmax(scale(logits, temperature) if temperature > 0 else logits, dim=-1)


class TopLogprobs:
    """The k most likely next tokens along one generated row: `top()` at the current position, `push(token)` to
    move on. Runs the model's Hugging Face forward with its own KV cache (the engine keeps only the sampled
    token's log-prob)."""

    def __init__(self, model: Any, prompt: list[int], *, k: int, temperature: float):
        self.k = k
        self.temperature = temperature
        self.forward = HFCausalLM(model)
        device = next(model.parameters()).device
        ids = torch.tensor([prompt], dtype=torch.long, device=device)
        with torch.inference_mode():
            self.logits, self.state = self.forward.start(ids, torch.ones_like(ids, dtype=torch.bool), ids.shape[1])

    def top(self) -> list[tuple[int, float]]:
        logp = scaled_logprobs(self.logits[0], self.temperature)
        values, ids = torch.topk(logp, min(self.k, logp.shape[-1]))
        return list(zip(ids.tolist(), values.tolist(), strict=True))

    def push(self, token: int) -> None:
        device = self.logits.device
        with torch.inference_mode():
            self.logits = self.forward.step(self.state, torch.tensor([token], dtype=torch.long, device=device))


def top_logprobs_after(
    model: Any, prompt: list[int], tokens: list[int], *, k: int, temperature: float
) -> list[list[tuple[int, float]]]:
    """The k most likely tokens at each position of `tokens`, generated after `prompt`: one forward over both."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + tokens[:-1]], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = len(tokens)  # no logits over the prompt
    with torch.inference_mode():
        logits = model(**kwargs).logits[0, -len(tokens) :]  # (len(tokens), V): the positions that predicted them
        logp = scaled_logprobs(logits, temperature)
        values, top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(top.tolist(), values.tolist(), strict=True)]

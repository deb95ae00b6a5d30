"""Turning a growing list of token ids into text pieces, one token at a time.

A byte-level BPE token can hold part of a UTF-8 character (an emoji is often 2-4 tokens), and SentencePiece-style
tokenizers decode a token differently depending on what precedes it (the leading-space marker). So a token is never
decoded alone: each step decodes a short window of recent ids with and without the new ones and emits the difference,
holding it back while it ends in an incomplete character (U+FFFD). This is the algorithm of vLLM and TGI.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class Detokenizer:
    """`push(id) -> str` returns the text that the new id completes ("" while a character is incomplete).

    The concatenation of all pieces and `flush()` equals `decode(ids)` (the tokenizer's decode without the clean-up
    of spaces) for byte-level BPE tokenizers.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this index have been emitted

    def decode(self, ids: list[int]) -> str:
        # No clean-up of spaces before punctuation: it is not prefix-stable ("a ." -> "a." only once "." arrives).
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self.decode(self.ids[self._prefix : self._read])
        text = self.decode(self.ids[self._prefix :])
        if len(text) <= len(before) or (text.endswith(REPLACEMENT) and not final):
            if not final:
                return ""
            self._prefix = self._read = len(self.ids)
            return text[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(before) :]

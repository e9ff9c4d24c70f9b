"""The bytes each token id stands for, as its tokenizer writes them (logprob entries' `bytes`).

A token may hold part of a UTF-8 character: decoding it alone gives U+FFFD, whose UTF-8 (EF BF BD)
is not what the token holds. Clients rebuild text by concatenating the `bytes` of the tokens, so
each token's own bytes are read from the vocabulary instead:
- byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2; the tokenizer's decoder is `ByteLevel`): the piece
  from `convert_ids_to_tokens` maps back through the inverse of GPT-2's `bytes_to_unicode` table;
- SentencePiece with byte fallback (Llama-2, Mistral): a `<0xNN>` piece is that byte, and `▁` is a
  space;
- added and special tokens (`<|im_end|>`): their content's UTF-8;
- anything else: the token decoded alone, as UTF-8 (the only bytes it can be known by).
Nothing here knows about HTTP or models.
"""

from __future__ import annotations

import json
import re

__all__ = ["TokenBytes", "byte_decoder"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_decoder() -> dict[str, int]:
    """GPT-2's `bytes_to_unicode` table inverted: printable stand-in character -> byte value (the table
    every byte-level BPE tokenizer uses; transformers keeps it in convert_slow_tokenizer)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _decoder_kind(tokenizer) -> str:
    """'byte_level', 'byte_fallback' or 'plain', from a fast tokenizer's serialized decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "plain"
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return "plain"
    types = {d.get("type") for d in decoder.get("decoders", [])} | {decoder.get("type")}
    if "ByteLevel" in types:
        return "byte_level"
    if "ByteFallback" in types:
        return "byte_fallback"
    return "plain"


class TokenBytes:
    """token id -> the bytes it stands for (cached per id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.kind = _decoder_kind(tokenizer)
        self._bytes_of = byte_decoder() if self.kind == "byte_level" else {}
        self._added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        out = self._cache.get(token_id)
        if out is None:
            out = self._cache[token_id] = self._compute(token_id)
        return out

    def _compute(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if self.kind == "byte_level" and all(c in self._bytes_of for c in piece):
                return bytes(self._bytes_of[c] for c in piece)
            if self.kind == "byte_fallback":
                if m := _BYTE_PIECE.match(piece):
                    return bytes([int(m.group(1), 16)])
                return piece.replace("▁", " ").encode("utf-8")
        return self.tokenizer.decode([token_id]).encode("utf-8")

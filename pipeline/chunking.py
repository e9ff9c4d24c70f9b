"""Hierarchical chunking of a document by the target model's tokenizer.

Small chunks (at most `small_tokens` target tokens) are the unit of detail questions; sections
(medium chunks) are runs of `smalls_per_medium` consecutive small chunks. Both tile the document
exactly, in tokens and in characters, so any span a QA points at maps back to the source text and
to the token budget Algorithm 2 packs against.

Token counts come from the target tokenizer (not the generator's) because the samples are trained
at the target's context lengths; a chunk that is "4K tokens" must be 4K of *those* tokens.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from operator import itemgetter

from .records import Chunk, Section

__all__ = ["chunk_document"]

_CLOSERS = "\"'\u2019\u201d\u00bb)\\]\u300d\u300f"
# Each alternative captures the whitespace run in which a cut counts as a sentence end. A run is
# matched once and finditer resumes after it, so the scan stays linear even on huge whitespace runs.
_SENTENCE_RE = re.compile(
    rf"[.!?;:\u2026][{_CLOSERS}]*(\s+)"                      # ASCII sentence punctuation, then whitespace
    rf"|[\u3002\uff01\uff1f\uff1b\uff1a][{_CLOSERS}]*(\s*)"  # CJK full stops need no whitespace
    r"|\n(\s*)"                                              # a line break ends a sentence (verse, lists)
)
# The rest of a whitespace run once it has held a blank line.
_PARAGRAPH_RE = re.compile(r"\n[^\S\n]*\n(\s*)")

# A UTF-8 character spans at most 4 bytes, so a byte-level BPE can split it over at most 4 tokens:
# stepping back 3 cut points always reaches a point between whole characters.
_MAX_CHAR_SPLIT = 3
_START = itemgetter(0)


def chunk_document(
    doc_id: str,
    text: str,
    tokenizer,
    small_tokens: int,
    smalls_per_medium: int,
    boundary_window: float,
) -> tuple[list[Chunk], list[Section], int]:
    """Split `text` into small chunks and sections by `tokenizer` (a Hugging Face fast tokenizer).

    Each small chunk ends at the last paragraph end (blank line) within the final
    `boundary_window * small_tokens` tokens of its `small_tokens` window, else at the last sentence
    end there, else exactly at `small_tokens` (moved back at most 3 tokens if that would split one
    character's bytes between two chunks). Returns (chunks, sections, n_tokens); empty text (or text
    the tokenizer maps to no tokens) gives ([], [], 0).
    """
    if small_tokens < 1:
        raise ValueError(f"small_tokens must be >= 1, got {small_tokens}")
    if smalls_per_medium < 1:
        raise ValueError(f"smalls_per_medium must be >= 1, got {smalls_per_medium}")
    if not 0.0 <= boundary_window < 1.0:
        raise ValueError(f"boundary_window must be in [0, 1), got {boundary_window}")
    if not text:
        return [], [], 0

    # verbose=False: whole documents routinely exceed model_max_length; the warning is noise here.
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False, verbose=False)
    offsets = enc["offset_mapping"]
    n = len(offsets)
    if n == 0:
        return [], [], 0

    cuts = _token_cuts(text, offsets, small_tokens, boundary_window)
    chars = _cut_chars(offsets, cuts, len(text))

    chunks: list[Chunk] = []
    for i in range(len(cuts) - 1):
        cs, ce = chars[i], chars[i + 1]
        chunks.append(Chunk(
            chunk_id=f"{doc_id}:s{i:05d}", doc_id=doc_id, index=i, section_index=i // smalls_per_medium,
            token_start=cuts[i], token_end=cuts[i + 1], char_start=cs, char_end=ce, text=text[cs:ce],
        ))

    sections: list[Section] = []
    for j, first in enumerate(range(0, len(chunks), smalls_per_medium)):
        last = min(first + smalls_per_medium, len(chunks))
        sections.append(Section(
            section_id=f"{doc_id}:m{j:04d}", doc_id=doc_id, index=j, chunk_start=first, chunk_end=last,
            token_start=chunks[first].token_start, token_end=chunks[last - 1].token_end,
            char_start=chunks[first].char_start, char_end=chunks[last - 1].char_end,
        ))
    return chunks, sections, n


def _cut_chars(offsets, cuts: list[int], text_len: int) -> list[int]:
    """Character position of each token cut.

    A cut before token k sits at that token's start: whitespace or text the tokenizer skipped
    (stripped spaces, combining marks NFC merged away) falls to the chunk before. Positions are
    forced monotonic, as odd offsets (byte-level pieces of one character overlap; normalizers can
    reorder) must never break tiling, and the ends are pinned to 0 and len(text) so nothing before
    the first or after the last token is lost.
    """
    chars = [0]
    for k in cuts[1:-1]:
        chars.append(min(max(offsets[k][0], chars[-1]), text_len))
    chars.append(text_len)
    return chars


def _clean(offsets, k: int) -> bool:
    """True when a cut before token k does not split one character's bytes between two tokens."""
    return offsets[k][0] >= offsets[k - 1][1]


def _spans(pattern: re.Pattern, text: str) -> tuple[list[int], list[int]]:
    """Starts and ends (inclusive) of the character ranges where a cut counts; sorted and disjoint."""
    spans = [m.span(m.lastindex) for m in pattern.finditer(text)]
    return [a for a, _ in spans], [b for _, b in spans]


def _last_cut(spans: tuple[list[int], list[int]], offsets, lo: int, hi: int) -> int | None:
    """The largest clean cut point k in [lo, hi] whose character position lies in one of `spans`."""
    starts, ends = spans
    c_lo, c_hi = offsets[lo][0], offsets[hi][0]
    i = bisect_right(starts, c_hi) - 1
    while i >= 0 and ends[i] >= c_lo:
        a, b = max(starts[i], c_lo), min(ends[i], c_hi)
        k = bisect_right(offsets, b, lo, hi + 1, key=_START) - 1
        while k >= lo and a <= offsets[k][0] <= b:
            if _clean(offsets, k):
                return k
            k -= 1
        i -= 1
    return None


def _token_cuts(text: str, offsets, small_tokens: int, boundary_window: float) -> list[int]:
    """Token indices 0 = t0 < t1 < ... < tm = n of the small-chunk cuts."""
    n = len(offsets)
    if n <= small_tokens:
        return [0, n]
    # Boundaries are found in character space once; only the few inside each chunk's window are
    # ever mapped to tokens (by bisecting the token starts), which keeps chunking close to the
    # cost of tokenizing alone.
    paragraph = _spans(_PARAGRAPH_RE, text)
    sentence = _spans(_SENTENCE_RE, text)
    window = int(boundary_window * small_tokens)
    cuts = [0]
    start = 0
    while start + small_tokens < n:
        limit = start + small_tokens
        lo = max(start + 1, limit - window)
        cut = _last_cut(paragraph, offsets, lo, limit)
        if cut is None:
            cut = _last_cut(sentence, offsets, lo, limit)
        if cut is None:
            cut = limit
            for k in range(limit, max(start, limit - _MAX_CHAR_SPLIT - 1), -1):
                if _clean(offsets, k):
                    cut = k
                    break
        cuts.append(cut)
        start = cut
    cuts.append(n)
    return cuts

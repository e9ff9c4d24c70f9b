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
from bisect import bisect_left, bisect_right
from itertools import accumulate
from operator import itemgetter

from .records import Chunk, Section

__all__ = ["chunk_document"]

_CLOSERS = "\"'\u2019\u201d\u00bb)\\]\u300d\u300f"
# One pass over the text finds every place a cut may land. Each alternative captures the
# whitespace run in which a cut counts as a sentence end; the run is matched once and finditer
# resumes after it, so the scan stays linear even on pathological whitespace.
_BOUNDARY_RE = re.compile(
    rf"[.!?;:\u2026][{_CLOSERS}]*(\s+)"           # ASCII sentence punctuation, then whitespace
    rf"|[\u3002\uff01\uff1f\uff1b\uff1a][{_CLOSERS}]*(\s*)"  # CJK full stops need no whitespace
    r"|\n(\s*)"                                    # any line break ends a sentence (verse, lists)
)
_BLANK_LINE_RE = re.compile(r"\n[^\S\n]*\n")

# A UTF-8 character spans at most 4 bytes, so a byte-level BPE can split it over at most 4 tokens:
# stepping back 3 cut points always reaches a point between whole characters.
_MAX_CHAR_SPLIT = 3


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

    chars = _cut_chars(offsets, len(text))
    token_cuts = _token_cuts(text, offsets, chars, small_tokens, boundary_window)

    chunks: list[Chunk] = []
    for i in range(len(token_cuts) - 1):
        a, b = token_cuts[i], token_cuts[i + 1]
        cs, ce = chars[a], chars[b]
        chunks.append(Chunk(
            chunk_id=f"{doc_id}:s{i:05d}", doc_id=doc_id, index=i, section_index=i // smalls_per_medium,
            token_start=a, token_end=b, char_start=cs, char_end=ce, text=text[cs:ce],
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


def _cut_chars(offsets, text_len: int) -> list[int]:
    """Character position of a cut before each token index 0..n (so `n + 1` entries).

    A cut before token k sits at the token's start, made monotonic with a running max: byte-level
    BPE gives the pieces of one multi-byte character overlapping offsets, and gaps the tokenizer
    leaves (stripped whitespace) fall to the chunk before. The ends are pinned to 0 and len(text)
    so nothing before the first or after the last token is lost.
    """
    chars = list(accumulate(map(itemgetter(0), offsets), max))
    chars[0] = 0
    chars.append(text_len)
    if chars[-2] > text_len:  # defensive: never seen, but tiling must hold for any tokenizer
        chars = [min(c, text_len) for c in chars]
    return chars


def _clean(offsets, k: int) -> bool:
    """True when a cut before token k does not split one character's bytes between two tokens."""
    return offsets[k][0] >= offsets[k - 1][1]


def _boundary_tokens(text: str, offsets, chars: list[int]) -> tuple[list[int], list[int]]:
    """Sorted token indices where a cut is a paragraph end, and where it is at least a sentence end."""
    n = len(offsets)
    paragraph: list[int] = []
    sentence: list[int] = []

    def add(out: list[int], lo: int, hi: int) -> None:
        # Cut points whose character position lies in [lo, hi]; the runs are disjoint and in text
        # order and `chars` is monotonic, so `out` comes out sorted without a sort.
        for k in range(bisect_left(chars, lo, 1, n), bisect_right(chars, hi, 1, n)):
            if _clean(offsets, k):
                out.append(k)

    for m in _BOUNDARY_RE.finditer(text):
        g = m.lastindex
        lo, hi = m.span(g)
        add(sentence, lo, hi)
        blank = _BLANK_LINE_RE.search(text, m.start(), hi)
        if blank is not None:
            add(paragraph, blank.end(), hi)
    return paragraph, sentence


def _last_in(points: list[int], lo: int, hi: int) -> int | None:
    i = bisect_right(points, hi) - 1
    if i >= 0 and points[i] >= lo:
        return points[i]
    return None


def _token_cuts(text: str, offsets, chars: list[int], small_tokens: int, boundary_window: float) -> list[int]:
    """Token indices 0 = t0 < t1 < ... < tm = n of the small-chunk cuts."""
    n = len(offsets)
    if n <= small_tokens:
        return [0, n]
    paragraph, sentence = _boundary_tokens(text, offsets, chars)
    window = int(boundary_window * small_tokens)
    cuts = [0]
    start = 0
    while start + small_tokens < n:
        limit = start + small_tokens
        lo = max(start + 1, limit - window)
        cut = _last_in(paragraph, lo, limit)
        if cut is None:
            cut = _last_in(sentence, lo, limit)
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

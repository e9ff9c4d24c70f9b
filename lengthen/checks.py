"""Content checks of the Self-Lengthen loop: word counts, truncation, repetition, short-outlier dropping.

Kept in one small module behind `check_text(text, cfg) -> reason` so that a shared content-check
module can replace it without touching the loop. Nothing here generates or reads files.

Word count (Self-Lengthen's `count_words`, and LonGen's): every CJK character counts as one word,
everything else is split on whitespace. Truncation: a finished text ends with sentence-final or
closing punctuation (the published `check_response` requires the same of the last character).
Repetition: any word n-gram (n = 13 in the published check) that occurs twice rejects the text.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Sequence

# CJK ideographs, CJK punctuation and full-width forms: one word each.
_CJK = re.compile(r"[\u4e00-\u9fff\u3000-\u303f\uff00-\uffef]")
# Characters a finished text may end with: sentence ends, closing quotes/brackets, code fences.
END_CHARS = frozenset(".!?。！？…\"'”’)]}）】>`*")
_WORD = re.compile(r"\w+", re.UNICODE)


def count_words(text: str) -> int:
    """Words of `text`: CJK characters one each, plus the whitespace-separated tokens of the rest."""
    cjk = len(_CJK.findall(text))
    return cjk + len(_CJK.sub(" ", text).split())


def is_truncated(text: str) -> bool:
    """True when the text does not end with sentence-final or closing punctuation (or is blank)."""
    stripped = text.rstrip()
    return not stripped or stripped[-1] not in END_CHARS


def repeated_ngram(text: str, n: int) -> str | None:
    """The first word n-gram (lower-cased, punctuation ignored) that occurs twice, or None; n = 0 disables."""
    if n <= 0:
        return None
    words = [w.lower() for w in _WORD.findall(_CJK.sub(lambda m: f" {m.group(0)} ", text))]
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            return " ".join(gram)
        seen.add(gram)
    return None


def check_text(text: str, repeat_ngram: int = 13, require_end_punctuation: bool = True,
               min_words: int = 0, max_words: int = 0) -> str:
    """"" when `text` passes, else the reason: empty, truncated, repetitive, too_short, too_long.

    `min_words`/`max_words` of 0 mean no bound.
    """
    if not text.strip():
        return "empty"
    if require_end_punctuation and is_truncated(text):
        return "truncated"
    if repeated_ngram(text, repeat_ngram) is not None:
        return "repetitive"
    words = count_words(text)
    if min_words and words < min_words:
        return "too_short"
    if max_words and words > max_words:
        return "too_long"
    return ""


def drop_short(lengths: Sequence[int], seed: int | str) -> list[int]:
    """Indices kept by Self-Lengthen's `drop_short`: the shorter an item ranks, the likelier it is dropped.

    rank = 1 - (position of its length among the sorted lengths) / n, so the shortest has rank 1 and the
    longest 1/n; an item is kept when u > 2 * rank^3 (u uniform in [0, 1), seeded). Items with rank above
    2^(-1/3) ≈ 0.79, the shortest ~21%, are always dropped; the longest are almost always kept.
    """
    n = len(lengths)
    if n == 0:
        return []
    ordered = sorted(lengths)
    first = {}
    for pos, value in enumerate(ordered):
        first.setdefault(value, pos)  # ties share the rank of their first position, as list.index does
    rng = random.Random(f"drop_short:{seed}")
    return [i for i, value in enumerate(lengths) if rng.random() > 2 * (1 - first[value] / n) ** 3]


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs (blank-line separated); one-paragraph texts fall back to lines, then to sentences."""
    parts = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(parts) <= 2:
        lines = [p.strip() for p in text.split("\n") if p.strip()]
        if len(lines) > len(parts):
            parts = lines
    if len(parts) <= 1:
        sentences = [s.strip() for s in re.split(r"(?<=[.!?。！？])\s+", text) if s.strip()]
        if len(sentences) > len(parts):
            parts = sentences
    return parts


def length_stats(words: list[int]) -> dict:
    """Word-count distribution: n, mean, median, p10, p90, min, max (nearest-rank percentiles)."""
    if not words:
        return {"n": 0}
    s = sorted(words)

    def pct(p: float) -> int:
        return s[min(len(s) - 1, max(0, math.ceil(p * len(s)) - 1))]

    return {"n": len(s), "mean": round(statistics.fmean(s), 1), "median": statistics.median(s), "p10": pct(0.1),
            "p90": pct(0.9), "min": s[0], "max": s[-1]}

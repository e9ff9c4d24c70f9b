"""Grounding: is a QA's verbatim evidence quote really in its evidence, and does that evidence support the answer?

Quote grounding. Generators paraphrase, re-case, swap quote styles and reflow whitespace even when
told to quote verbatim, so both sides are normalized first; an exact normalized substring is grounded
outright, and otherwise a fuzzy partial match (one slip of a word) may still ground it. Anything
weaker is treated as invented evidence. A quote is looked for in the DOCUMENT first (the evidence
chunks, or the whole text for questions written from summaries); one found only in a generated
summary is grounded on a summary (basis "summary"), which proves less and is reported apart.

Answer support. A quote proves only that the quote exists: a correct quote with a wrong answer passes
it. `lexical_support` is the floor of an answer check: the share of the answer's content words
(stop words and short words out) that occur in the evidence the student can read. The optional judge
pass (judge.py) asks the generator itself.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from rapidfuzz import fuzz

__all__ = ["GroundingStats", "ground_quote", "normalize", "REASONS", "content_words", "lexical_support"]

# summary_*: found only in a generated summary; multi_chunk / single_chunk: quotes of a question over several
# passages found in at least / fewer than grounding.min_evidence_chunks of them
REASONS = ("exact", "fuzzy", "empty_quote", "quote_too_short", "not_found", "summary_exact", "summary_fuzzy",
           "multi_chunk", "single_chunk")
BASES = ("document", "summary", "none")

# NFKC already folds fullwidth and compatibility forms; these are the typographic variants it keeps.
_CHAR_MAP = str.maketrans({
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u2032\u2035\u0060\u00b4", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f\u2033\u2036\u00ab\u00bb\u300c\u300d\u300e\u300f", '"'),
    **dict.fromkeys("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63", "-"),
})
# Punctuation survives only with a word character on both sides ("don't", "well-known", "3.14"):
# there it is part of the word; anywhere else it is typography the generator may not reproduce.
_LOOSE_PUNCT_RE = re.compile(r"(?<!\w)[^\w\s]+|[^\w\s]+(?!\w)")
_SPACE_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, lowercase, unified quotes and dashes, punctuation dropped except inside words, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_CHAR_MAP)
    text = _LOOSE_PUNCT_RE.sub(" ", text)
    return _SPACE_RE.sub(" ", text).strip()


# The same chunk backs many questions, and evidence texts run to tens of thousands of characters.
_normalize_evidence = lru_cache(maxsize=256)(normalize)


def ground_quote(
    quote: str, evidence_texts: list[str], min_score: float, min_quote_chars: int
) -> tuple[bool, float, str]:
    """(grounded, score 0-100, reason); reason is one of REASONS.

    The fuzzy score is rapidfuzz's partial_ratio of the normalized quote against each normalized
    evidence text (best one kept). It is computed with `score_cutoff=min_score` for speed, so an
    ungrounded quote reports 0.0 rather than its exact sub-threshold score.
    """
    q = normalize(quote or "")
    if not q:
        return False, 0.0, "empty_quote"
    if len(q) < min_quote_chars:
        return False, 0.0, "quote_too_short"
    evidence = [_normalize_evidence(t) for t in evidence_texts if t]
    if any(q in e for e in evidence):
        return True, 100.0, "exact"
    best = 0.0
    for e in evidence:
        # Raising the cutoff to the best so far lets rapidfuzz abandon weaker texts early.
        score = fuzz.partial_ratio(q, e, score_cutoff=max(min_score, best))
        if score > best:
            best = score
    if best >= min_score and best > 0:
        return True, float(best), "fuzzy"
    return False, float(best), "not_found"


@lru_cache(maxsize=1)
def _stop_words() -> frozenset[str]:
    from stop_words import get_stop_words

    return frozenset(w for w in get_stop_words("en"))


_WORD_RE = re.compile(r"[^\W_]+")  # apostrophes split words alike on both sides (hamlet's -> hamlet)


def content_words(text: str) -> list[str]:
    """Lowercased words of 3+ characters that are not English stop words, in order (repeats kept)."""
    stop = _stop_words()
    words = _WORD_RE.findall(unicodedata.normalize("NFKC", text).lower().translate(_CHAR_MAP))
    return [w for w in words if len(w) > 2 and w not in stop]


@lru_cache(maxsize=256)
def _vocabulary(text: str) -> frozenset[str]:
    return frozenset(_WORD_RE.findall(unicodedata.normalize("NFKC", text).lower().translate(_CHAR_MAP)))


def lexical_support(answer: str, evidence_texts: list[str]) -> float:
    """Share (0-1) of the answer's content words that occur in any evidence text; 0.0 for an answer with none."""
    words = content_words(answer)
    if not words:
        return 0.0
    vocab = frozenset().union(*(_vocabulary(t) for t in evidence_texts if t)) if evidence_texts else frozenset()
    return sum(w in vocab for w in words) / len(words)


def quote_chunks(quote: str, chunk_texts: list[str], min_score: float, min_quote_chars: int) -> set[int]:
    """Indices of the chunk texts in which the quote is grounded (each checked on its own)."""
    return {i for i, text in enumerate(chunk_texts) if ground_quote(quote, [text], min_score, min_quote_chars)[0]}


def _rates(total: Counter, grounded: Counter) -> dict[str, dict]:
    return {k: _entry(total[k], grounded[k]) for k in sorted(total)}


def _entry(total: int, grounded: int) -> dict:
    return {"total": total, "grounded": grounded, "rate": grounded / total if total else 0.0}


@dataclass
class GroundingStats:
    """Grounding outcomes counted overall, per question type, per document and per reason.

    `grounded` is the quote check. Per type it also counts, when given: the basis of the quote
    (document or summary), answers supported by their evidence (lexical support), and judge verdicts.
    """

    total: int = 0
    grounded: int = 0
    type_total: Counter = field(default_factory=Counter)
    type_grounded: Counter = field(default_factory=Counter)
    doc_total: Counter = field(default_factory=Counter)
    doc_grounded: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    type_extra: Counter = field(default_factory=Counter)   # (qtype, what) -> count
    support_sum: Counter = field(default_factory=Counter)  # qtype -> summed support score

    def add(self, doc_id: str, qtype: str, grounded: bool, reason: str, *, basis: str | None = None,
            support: float | None = None, supported: bool | None = None, judged: bool | None = None) -> None:
        self.total += 1
        self.type_total[qtype] += 1
        self.doc_total[doc_id] += 1
        self.reasons[reason] += 1
        if grounded:
            self.grounded += 1
            self.type_grounded[qtype] += 1
            self.doc_grounded[doc_id] += 1
        if basis is not None:
            self.type_extra[(qtype, f"{basis}_based")] += 1
        if support is not None:
            self.support_sum[qtype] += support
            self.type_extra[(qtype, "support_scored")] += 1
        if supported is not None:
            self.type_extra[(qtype, "answer_supported")] += bool(supported)
        if judged is not None:
            self.type_extra[(qtype, "judge_yes" if judged else "judge_no")] += 1

    def merge(self, other: "GroundingStats") -> "GroundingStats":
        """Fold in the counts of another (e.g. a worker's) stats; returns self."""
        self.total += other.total
        self.grounded += other.grounded
        for mine, theirs in (
            (self.type_total, other.type_total), (self.type_grounded, other.type_grounded),
            (self.doc_total, other.doc_total), (self.doc_grounded, other.doc_grounded),
            (self.reasons, other.reasons), (self.type_extra, other.type_extra),
            (self.support_sum, other.support_sum),
        ):
            mine.update(theirs)
        return self

    def to_dict(self) -> dict:
        by_type = _rates(self.type_total, self.type_grounded)
        for (qtype, what), n in sorted(self.type_extra.items()):
            if what != "support_scored":
                by_type[qtype][what] = n
        for qtype, entry in by_type.items():
            if "hidden_reference" in entry:
                entry["hidden_reference_rate"] = entry["hidden_reference"] / entry["total"]
            scored = self.type_extra.get((qtype, "support_scored"), 0)
            if scored:
                entry["mean_answer_support"] = self.support_sum[qtype] / scored
                entry["answer_supported_rate"] = self.type_extra.get((qtype, "answer_supported"), 0) / scored
        return {
            "overall": _entry(self.total, self.grounded),
            "by_type": by_type,
            "by_document": _rates(self.doc_total, self.doc_grounded),
            "by_reason": {k: self.reasons[k] for k in sorted(self.reasons)},
        }

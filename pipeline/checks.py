"""Content checks: what a schema cannot see in an output that validates.

A constrained decoder guarantees the JSON shape, not the content. Seen with a small model on real
text: summaries that are exactly "..." (the placeholder of an example reply), loops ("solid, solid,
solid, ..." up to the token cap), empty talk ("The passage is written in plain prose."), answers cut
at the schema's character cap mid-word, answers that restate the question, and questions that point at
what the student never sees ("this passage", "section 4"). `check_output(request, obj)` returns the
first failed check's reason ("" when all pass); synthesis hands it to the request scheduler as its
content check (ctxforge.generation.validation.validate runs it after the JSON schema), which retries
the request with a new seed and finally records it as failed with that reason, counted per reason.

Reasons: truncated:<field>, placeholder:<field>, repetitive:<field>, too_short:summary,
unsupported:summary, restated_question, hidden_reference.

The checks read their settings (ChecksConfig) and the span of the request's input inside its user
message from `request.meta` ("checks", "input_span"), which the planner sets; a request without
them (e.g. built by hand) gets the default settings and no input-relative checks.
"""

from __future__ import annotations

import re

from rapidfuzz import fuzz

from ctxforge.pipeline.config import ChecksConfig
from ctxforge.pipeline.grounding import lexical_support, normalize

# Questions that name the hidden structure of generation (what the generator was shown), not the
# document the student reads.
HIDDEN_REFERENCE = re.compile(
    r"\b(?:this|that|these|the|above|following|first|second|third|given|provided|previous)\s+"
    r"(?:passage|passages|excerpt|excerpts|extract|section|sections|chunk|chunks|summary|summaries|text\s+above|"
    r"text\s+below)\b"
    r"|\b(?:passage|section|chunk|part|text|excerpt)\s+\d+\b"
    r"|\b(?:text|passage)\s+(?:above|below)\b|\babove\s+(?:text|passage)\b|\bas\s+(?:stated|mentioned|shown)\s+above\b",
    re.IGNORECASE,
)
# What a weak model copies from an instruction instead of answering (after normalize()).
PLACEHOLDERS = frozenset({
    "", "...", "n a", "na", "none", "null", "string", "text", "summary", "your summary", "answer", "the answer",
    "question", "the question", "quote", "evidence", "evidence quote", "tbd", "todo", "lorem ipsum",
})
SENTENCE_END = (".", "!", "?", '"', "'", ")", "]", "\u201d", "\u2019", "\u00bb", "\u2026", ":", ";")
_CHECKED_FIELDS = ("summary", "question", "answer")  # quotes are copied text: they end where the source does
_DEFAULT = ChecksConfig()


def refers_to_hidden_structure(question: str) -> bool:
    return bool(HIDDEN_REFERENCE.search(question or ""))


def repeated_share(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one (0 for fewer than 6 n-grams)."""
    words = re.findall(r"[^\W_]+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 6:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def is_truncated(value: str, max_chars: int) -> bool:
    """A string that filled its cap (within 3 characters) without ending a sentence was cut by the decoder."""
    return len(value) >= max_chars - 3 and not value.rstrip().endswith(SENTENCE_END)


def restates(answer: str, question: str, threshold: float) -> bool:
    a, q = normalize(answer), normalize(question)
    if not a or not q:
        return False
    return fuzz.ratio(a, q) >= threshold or (len(a.split()) >= 3 and a in q)


def _input_text(request) -> str | None:
    span = request.meta.get("input_span")
    if not span:
        return None
    return request.messages[-1]["content"][span[0]:span[1]]


def check_output(request, obj: dict) -> str:
    """The first failed content check of a schema-valid output, as a reason string; "" when it passes."""
    checks: ChecksConfig = request.meta.get("checks") or _DEFAULT
    if not checks.enabled:
        return ""
    props = (request.schema or {}).get("properties", {})
    for name in _CHECKED_FIELDS:
        value = obj.get(name)
        if not isinstance(value, str):
            continue
        if normalize(value) in PLACEHOLDERS or not re.search(r"[^\W_]", value):
            return f"placeholder:{name}"
        cap = props.get(name, {}).get("maxLength")
        if checks.truncation and cap and is_truncated(value, cap):
            return f"truncated:{name}"
        if repeated_share(value) > checks.max_repeated_ngrams:
            return f"repetitive:{name}"
    for quote in [obj.get("evidence_quote")] + list(obj.get("evidence_quotes") or []):
        if isinstance(quote, str) and (normalize(quote) in PLACEHOLDERS or not re.search(r"[^\W_]", quote)):
            return "placeholder:evidence_quote"
    if "summary" in obj:
        source = _input_text(request)
        if source:
            cap = props.get("summary", {}).get("maxLength") or len(obj["summary"])
            if len(obj["summary"]) < min(checks.min_summary_ratio * len(source), cap / 2):
                return "too_short:summary"
            if checks.min_summary_support and lexical_support(obj["summary"], [source]) < checks.min_summary_support:
                return "unsupported:summary"
    if "question" in obj and "answer" in obj:
        if restates(obj["answer"], obj["question"], checks.restated_question):
            return "restated_question"
        if checks.hidden_references == "retry" and refers_to_hidden_structure(obj["question"]):
            return "hidden_reference"
    return ""

"""Grounding of evidence quotes (ctxforge.pipeline.grounding)."""

from __future__ import annotations

import pytest

from ctxforge.pipeline.grounding import REASONS, GroundingStats, ground_quote, normalize

EVIDENCE = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n\n"
    "And God said, “Let there be light”: and there was light. It’s a well-known verse — quoted often."
)
MIN_SCORE, MIN_CHARS = 90.0, 12


def ground(quote, evidence=(EVIDENCE,)):
    return ground_quote(quote, list(evidence), MIN_SCORE, MIN_CHARS)


def test_normalize():
    assert normalize("  Hello,\n\tWORLD!  ") == "hello world"
    assert normalize("“Don’t” — it’s «fine»") == normalize('"Don\'t" - it\'s "fine"') == "don't it's fine"
    assert normalize("well‐known 3.14 e.g. x") == "well-known 3.14 e.g x"  # kept inside words only
    assert normalize("ＡＢＣ ｆｕｌｌｗｉｄｔｈ") == "abc fullwidth"  # NFKC
    assert normalize("...!!!") == ""


@pytest.mark.parametrize("quote", [
    "and darkness was upon the face of the deep",
    "AND DARKNESS   was upon\nthe face of the deep.",
    "And God said, \"Let there be light\": and there was light",
    "and god said 'let there be light' and there was light",
    "It's a well-known verse -- quoted often",
    "void;\n\nand darkness",
])
def test_exact_match_across_case_whitespace_and_quotes(quote):
    assert ground(quote) == (True, 100.0, "exact")


def test_fuzzy_match_with_one_word_typo():
    grounded, score, reason = ground("And the Spirit of God moved upon the face of the watres")
    assert grounded and reason == "fuzzy" and MIN_SCORE <= score < 100


def test_made_up_quote_fails():
    grounded, score, reason = ground("The committee approved the quarterly budget after a long debate")
    assert (grounded, reason) == (False, "not_found") and score < MIN_SCORE


def test_paraphrase_fails_at_strict_threshold():
    grounded, _, reason = ground("God made the skies and the land at the very start")
    assert not grounded and reason == "not_found"


@pytest.mark.parametrize("quote", ["", "   ", "\n\t", "—…!?", None])
def test_empty_quote(quote):
    assert ground(quote) == (False, 0.0, "empty_quote")


def test_too_short_quote():
    assert ground("the earth") == (False, 0.0, "quote_too_short")  # 9 normalized chars < 12
    assert ground("the heaven and")[0]  # 14 chars: long enough


def test_match_in_second_evidence_text():
    other = "A completely unrelated passage about ships, harbours and the price of fish in winter."
    assert ground("the Spirit of God moved upon the face", [other, EVIDENCE]) == (True, 100.0, "exact")
    grounded, _, reason = ground("the Spirit of Gd moved upon the face of the waters", [other, EVIDENCE, ""])
    assert grounded and reason == "fuzzy"
    assert ground("the Spirit of God moved upon the face", []) == (False, 0.0, "not_found")


def test_long_evidence():
    filler = " ".join(f"filler sentence number {i} about nothing in particular." for i in range(1500))
    long_text = filler + " " + EVIDENCE + " " + filler
    assert len(long_text) > 50_000
    assert ground("and darkness was upon the face of the deep", [long_text])[2] == "exact"
    assert ground("and darknes was upon the face of the deep", [long_text])[2] == "fuzzy"
    assert ground("the committee approved the quarterly budget", [long_text])[2] == "not_found"


def test_stats_aggregation():
    stats = GroundingStats()
    stats.add("d1", "global", True, "exact")
    stats.add("d1", "chunk", False, "not_found")
    stats.add("d2", "chunk", True, "fuzzy")
    stats.add("d2", "chunk", False, "quote_too_short")
    d = stats.to_dict()
    assert d["overall"] == {"total": 4, "grounded": 2, "rate": 0.5}
    assert d["by_type"] == {
        "chunk": {"total": 3, "grounded": 1, "rate": pytest.approx(1 / 3)},
        "global": {"total": 1, "grounded": 1, "rate": 1.0},
    }
    assert d["by_document"]["d1"] == {"total": 2, "grounded": 1, "rate": 0.5}
    assert d["by_document"]["d2"] == {"total": 2, "grounded": 1, "rate": 0.5}
    assert d["by_reason"] == {"exact": 1, "fuzzy": 1, "not_found": 1, "quote_too_short": 1}
    assert set(d["by_reason"]) <= set(REASONS)

    other = GroundingStats()
    other.add("d3", "global", False, "empty_quote")
    merged = stats.merge(other).to_dict()
    assert merged["overall"] == {"total": 5, "grounded": 2, "rate": 0.4}
    assert merged["by_type"]["global"] == {"total": 2, "grounded": 1, "rate": 0.5}
    assert merged["by_reason"]["empty_quote"] == 1


def test_empty_stats():
    assert GroundingStats().to_dict() == {
        "overall": {"total": 0, "grounded": 0, "rate": 0.0}, "by_type": {}, "by_document": {}, "by_reason": {},
    }


def test_stats_from_ground_quote_results():
    stats = GroundingStats()
    for q in ["and darkness was upon the face of the deep", "totally invented sentence here", "", "the earth"]:
        grounded, _, reason = ground(q)
        stats.add("doc", "local_specific", grounded, reason)
    assert stats.to_dict()["by_reason"] == {"empty_quote": 1, "exact": 1, "not_found": 1, "quote_too_short": 1}

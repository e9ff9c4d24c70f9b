"""Hierarchical token chunking (ctxforge.pipeline.chunking) against a real Qwen2 byte-level BPE tokenizer."""

from __future__ import annotations

import json
import re

import pytest

from ctxforge.pipeline.chunking import chunk_document
from ctxforge.pipeline.read import kjv_source_file

KJV = kjv_source_file()


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    assert tiny_tokenizer.is_fast
    return tiny_tokenizer


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def check_invariants(tok, doc_id, text, chunks, sections, n, small, per_medium):
    assert n == len(_ids(tok, text))
    assert chunks and sections
    # tokens and characters tile the document exactly
    assert chunks[0].token_start == 0 and chunks[-1].token_end == n
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text)
    for a, b in zip(chunks, chunks[1:]):
        assert a.token_end == b.token_start
        assert a.char_end == b.char_start
    assert "".join(c.text for c in chunks) == text
    for i, c in enumerate(chunks):
        assert c.index == i and c.doc_id == doc_id
        assert c.chunk_id == f"{doc_id}:s{i:05d}"
        assert 0 < c.token_end - c.token_start <= small
        assert c.char_start <= c.char_end
        assert c.text == text[c.char_start:c.char_end]
        assert c.section_index == i // per_medium
    # sections are exactly the union of their small chunks
    assert sum(s.chunk_end - s.chunk_start for s in sections) == len(chunks)
    for j, s in enumerate(sections):
        assert s.index == j and s.section_id == f"{doc_id}:m{j:04d}" and s.doc_id == doc_id
        members = chunks[s.chunk_start:s.chunk_end]
        assert 1 <= len(members) <= per_medium
        assert all(c.section_index == j for c in members)
        assert (s.token_start, s.token_end) == (members[0].token_start, members[-1].token_end)
        assert (s.char_start, s.char_end) == (members[0].char_start, members[-1].char_end)
    assert [s.chunk_end for s in sections[:-1]] == [s.chunk_start for s in sections[1:]]
    assert all(s.chunk_end - s.chunk_start == per_medium for s in sections[:-1])


MIXED = (
    "Chapter One\n\n"
    "It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
    "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass doors!\n"
    "Was it true? Perhaps; perhaps not: nobody knew.\n\n\n"
    "   Indented paragraph with \"quotes.\" And (brackets.) And 3.14159 numbers, e.g. this one.\r\n\r\n"
    "東京は日本の首都です。大阪は大きな都市です！本当に？はい。 Emoji 👋🏽👨‍👩‍👧‍👦🎉 mixed in. "
    "Combining: e\u0301 a\u0308 n\u0303 Zalgo z\u0336\u0327a\u0335\u0321l\u0338\u0322g\u0337o\u0334. "
    "Tabs\tand\u00a0no-break\u3000ideographic spaces. The end"
)


@pytest.mark.parametrize("small", [16, 23, 64])
@pytest.mark.parametrize("window", [0.0, 0.25, 0.9])
@pytest.mark.parametrize("per_medium", [1, 3])
def test_invariants_on_mixed_text(tok, small, window, per_medium):
    text = MIXED * 3
    chunks, sections, n = chunk_document("doc", text, tok, small, per_medium, window)
    check_invariants(tok, "doc", text, chunks, sections, n, small, per_medium)
    assert len(chunks) > 3


@pytest.mark.parametrize("text", [
    "Hello world.", " leading and trailing spaces ", "\n\n\n", "x", "👋🏽", "e\u0301", "東京",
])
def test_tiny_document_is_one_chunk(tok, text):
    chunks, sections, n = chunk_document("t", text, tok, 64, 3, 0.25)
    check_invariants(tok, "t", text, chunks, sections, n, 64, 3)
    assert len(chunks) == 1 and len(sections) == 1
    assert chunks[0].text == text and (chunks[0].token_start, chunks[0].token_end) == (0, n)


def test_empty_document(tok):
    assert chunk_document("e", "", tok, 64, 3, 0.25) == ([], [], 0)


def test_exactly_one_window_is_one_chunk(tok):
    text = "word " * 200
    n = len(_ids(tok, text))
    chunks, _, _ = chunk_document("w", text, tok, n, 3, 0.25)
    assert len(chunks) == 1
    chunks, _, _ = chunk_document("w", text, tok, n - 1, 3, 0.25)
    assert len(chunks) == 2


def _sentences(k, word="alpha"):
    return " ".join(f"{word} beta gamma delta {i}." for i in range(k))


def test_paragraph_end_preferred_over_later_sentence_end(tok):
    # Paragraph 1 ends ~45 tokens in; paragraph 2's sentences end every ~7 tokens, so the window
    # [32, 64] offers several later sentence ends, and the cut must still take the paragraph end.
    para1 = _sentences(6)
    text = para1 + "\n\n" + _sentences(40, "omega")
    para_end_tokens = len(_ids(tok, para1 + "\n\n"))
    assert 32 < para_end_tokens < 56
    chunks, sections, n = chunk_document("p", text, tok, 64, 2, 0.5)
    check_invariants(tok, "p", text, chunks, sections, n, 64, 2)
    assert chunks[0].text == para1 + "\n\n"
    assert chunks[0].token_end == para_end_tokens
    # The later chunks have no paragraph ends; they end on sentences, not mid-sentence.
    for c in chunks[1:-1]:
        assert c.text.endswith(".")


def test_paragraph_outside_window_is_ignored(tok):
    # The blank line sits before the window [48, 64]: the cut falls to the last sentence end instead.
    para1 = _sentences(2)
    text = para1 + "\n\n" + _sentences(40, "omega")
    assert len(_ids(tok, para1 + "\n\n")) < 48
    chunks, _, _ = chunk_document("p", text, tok, 64, 2, 0.25)
    assert chunks[0].token_end >= 48 and chunks[0].text.endswith(".")


def test_cuts_prefer_sentence_ends(tok):
    text = _sentences(120)
    small, window = 50, 0.3
    chunks, sections, n = chunk_document("s", text, tok, small, 3, window)
    check_invariants(tok, "s", text, chunks, sections, n, small, 3)
    for c in chunks[:-1]:
        assert c.text.endswith("."), c.text[-20:]
        assert c.token_end - c.token_start >= small - int(window * small)
    # The cut is the *last* sentence end in the window: the next sentence would not have fitted.
    for a, b in zip(chunks, chunks[1:]):
        next_sentence = re.match(r"[^.]*\.", b.text).group(0)
        assert len(_ids(tok, a.text + next_sentence)) > small


def test_single_newline_is_a_sentence_end(tok):
    lines = "\n".join(f"line {i} has words without a full stop" for i in range(60))
    chunks, sections, n = chunk_document("l", lines, tok, 40, 3, 0.5)
    check_invariants(tok, "l", lines, chunks, sections, n, 40, 3)
    for c in chunks[:-1]:
        assert c.text.endswith("\n")


def test_hard_cut_without_boundaries(tok):
    text = "abcdefghijklmnopqrstuvwxyz" * 200  # no spaces, no punctuation
    chunks, sections, n = chunk_document("h", text, tok, 32, 3, 0.25)
    check_invariants(tok, "h", text, chunks, sections, n, 32, 3)
    assert len(chunks) == -(-n // 32)
    assert all(c.token_end - c.token_start == 32 for c in chunks[:-1])


def test_zero_window_cuts_exactly_at_small_tokens(tok):
    # Negative control: with no window the boundary search has nowhere to go.
    text = _sentences(120)
    chunks, _, n = chunk_document("z", text, tok, 50, 3, 0.0)
    assert [c.token_start for c in chunks] == list(range(0, n, 50))
    assert not all(c.text.endswith(".") for c in chunks[:-1])
    # ...while a window does move the cuts.
    windowed, _, _ = chunk_document("z", text, tok, 50, 3, 0.3)
    assert [c.token_start for c in windowed] != [c.token_start for c in chunks]


def test_unicode_cuts_never_split_a_character(tok):
    # Emoji with modifiers and ZWJ sequences are several tokens per character under byte-level BPE;
    # with no boundaries the hard cut must still land between whole characters.
    text = "👋🏽👨‍👩‍👧‍👦🎉東京大阪𝔘𝔫𝔦𝔠𝔬𝔡𝔢" * 40
    for small in (16, 17, 19, 33):
        chunks, sections, n = chunk_document("u", text, tok, small, 2, 0.0)
        check_invariants(tok, "u", text, chunks, sections, n, small, 2)
        ids = _ids(tok, text)
        for c in chunks:
            assert small - 3 <= c.token_end - c.token_start or c is chunks[-1]
            assert tok.decode(ids[c.token_start:c.token_end]) == c.text


def test_combining_characters_tile(tok):
    # NFC in the tokenizer composes e + U+0301 into one character, leaving a gap in the offsets.
    text = ("e\u0301a\u0308o\u0302 " * 100) + "Zalgo: " + "z\u0336\u0327\u0350" * 60
    for small in (16, 29):
        chunks, sections, n = chunk_document("c", text, tok, small, 3, 0.25)
        check_invariants(tok, "c", text, chunks, sections, n, small, 3)


def test_long_whitespace_runs(tok):
    text = "start." + " " * 100_000 + "middle" + "\n" * 50_000 + "end.\n\n" + "\t \n" * 20_000 + "tail"
    chunks, sections, n = chunk_document("w", text, tok, 64, 3, 0.25)
    check_invariants(tok, "w", text, chunks, sections, n, 64, 3)


def _bible_books(k):
    books: dict[str, list[list[str]]] = {}
    with KJV.open(encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            chapters = books.setdefault(v["book"], [])
            if len(chapters) < int(v["chapter"]):
                chapters.append([])
            chapters[-1].append(v["text"])
            if len(books) > k:
                break
    return {b: "\n\n".join(" ".join(ch) for ch in chs) for b, chs in list(books.items())[:k]}


def test_real_text_and_determinism(tok):
    book, text = next(iter(_bible_books(1).items()))
    first = chunk_document(book, text, tok, 512, 3, 0.25)
    check_invariants(tok, book, text, *first, 512, 3)
    assert first == chunk_document(book, text, tok, 512, 3, 0.25)
    chunks = first[0]
    # Genesis chapters are ~700-1000 tokens, so many cuts find a chapter break in a 128-token window;
    # every other cut still finds a verse end.
    at_paragraph = sum(c.text.endswith("\n\n") for c in chunks[:-1])
    assert at_paragraph >= 5
    assert all(re.search(r"[.!?;:]\s*$", c.text) for c in chunks[:-1])


@pytest.mark.parametrize("kwargs", [
    {"small_tokens": 0}, {"smalls_per_medium": 0}, {"boundary_window": 1.0}, {"boundary_window": -0.1},
])
def test_rejects_bad_arguments(tok, kwargs):
    args = {"small_tokens": 64, "smalls_per_medium": 3, "boundary_window": 0.25, **kwargs}
    with pytest.raises(ValueError):
        chunk_document("x", "some text", tok, **args)


def test_cjk_full_stop_is_a_sentence_end(tok):
    # CJK prose has no spaces after its full stops; they must still count as sentence ends.
    text = "".join(f"第{i}章の物語はここで終わります。" for i in range(80))
    chunks, sections, n = chunk_document("j", text, tok, 40, 3, 0.5)
    check_invariants(tok, "j", text, chunks, sections, n, 40, 3)
    assert len(chunks) > 3
    for c in chunks[:-1]:
        assert c.text.endswith("。")


def test_sentence_cut_never_splits_multibyte_whitespace(tok):
    # Byte-level BPE splits an em space (3 UTF-8 bytes) over several tokens: a window ending inside
    # one must not take that point as a sentence end.
    text = "".join(f"Sentence number {i} ends here.\u2003\u2003\u2003" for i in range(60))
    ids = _ids(tok, text)
    for small in range(16, 28):
        chunks, sections, n = chunk_document("m", text, tok, small, 3, 0.5)
        check_invariants(tok, "m", text, chunks, sections, n, small, 3)
        for c in chunks:
            assert tok.decode(ids[c.token_start:c.token_end]) == c.text

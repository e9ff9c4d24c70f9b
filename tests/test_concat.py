"""Algorithm 2, multi-document concatenation (pipeline/concat.py): schedule, fitting, rows, stats."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pyarrow as pa
import pytest

from ctxforge.pipeline.concat import (
    PART_DIVERSE,
    PART_EARLIER,
    PART_FOLLOWUP,
    PART_HIERARCHICAL,
    PART_REST_DIVERSE,
    PART_REST_HIERARCHICAL,
    REST_PARTS,
    build_messages,
    build_stage_samples,
    plan_conversation,
)
from ctxforge.pipeline.config import ConcatConfig, StageConfig
from ctxforge.pipeline.records import DocumentQA, QARecord
from ctxforge.schema import SAMPLE_SCHEMA

WORDS = (
    "river stone lantern harbor meadow copper violet engine quiet thunder garden pilot marble "
    "window saddle orbit canyon ember feather ladder mirror needle oyster pepper quartz ribbon "
    "silver timber umbrella velvet walnut yonder zephyr anchor basket candle dragon falcon glacier"
).split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_doc(i: int, *, n_words: int = 200, n_hier: int = 25, n_div: int = 50, seed: int = 0, tok=None,
             n_tokens: int | None = None, title: str | None = None) -> DocumentQA:
    rng = random.Random(f"{seed}-{i}")
    doc_id = f"doc{i:03d}"
    text = _words(rng, n_words) + "."
    if n_tokens is None:
        n_tokens = len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else n_words

    def qa(kind: str, j: int) -> QARecord:
        tag = "h" if kind == "hierarchical" else "d"
        return QARecord(
            qa_id=f"{doc_id}:{tag}{j:03d}", doc_id=doc_id, kind=kind,
            qtype="section" if kind == "hierarchical" else "local_specific", order=j,
            question=f"{_words(rng, 6)} {tag}{j}?", answer=f"{_words(rng, 8)}.",
            # overlapping evidence between neighbours, so `chunks` deduplication is exercised
            evidence_ids=[f"{doc_id}:s{j // 2:05d}", f"{doc_id}:summary:global"],
            evidence_quote="", grounded=j % 5 != 4,
        )

    return DocumentQA(
        doc_id=doc_id, title=f"Book {i}" if title is None else title, text=text, n_tokens=n_tokens,
        hierarchical=[qa("hierarchical", j) for j in range(n_hier)],
        diverse=[qa("diverse", j) for j in range(n_div)],
    )


@pytest.fixture(scope="module")
def tok():
    from ctxforge.models import load_tokenizer

    return load_tokenizer("ctxforge:tiny")


@pytest.fixture(scope="module")
def tok_hash(tok):
    from ctxforge.models import tokenizer_hash

    return tokenizer_hash(tok)


# ---------------------------------------------------------------- schedule (no tokenizer)


def _cfg(**kw) -> ConcatConfig:
    return ConcatConfig(**kw)


def test_single_document_sample_carries_the_whole_budget():
    # 25 hierarchical + 50 diverse QA, default config: every QA, hierarchical in reading order, then the diverse
    docs = [make_doc(0)]
    turns = plan_conversation(docs, _cfg(p_revisit=1.0), random.Random(0))
    assert len(turns) == 75 and len({t.qa.qa_id for t in turns}) == 75
    assert [t.qa.order for t in turns[:25]] == list(range(25))
    assert all(t.qa.kind == "diverse" for t in turns[25:])
    parts = Counter(t.part for t in turns)
    assert parts == {PART_HIERARCHICAL: 5, PART_REST_HIERARCHICAL: 20, PART_DIVERSE: 5, PART_REST_DIVERSE: 45}
    # negative control: the published schedule alone plans 5 + 5
    turns = plan_conversation(docs, _cfg(p_revisit=1.0, rest_of_last_document=False), random.Random(0))
    assert Counter(t.part for t in turns) == {PART_HIERARCHICAL: 5, PART_DIVERSE: 5}


def test_last_of_several_documents_gets_the_rest_of_its_budget():
    docs = [make_doc(i) for i in range(3)]
    turns = plan_conversation(docs, _cfg(p_revisit=0.0), random.Random(0))
    per_doc = Counter(t.doc_index for t in turns)
    # docs 0 and 1: N1 (5 + 5) plus N2 draws from them; doc 2: its whole budget
    assert per_doc[2] == 75
    assert Counter(t.part for t in turns if t.doc_index == 2)[PART_REST_HIERARCHICAL] == 20
    rest = [i for i, t in enumerate(turns) if t.part in REST_PARTS]
    assert min(rest) > max(i for i, t in enumerate(turns) if t.block < 2)  # only in the last block


@pytest.mark.parametrize("p, followups", [(1.0, 3 * (0 + 1 + 2 + 3)), (0.0, 0)])
def test_schedule_four_documents(p, followups):
    docs = [make_doc(i) for i in range(4)]
    turns = plan_conversation(docs, _cfg(p_revisit=p, rest_of_last_document=False), random.Random(1))
    parts = Counter(t.part for t in turns)
    assert parts[PART_HIERARCHICAL] == 4 * 5
    assert parts[PART_DIVERSE] == 4 * 5
    assert parts[PART_EARLIER] == 3 * 9
    assert parts[PART_FOLLOWUP] == followups
    assert len(turns) == 40 + 27 + followups
    blocks = [t.block for t in turns]
    assert blocks == sorted(blocks)  # block by block
    for t in turns:
        if t.part in (PART_HIERARCHICAL, PART_DIVERSE):
            assert t.doc_index == t.block
        else:  # N2 and N3 are about earlier documents only
            assert t.doc_index < t.block
    for b in range(4):  # inside a block: N1 hierarchical, N1 diverse, N2, then N3
        order = [t.part for t in turns if t.block == b]
        rank = {PART_HIERARCHICAL: 0, PART_DIVERSE: 1, PART_EARLIER: 2, PART_FOLLOWUP: 3}
        assert [rank[x] for x in order] == sorted(rank[x] for x in order)
    if p == 1.0:  # every earlier document is revisited in every later block, in document order
        for b in range(1, 4):
            assert [t.doc_index for t in turns if t.block == b and t.part == PART_FOLLOWUP] == [
                s for s in range(b) for _ in range(3)
            ]


def test_hierarchy_in_order_across_revisits_and_no_repeats():
    docs = [make_doc(i) for i in range(5)]
    for seed in range(5):
        turns = plan_conversation(docs, _cfg(p_revisit=0.6), random.Random(seed))
        ids = [t.qa.qa_id for t in turns]
        assert len(ids) == len(set(ids))
        per_doc = defaultdict(list)
        for t in turns:
            assert t.qa.doc_id == docs[t.doc_index].doc_id
            if t.qa.kind == "hierarchical":
                per_doc[t.doc_index].append(t.qa.order)
        for orders in per_doc.values():
            assert orders == list(range(len(orders)))  # the cursor continues, no gaps, no restarts


def test_schedule_shortfalls_take_what_is_left():
    docs = [make_doc(0, n_hier=2, n_div=3), make_doc(1, n_hier=7, n_div=6)]
    shortfalls = Counter()
    turns = plan_conversation(docs, _cfg(p_revisit=1.0), random.Random(0), shortfalls)
    parts = Counter((t.part, t.doc_index) for t in turns)
    assert parts[(PART_HIERARCHICAL, 0)] == 2 and parts[(PART_DIVERSE, 0)] == 3
    assert parts[(PART_HIERARCHICAL, 1)] == 5 and parts[(PART_DIVERSE, 1)] == 5
    assert parts[(PART_EARLIER, 0)] == 0        # doc 0's diverse QA were all used in its own block
    assert parts[(PART_FOLLOWUP, 0)] == 0       # doc 0's hierarchy is exhausted
    assert shortfalls == {PART_HIERARCHICAL: 3, PART_DIVERSE: 2, PART_EARLIER: 9, PART_FOLLOWUP: 3}


def test_schedule_is_seeded():
    docs = [make_doc(i) for i in range(4)]
    a = plan_conversation(docs, _cfg(), random.Random(5))
    b = plan_conversation(docs, _cfg(), random.Random(5))
    c = plan_conversation(docs, _cfg(), random.Random(6))
    assert [t.qa.qa_id for t in a] == [t.qa.qa_id for t in b]
    assert [t.qa.qa_id for t in a] != [t.qa.qa_id for t in c]


def test_messages_layouts_and_document_names():
    docs = [make_doc(i, title="" if i == 1 else None) for i in range(3)]
    turns = plan_conversation(docs, _cfg(), random.Random(0))
    msgs, opened = build_messages(docs, turns, _cfg(layout="upfront"))
    assert opened == [0, 1, 2]
    assert msgs[0] == {"role": "system", "content": _cfg().system_prompt}
    first = msgs[1]["content"]
    assert first.index("Document 1: Book 0\n\n") < first.index("Document 2\n\n") < first.index("Document 3: Book 2\n\n")
    assert all("Document 1: Book 0\n\n" not in m["content"] for m in msgs[3:])
    users = [m["content"] for m in msgs if m["role"] == "user"]
    for turn, content in zip(turns, users):
        name = {0: "Document 1 (Book 0)", 1: "Document 2", 2: "Document 3 (Book 2)"}[turn.doc_index]
        assert content.endswith(f"About {name}: {turn.qa.question}")

    msgs, opened = build_messages(docs, turns, _cfg(layout="interleaved", system_prompt=""))
    assert msgs[0]["role"] == "user"  # no system message
    users = [m["content"] for m in msgs if m["role"] == "user"]
    for d in range(3):
        header = f"Document {d + 1}: Book {d}\n\n" if d != 1 else "Document 2\n\n"
        holding = [i for i, u in enumerate(users) if u.startswith(header)]
        first_of_block = next(i for i, t in enumerate(turns) if t.block == d)
        assert holding == [first_of_block]

    single = [make_doc(0)]
    msgs, _ = build_messages(single, plan_conversation(single, _cfg(), random.Random(0)), _cfg())
    assert "About Document" not in "".join(m["content"] for m in msgs)  # one document: no need to name it


# ---------------------------------------------------------------- samples (tokenizer)


def _check_rows(rows, tok, target):
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)  # the Parquet contract
    assert table.num_rows == len(rows)
    for r in rows:
        assert r["num_tokens"] == len(r["input_ids"]) == len(r["loss_mask"]) <= target
        assert r["num_loss_tokens"] == sum(r["loss_mask"]) > 0
        assert r["num_questions"] == len(r["qa_ids"]) == sum(m["role"] == "assistant" for m in r["messages"]) >= 1
        assert len(set(r["qa_ids"])) == len(r["qa_ids"])
        assert len(set(r["chunks"])) == len(r["chunks"])
        masked = tok.decode([i for i, m in zip(r["input_ids"], r["loss_mask"]) if m])
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert masked == "".join(a + "<|im_end|>" for a in answers)
        assert all(qa.split(":")[0] in r["documents"] for qa in r["qa_ids"])


def test_build_rows_schema_lineage_and_stats(tok, tok_hash):
    docs = [make_doc(i, tok=tok) for i in range(12)]
    by_id = {q.qa_id: q for d in docs for q in (*d.hierarchical, *d.diverse)}
    stage = StageConfig(name="4K", target_tokens=6000, documents_per_sample=4, samples=6)
    rows, stats = build_stage_samples(stage, docs, _cfg(), tok, tok_hash)
    assert len(rows) == 6 and stats["samples_built"] == 6 and stats["samples_skipped"] == 0
    _check_rows(rows, tok, stage.target_tokens)
    for r in rows:
        assert len(r["documents"]) == 4 and r["stage"] == "4K" and r["tokenizer_hash"] == tok_hash
        expected_chunks = list(dict.fromkeys(e for q in r["qa_ids"] for e in by_id[q].evidence_ids))
        assert r["chunks"] == expected_chunks
        assert r["ungrounded_questions"] == sum(not by_id[q].grounded for q in r["qa_ids"])
    assert len({r["sample_id"] for r in rows}) == 6
    # usage is spread: 6 x 4 picks over 12 documents = every document exactly twice
    assert stats["pool"]["uses"]["min"] == stats["pool"]["uses"]["max"] == 2
    assert len({d for r in rows[:3] for d in r["documents"]}) == 12
    assert stats["documents_per_sample"] == {"4": 6}
    assert sum(stats["token_length_histogram"]["counts"]) == 6
    assert stats["token_length_histogram"]["edges"][-1] == 6000
    assert 0 < stats["fill"]["min"] <= stats["fill"]["mean"] <= stats["fill"]["max"] <= 1.0
    assert stats["qa_turns_per_sample"]["min"] >= 1


def test_same_seed_same_rows_different_seed_different(tok, tok_hash):
    docs = [make_doc(i, tok=tok) for i in range(8)]
    stage = StageConfig(name="s", target_tokens=5000, documents_per_sample=3, samples=4)
    a, sa = build_stage_samples(stage, docs, _cfg(seed=1), tok, tok_hash)
    b, sb = build_stage_samples(stage, docs, _cfg(seed=1), tok, tok_hash)
    c, _ = build_stage_samples(stage, docs, _cfg(seed=2), tok, tok_hash)
    assert a == b and sa == sb
    assert [r["sample_id"] for r in a] != [r["sample_id"] for r in c]
    assert [r["qa_ids"] for r in a] != [r["qa_ids"] for r in c]


@pytest.mark.parametrize("layout", ["upfront", "interleaved"])
def test_tight_target_drops_turns_from_the_end(tok, tok_hash, layout):
    # n_tokens under-reports the documents (as a count from another tokenizer would): selection plans
    # for the full schedule, rendering finds it too long and drops whole turns from the end.
    docs = [make_doc(i, tok=tok, n_words=400, n_tokens=150) for i in range(6)]
    stage = StageConfig(name="tight", target_tokens=1800, documents_per_sample=2, samples=5)
    rows, stats = build_stage_samples(stage, docs, _cfg(layout=layout), tok, tok_hash)
    assert len(rows) == 5 and stats["turns_dropped_to_fit"] > 0 and stats["documents_dropped_to_fit"] == 0
    assert stats["documents_per_sample"] == {"2": 5}
    _check_rows(rows, tok, 1800)
    for r in rows:  # whole turns dropped from the end: each document's hierarchy is still a gapless prefix
        assert r["messages"][-1]["role"] == "assistant"
        orders = defaultdict(list)
        for q in r["qa_ids"]:
            doc, tag = q.split(":")
            if tag.startswith("h"):
                orders[doc].append(int(tag[1:]))
        assert all(o == list(range(len(o))) for o in orders.values())
    assert min(r["num_tokens"] for r in rows) > 1700  # filled up to the target, not cut short needlessly


def test_documents_that_do_not_fit_are_dropped(tok, tok_hash):
    # n_tokens under-reports the real size, so selection picks 4 documents that can't fit together;
    # rendering finds out and drops documents from the end.
    docs = [make_doc(i, tok=tok, n_words=400, n_tokens=20) for i in range(8)]
    stage = StageConfig(name="drop", target_tokens=1200, documents_per_sample=4, samples=3)
    rows, stats = build_stage_samples(stage, docs, _cfg(), tok, tok_hash)
    assert len(rows) == 3
    assert stats["documents_dropped_to_fit"] > 0
    assert all(len(r["documents"]) < 4 for r in rows)
    _check_rows(rows, tok, 1200)


def test_no_turn_fits_sample_skipped(tok, tok_hash):
    docs = [make_doc(i, tok=tok, n_words=600, n_tokens=10) for i in range(3)]
    stage = StageConfig(name="tiny", target_tokens=200, documents_per_sample=1, samples=2)
    rows, stats = build_stage_samples(stage, docs, _cfg(), tok, tok_hash)
    assert rows == [] and stats["samples_skipped"] == 2 and stats["samples_built"] == 0


def test_pool_smaller_than_documents_per_sample(tok, tok_hash):
    docs = [make_doc(i, tok=tok) for i in range(2)]
    stage = StageConfig(name="small", target_tokens=8000, documents_per_sample=4, samples=3)
    rows, stats = build_stage_samples(stage, docs, _cfg(), tok, tok_hash)
    assert len(rows) == 3
    assert all(sorted(r["documents"]) == ["doc000", "doc001"] for r in rows)
    assert stats["samples_short_of_documents"] == 3 and stats["documents_per_sample"] == {"2": 3}
    _check_rows(rows, tok, 8000)


def test_documents_without_qa_or_too_long_are_not_used(tok, tok_hash):
    docs = [make_doc(i, tok=tok) for i in range(3)]
    docs.append(make_doc(3, tok=tok, n_hier=0, n_div=0))
    docs.append(make_doc(4, tok=tok, n_words=3000))
    stage = StageConfig(name="pool", target_tokens=2500, documents_per_sample=1, samples=4)
    rows, stats = build_stage_samples(stage, docs, _cfg(), tok, tok_hash)
    used = {d for r in rows for d in r["documents"]}
    assert used <= {"doc000", "doc001", "doc002"}
    assert stats["pool"]["without_qa"] == 1 and stats["pool"]["too_long"] == 1
    _check_rows(rows, tok, 2500)


# ---------------------------------------------------------------- a corpus too small for its stage


def test_one_document_repeated_over_samples_is_counted_and_said(tok, tok_hash):
    from ctxforge.pipeline.concat import document_reuse_note

    stage = StageConfig(name="4K", target_tokens=4096, documents_per_sample=1, samples=4)
    rows, stats = build_stage_samples(stage, [make_doc(0, tok=tok, n_hier=5, n_div=4)], _cfg(), tok, tok_hash)
    assert [r["documents"] for r in rows] == [["doc000"]] * 4          # what happens: the one document, 4 times
    assert stats["document_reuse"] == {
        "documents_needed": 4, "usable_documents": 1, "distinct_documents_used": 1, "samples_reusing_a_document": 3,
        "most_samples_per_document": 4, "samples_short_of_documents_for_lack_of_documents": 0}
    note = document_reuse_note(stats, "add documents to input.path")
    assert note == (
        "stage 4K: 3 of 4 samples repeat a document that an earlier sample of the stage holds (one document is in "
        "up to 4 samples; at most the choice and order of its questions differ, and two such samples can be "
        "identical), so training sees the same texts again "
        "(4 samples x 1 document call for 4 distinct documents; the stage had 1 usable document). To fix: add "
        "documents to input.path; or lower concat.stages[4K].samples (now 4) or "
        "concat.stages[4K].documents_per_sample (now 1).")


def test_two_documents_for_four_per_sample_say_the_samples_are_short(tok, tok_hash):
    from ctxforge.pipeline.concat import document_reuse_note

    docs = [make_doc(i, tok=tok, n_hier=5, n_div=4) for i in range(2)]
    stage = StageConfig(name="8K", target_tokens=8000, documents_per_sample=4, samples=1)
    rows, stats = build_stage_samples(stage, docs, _cfg(), tok, tok_hash)
    assert len(rows) == 1 and sorted(rows[0]["documents"]) == ["doc000", "doc001"]   # never one document twice
    reuse = stats["document_reuse"]
    assert (reuse["samples_reusing_a_document"], reuse["samples_short_of_documents_for_lack_of_documents"]) == (0, 1)
    note = document_reuse_note(stats, "add documents to input.path")
    assert "1 of 1 samples hold fewer than 4 documents, as only 2 are usable" in note
    assert "call for 4 distinct documents" in note and "repeat a document" not in note


def test_enough_documents_no_reuse_note(tok, tok_hash):
    from ctxforge.pipeline.concat import document_reuse_note

    docs = [make_doc(i, tok=tok, n_hier=5, n_div=4) for i in range(8)]
    stage = StageConfig(name="8K", target_tokens=4096, documents_per_sample=2, samples=3)
    rows, stats = build_stage_samples(stage, docs, _cfg(), tok, tok_hash)
    ids = [d for r in rows for d in r["documents"]]
    assert len(ids) == len(set(ids)) == 6
    assert stats["document_reuse"]["samples_reusing_a_document"] == 0
    assert stats["document_reuse"]["distinct_documents_used"] == 6
    assert document_reuse_note(stats, "add documents to input.path") == ""


def test_reuse_note_names_the_target_when_documents_were_too_long_for_it(tok, tok_hash):
    from ctxforge.pipeline.concat import document_reuse_note

    docs = [make_doc(0, tok=tok, n_hier=5, n_div=4), make_doc(1, tok=tok, n_words=3000)]
    stage = StageConfig(name="2K", target_tokens=2500, documents_per_sample=1, samples=2)
    rows, stats = build_stage_samples(stage, docs, _cfg(), tok, tok_hash)
    assert [r["documents"] for r in rows] == [["doc000"], ["doc000"]] and stats["pool"]["too_long"] == 1
    note = document_reuse_note(stats, "add documents to input.path")
    assert "the stage had 1 usable document of 2)" in note
    assert ("To fix: add documents to input.path, or raise concat.stages[2K].target_tokens (now 2500; 1 document "
            "did not fit it with their QA); or lower concat.stages[2K].samples (now 2)") in note

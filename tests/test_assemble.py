"""QA assembly: quote grounding in the document vs in a summary, answer support, multi-chunk evidence,
the judge's verdict, orphaned follow-ups, near-duplicate questions, hidden references, summary turns."""

from __future__ import annotations

from ctxforge.config import load_config
from ctxforge.pipeline.assemble import QAAssembler
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.hierarchy import DocState
from ctxforge.pipeline.qaplan import PlannedQA
from ctxforge.pipeline.records import Chunk, Section

CHUNKS = [
    "Agnes the miller's daughter counted forty sacks of barley in the loft before the spring flood.",
    "The river rose in March and the lower store flooded, so the villagers carried the grain to the church.",
    "Thomas the smith forged a new wheel for the mill, paid for with two sacks of the rescued barley.",
]


def make_state(summaries: dict | None = None) -> DocState:
    text, chunks, pos = "", [], 0
    for i, piece in enumerate(CHUNKS):
        piece = piece + (" " if i < len(CHUNKS) - 1 else "")
        chunks.append(Chunk(f"doc:s{i:05d}", "doc", i, i, i * 20, (i + 1) * 20, pos, pos + len(piece), piece))
        text += piece
        pos += len(piece)
    sections = [Section(f"doc:m{i:04d}", "doc", i, i, i + 1, i * 20, (i + 1) * 20, c.char_start, c.char_end)
                for i, c in enumerate(chunks)]
    doc = DocState("doc", "The Mill", text, 60, chunks, sections)
    doc.summaries = summaries or {
        "doc:summary:global": "A village mill survives a flood: the barley is saved and a new wheel is made.",
        "doc:m0000:summary": "Agnes counts the barley.", "doc:m0001:summary": "The river floods the store.",
        "doc:m0002:summary": "The smith forges a wheel.",
    }
    return doc


def cfg(*overrides):
    return load_config(SynthConfig, "tiny", ["checks.enabled=true", "grounding.on_ungrounded=drop", *overrides])


def item(key, qtype, chunks=(0,), kind="hierarchical", parent="", order=0.0):
    ev = [f"doc:s{i:05d}" for i in chunks] if qtype not in ("global", "thematic") else \
        ["doc:summary:global", "doc:m0000:summary", "doc:m0001:summary", "doc:m0002:summary"]
    return PlannedQA(key, kind, qtype, ev, order, section=chunks[0] if chunks else -1, parent=parent)


def answer(q, a, quote):
    return {"question": q, "answer": a, "evidence_quote": quote}


def assemble(doc, *overrides):
    asm = QAAssembler(cfg(*overrides))
    doc_qa, records = asm.assemble(doc)
    return asm, doc_qa, {r.qa_id.split(":")[1]: r for r in records}


def test_a_correct_quote_with_a_wrong_answer_is_unsupported():
    doc = make_state()
    doc.plan = [item("h000", "chunk", (0,)), item("h001", "chunk", (0,), order=1)]
    quote = "counted forty sacks of barley in the loft"
    doc.answers = {"h000": answer("How many sacks did Agnes count?", "Agnes counted forty sacks of barley.", quote),
                   "h001": answer("What did Agnes count in the loft?", "Golden crowns hidden by pirates.", quote)}
    asm, _, recs = assemble(doc)
    assert set(recs) == {"h000", "sum-global"}
    assert asm.dropped["unsupported_dropped"] == 1
    by_type = asm.grounding.to_dict()["by_type"]["chunk"]
    assert by_type["grounded"] == 2 and by_type["answer_supported"] == 1  # quote grounding and support apart
    assert recs["h000"].answer_support == 1.0 and recs["h000"].grounding_basis == "document"
    # negative control: without the support floor the wrong answer passes on its quote alone
    _, _, recs = assemble(doc, "grounding.min_answer_support=0")
    assert "h001" in recs


def test_a_global_quote_copied_from_a_summary_is_summary_based_not_exact():
    doc = make_state()
    doc.plan = [item("h000", "global", ()), item("h001", "global", (), order=0.1)]
    doc.answers = {
        "h000": answer("How does the mill survive the flood?", "The barley is saved and a new wheel is made.",
                       "the barley is saved and a new wheel is made"),           # only in the summary
        "h001": answer("Who forged the new wheel for the mill?", "Thomas the smith forged the new wheel.",
                       "Thomas the smith forged a new wheel for the mill"),     # in the document itself
    }
    asm, _, recs = assemble(doc)
    assert recs["h000"].grounding_basis == "summary" and recs["h001"].grounding_basis == "document"
    stats = asm.grounding.to_dict()
    assert stats["by_reason"]["summary_exact"] == 1 and stats["by_reason"]["exact"] == 1
    assert stats["by_type"]["global"]["summary_based"] == 1 and stats["by_type"]["global"]["document_based"] == 1


def test_multi_hop_needs_quotes_from_two_chunks():
    doc = make_state()
    multi = dict(kind="diverse", chunks=(0, 1, 2))
    doc.plan = [item("d000", "multi_hop", **multi), item("d001", "multi_hop", **multi, order=1)]
    q = "What happened to the barley Agnes counted after the river rose?"
    a = "Agnes counted forty sacks of barley, and after the flood the villagers carried the grain to the church."
    doc.answers = {
        "d000": {"question": q, "answer": a, "evidence_quotes": ["counted forty sacks of barley in the loft"]},
        "d001": {"question": q + " ", "answer": a, "evidence_quotes": [
            "counted forty sacks of barley in the loft", "the villagers carried the grain to the church"]},
    }
    asm, _, recs = assemble(doc, "qa.duplicate_threshold=100")
    assert "d000" not in recs and "d001" in recs
    assert asm.grounding.to_dict()["by_reason"] == {"single_chunk": 1, "multi_chunk": 1}
    assert recs["d001"].evidence_quotes[1] == "the villagers carried the grain to the church"


def test_a_followup_leaves_with_its_dropped_parent():
    doc = make_state()
    doc.plan = [item("h000", "chunk", (1,)), item("h001", "chunk", (2,), order=2),
                item("f000", "followup", (1,), parent="h000", order=1.001),
                item("f001", "followup", (2,), parent="h001", order=2.001)]
    doc.answers = {
        "h000": answer("Where did the river rise?", "In March.", "a made up quote that is nowhere"),  # ungrounded
        "f000": answer("And what did they do after that?", "The villagers carried the grain to the church.",
                       "the villagers carried the grain to the church"),
        "h001": answer("What did Thomas the smith forge?", "Thomas forged a new wheel for the mill.",
                       "Thomas the smith forged a new wheel"),
        "f001": answer("How was the wheel paid for?", "With two sacks of the rescued barley.",
                       "paid for with two sacks of the rescued barley"),
    }
    asm, doc_qa, recs = assemble(doc)
    assert asm.dropped["ungrounded_dropped"] == 1 and asm.dropped["orphaned_followup"] == 1
    assert [r.qa_id for r in doc_qa.hierarchical] == ["doc:h001", "doc:f001"]  # the kept parent keeps its follow-up


def test_near_duplicate_questions_and_hidden_references():
    doc = make_state()
    doc.plan = [item("h000", "chunk", (0,)), item("h001", "chunk", (0,), order=0.1), item("h002", "chunk", (2,), order=2)]
    doc.answers = {
        "h000": answer("How many sacks of barley did Agnes count?", "Forty sacks of barley.", "counted forty sacks of barley"),
        "h001": answer("How many sacks of barley did Agnes count in the loft?", "Forty sacks of barley.",
                       "counted forty sacks of barley"),
        "h002": answer("What does this passage say about the smith?", "Thomas forged a new wheel.",
                       "Thomas the smith forged a new wheel"),
    }
    asm, _, recs = assemble(doc, "checks.hidden_references=drop")
    assert set(recs) == {"h000", "sum-global"}
    assert asm.dropped["duplicate_question"] == 1 and asm.dropped["hidden_reference"] == 1
    assert asm.grounding.to_dict()["by_type"]["chunk"]["hidden_reference"] == 1
    _, _, recs = assemble(doc, "checks.hidden_references=keep", "qa.duplicate_threshold=100")
    assert {"h001", "h002"} <= set(recs)  # negative control: kept (counted) when asked to


def test_the_judge_verdict_decides():
    doc = make_state()
    doc.plan = [item("h000", "chunk", (0,)), item("h001", "chunk", (2,), order=2)]
    doc.answers = {"h000": answer("How many sacks did Agnes count?", "Forty sacks of barley.", "counted forty sacks of barley"),
                   "h001": answer("What did Thomas forge?", "Thomas forged a new wheel.", "Thomas the smith forged a new wheel")}
    doc.judged = {"h000": True, "h001": False}
    asm, _, recs = assemble(doc, "grounding.judge=true")
    assert "h000" in recs and "h001" not in recs and recs["h000"].judge == "yes"
    assert asm.dropped["judged_unsupported_dropped"] == 1
    chunk = asm.grounding.to_dict()["by_type"]["chunk"]
    assert chunk["judge_yes"] == 1 and chunk["judge_no"] == 1


def test_summary_turns_need_support_in_their_text():
    doc = make_state(summaries={"doc:summary:global": "The passage is written in plain prose."})
    doc.plan = []
    asm, doc_qa, _ = assemble(doc)
    assert doc_qa.summaries == [] and asm.dropped["unsupported_summary"] == 1
    doc = make_state()
    doc.plan = []
    _, doc_qa, _ = assemble(doc, "concat.summary_turns=global_and_sections")
    assert [s.qtype for s in doc_qa.summaries] == ["global_summary"] + ["section_summary"] * 3
    assert doc_qa.summaries[2].question.startswith('Summarize the part of the document that begins "The river rose')
    assert [s.section_end for s in doc_qa.summaries] == [-1, 0, 1, 2]

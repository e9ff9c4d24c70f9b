"""Algorithm 1 planning: budgets, coverage, reading order, follow-ups, determinism."""

from __future__ import annotations

from collections import Counter


from ctxforge.config import load_config
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.hierarchy import DocState, RequestPlanner
from ctxforge.pipeline.records import Chunk, Section


def make_doc(n_chunks: int, per_section: int = 3, doc_id: str = "doc") -> DocState:
    words = [f"w{i}" for i in range(n_chunks * 10)]
    text = " ".join(words)
    chunks, pos = [], 0
    for i in range(n_chunks):
        piece = " ".join(words[i * 10:(i + 1) * 10]) + (" " if i < n_chunks - 1 else "")
        chunks.append(Chunk(f"{doc_id}:s{i:05d}", doc_id, i, i // per_section, i * 10, (i + 1) * 10,
                            pos, pos + len(piece), piece))
        pos += len(piece)
    sections = []
    for j in range(0, n_chunks, per_section):
        group = chunks[j:j + per_section]
        sections.append(Section(f"{doc_id}:m{j // per_section:04d}", doc_id, j // per_section, j, j + len(group),
                                group[0].token_start, group[-1].token_end, group[0].char_start, group[-1].char_end))
    return DocState(doc_id, "Title", text, n_chunks * 10, chunks, sections)


def planner(*overrides: str) -> RequestPlanner:
    cfg = load_config(SynthConfig, "qwen72b-vllm", list(overrides))
    return RequestPlanner(cfg, lambda text: len(text.split()))


def fill_summaries(p: RequestPlanner, doc: DocState) -> None:
    for c in doc.chunks:
        doc.summaries[doc.chunk_summary_id(c.index)] = f"summary of chunk {c.index}"
    for s in doc.sections:
        doc.summaries[doc.section_summary_id(s.index)] = f"summary of section {s.index}"
    doc.summaries[doc.global_id] = "global summary"


def ask_all(p: RequestPlanner, doc: DocState) -> list:
    """Every QA and follow-up request of the plan, round by round, each answered at once."""
    asked = []
    while True:
        reqs = p.qa_requests(doc) + p.followup_requests(doc)
        if not reqs:
            return asked
        for r in reqs:
            p.record(doc, r.key, {"question": f"Q {r.key}?", "answer": "A.", "evidence_quote": "w1 w2"})
        asked.extend(reqs)


def test_fixed_budgets_per_document():
    p = planner()
    doc = make_doc(30)
    fill_summaries(p, doc)
    p.make_plan(doc)
    kinds = Counter(item.kind for item in doc.plan)
    assert kinds == {"hierarchical": 25, "diverse": 50}
    qtypes = Counter(item.qtype for item in doc.plan if item.kind == "hierarchical")
    assert qtypes["followup"] == 7 and qtypes["global"] >= 1
    first = p.qa_requests(doc)
    assert 0 < len(first) < 25 - 7 + 50  # repeated questions over the same evidence wait for the one before
    for r in first:
        p.record(doc, r.key, {"question": f"Q {r.key}?", "answer": "A.", "evidence_quote": "w1 w2"})
    keys = [r.key for r in first + ask_all(p, doc)]
    assert len(keys) == len(set(keys)) == 75  # the whole budget, each question asked once


def test_every_section_reached_in_a_long_document():
    # 45 small chunks in 15 sections, default budgets: 2 global + 8 section + 8 chunk base questions
    p = planner()
    doc = make_doc(45)
    p.make_plan(doc)
    base = [i for i in doc.plan if i.qtype in ("section", "chunk")]
    reached = {i.section for i in base}
    assert reached == set(range(15))
    assert {9, 11, 13} <= {i.section for i in base if i.qtype == "chunk"}  # the back half gets chunk questions
    # fewer questions than sections: spread over the whole document, not packed at its start
    p = planner("qa.hierarchical_per_document=6", "qa.followup_ratio=0")
    doc = make_doc(60)
    p.make_plan(doc)
    sections = sorted(i.section for i in doc.plan if i.qtype in ("section", "chunk"))
    assert len(sections) == 5 and sections[0] <= 2 and sections[-1] >= 17


def test_repeated_question_sees_the_questions_already_asked():
    p = planner("qa.diverse_type_weights={local_specific: 1.0}", "qa.hierarchical_per_document=1")
    doc = make_doc(1)
    fill_summaries(p, doc)
    p.make_plan(doc)
    first = p.qa_requests(doc)
    assert [r.key for r in first if r.key.startswith("d")] == ["d000"]  # the other 49 wait for it
    p.record(doc, "d000", {"question": "Who carried the lantern?", "answer": "A.", "evidence_quote": "q"})
    second = [r for r in p.qa_requests(doc) if r.key.startswith("d")]
    assert [r.key for r in second] == ["d001"]
    prompt = second[0].messages[-1]["content"]
    assert "already asked" in prompt and "- Who carried the lantern?" in prompt
    assert "already asked" not in first[-1].messages[-1]["content"]


def test_prompts_ask_for_self_contained_questions_and_state_the_limits():
    p = planner("limits.answer_chars=777")
    doc = make_doc(12)
    fill_summaries(p, doc)
    doc.summaries = {k: "the miller counts sacks" for k in doc.summaries}
    p.make_plan(doc)
    reqs = ask_all(p, doc)
    assert {r.meta["qtype"] for r in reqs} >= {"global", "section", "chunk", "followup", "thematic"}
    for r in reqs:
        user = r.messages[-1]["content"]
        assert "of 4" not in user and "section 2" not in user.lower()  # no hidden structure shown as a reference
        assert 'do not say "the\n  passage"' in user or 'do not say "the passage"' in user
        assert "777 characters" in user and '"..."' not in user
    multi = [r for r in reqs if r.meta["qtype"] == "multi_hop"]
    assert all(r.schema["properties"]["evidence_quotes"]["minItems"] == 2 for r in multi)


def test_every_section_reached_and_reading_order():
    p = planner()
    doc = make_doc(24)  # 8 sections; the 18 base questions cover all of them
    p.make_plan(doc)
    base = [i for i in doc.plan if i.kind == "hierarchical" and i.qtype != "followup"]
    assert {i.section for i in base if i.qtype in ("section", "chunk")} == set(range(8))
    assert [i.order for i in base] == sorted(i.order for i in base)
    assert base[0].qtype == "global"
    # within a section, the section question comes before its chunk questions
    for j in range(8):
        in_sec = [i.qtype for i in base if i.section == j]
        if "section" in in_sec:
            assert in_sec[0] == "section"


def test_followups_attach_to_answered_parents_only():
    p = planner()
    doc = make_doc(12)
    fill_summaries(p, doc)
    p.make_plan(doc)
    follow = [i for i in doc.plan if i.qtype == "followup"]
    assert follow and all(f.parent.startswith("h") for f in follow)
    assert p.followup_requests(doc) == []  # no parent answered yet
    parent = follow[0].parent
    p.record(doc, parent, {"question": "Q?", "answer": "A.", "evidence_quote": "w1 w2"})
    reqs = p.followup_requests(doc)
    assert reqs and all(r.key in {f.key for f in follow if f.parent == parent} for r in reqs)
    assert "Q?" in reqs[0].messages[-1]["content"]


def test_multi_hop_evidence_is_three_chunks_far_apart():
    p = planner("qa.diverse_type_weights={multi_hop: 1.0}")
    doc = make_doc(30)
    p.make_plan(doc)
    for item in (i for i in doc.plan if i.kind == "diverse"):
        idx = [int(e.split(":s")[1]) for e in item.evidence_ids]
        assert len(idx) == 3 and idx[0] < 10 <= idx[1] < 20 <= idx[2]


def test_short_document_falls_back_to_local_questions():
    p = planner("qa.diverse_type_weights={multi_hop: 1.0}")
    doc = make_doc(1)
    fill_summaries(p, doc)
    p.make_plan(doc)
    assert {i.qtype for i in doc.plan if i.kind == "diverse"} == {"local_specific"}
    assert len(p.qa_requests(doc)) > 0


def test_plan_is_deterministic_per_seed():
    doc_a, doc_b, doc_c = make_doc(20), make_doc(20), make_doc(20)
    planner().make_plan(doc_a)
    planner().make_plan(doc_b)
    planner("qa.seed=1").make_plan(doc_c)
    sig = lambda d: [(i.key, i.qtype, tuple(i.evidence_ids)) for i in d.plan]
    assert sig(doc_a) == sig(doc_b)
    assert sig(doc_a) != sig(doc_c)  # negative control: the seed matters


def test_single_chunk_sections_and_documents_reuse_summaries():
    p = planner()
    doc = make_doc(1)
    doc.summaries[doc.chunk_summary_id(0)] = "only chunk"
    assert p.section_summary_requests(doc) == []
    p.fill_section_summaries(doc)
    p.start_global(doc)
    assert doc.summaries[doc.global_id] == "only chunk"
    assert p.global_summary_requests(doc) == []


def test_global_summary_merges_in_rounds_when_parts_do_not_fit():
    p = planner("generator.max_model_len=1200", "generator.summary_max_tokens=300", "generator.qa_max_tokens=300")
    assert p.prompt_budget == 500
    doc = make_doc(30, per_section=1)
    for s in doc.sections:
        doc.summaries[doc.section_summary_id(s.index)] = " ".join(["word"] * 120)
    p.start_global(doc)
    rounds = 0
    while doc.global_parts:
        reqs = p.global_summary_requests(doc)
        assert all(p.count_tokens(r.messages[-1]["content"]) < 700 for r in reqs)
        p.finish_global_round(doc, {r.key: "merged " + r.key for r in reqs})
        rounds += 1
        assert rounds < 10
    assert rounds >= 2 and doc.global_id in doc.summaries


def test_request_ids_are_content_addressed():
    from ctxforge.pipeline.prompts import prompt_set_hash
    p = planner()
    doc = make_doc(3)
    a = [r.finalize("m", 0.7, 0.95, prompt_set_hash()).request_id for r in p.small_summary_requests(doc)]
    b = [r.finalize("m", 0.7, 0.95, prompt_set_hash()).request_id for r in p.small_summary_requests(doc)]
    c = [r.finalize("other-model", 0.7, 0.95, prompt_set_hash()).request_id for r in p.small_summary_requests(doc)]
    assert a == b and len(set(a)) == 3
    assert not set(a) & set(c)

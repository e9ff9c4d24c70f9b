"""Content checks on outputs that validate against their schema: each degenerate kind seen with SmolLM2 on
real text fails with its reason, a good output of the same shape passes (negative control)."""

from __future__ import annotations

import json

import pytest

from ctxforge.config import load_config
from ctxforge.generation.validation import validate
from ctxforge.pipeline.checks import check_output, is_truncated, refers_to_hidden_structure
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.hierarchy import RequestPlanner
from test_hierarchy import fill_summaries, make_doc

CHUNK = ("The miller counted forty sacks of barley in the loft, and his daughter Agnes wrote each number on the "
         "slate by the door. When the river rose in March the lower store flooded, and the sacks were carried "
         "up to the church.") * 3


@pytest.fixture(scope="module")
def planner():
    cfg = load_config(SynthConfig, "tiny", ["checks.enabled=true", "limits.summary_chars=160", "limits.answer_chars=120"])
    return RequestPlanner(cfg, lambda text: len(text.split()))


@pytest.fixture(scope="module")
def summary_request(planner):
    doc = make_doc(1)
    doc.chunks[0] = doc.chunks[0].__class__(**{**doc.chunks[0].__dict__, "text": CHUNK})
    return planner.small_summary_requests(doc)[0]


@pytest.fixture(scope="module")
def qa_request(planner):
    doc = make_doc(3)
    fill_summaries(planner, doc)
    planner.make_plan(doc)
    return next(r for r in planner.qa_requests(doc) if r.meta["qtype"] == "chunk")


GOOD_SUMMARY = "The miller counts forty sacks of barley; Agnes records them. A March flood moves the sacks to the church."


@pytest.mark.parametrize("summary, reason", [
    ("...", "placeholder:summary"),
    ("…!", "placeholder:summary"),
    ("summary", "placeholder:summary"),
    ("solid, solid, solid, solid, solid, solid, solid, solid, solid, solid", "repetitive:summary"),
    ("The passage is written in plain prose. The passage is written in plain prose. The passage is written in "
     "plain prose.", "repetitive:summary"),
    ("The passage is written in plain prose.", "unsupported:summary"),
    ("Sacks.", "too_short:summary"),
    # exactly at the 160-character cap and cut mid-word
    ("The miller counts forty sacks of barley in the loft while his daughter Agnes writes every number on the "
     "slate by the door, and then the river rises and the capt", "truncated:summary"),
    (GOOD_SUMMARY, ""),
])
def test_degenerate_summaries_fail_with_their_reason(summary_request, summary, reason):
    assert check_output(summary_request, {"summary": summary}) == reason


def qa(question="How many sacks of barley did the miller count?", answer="He counted forty sacks.",
       quote="The miller counted forty sacks of barley"):
    return {"question": question, "answer": answer, "evidence_quote": quote}


@pytest.mark.parametrize("obj, reason", [
    (qa(answer="How many sacks of barley did the miller count"), "restated_question"),
    (qa(answer=("The miller counted the sacks of barley in the loft and his daughter Agnes wrote each number on "
                "the slate by the door of the mill")[:120]), "truncated:answer"),  # cut at the 120-character cap
    (qa(question="What does this passage say about the miller?"), "hidden_reference"),
    (qa(question="What happens in section 2?"), "hidden_reference"),
    (qa(quote="..."), "placeholder:evidence_quote"),
    (qa(), ""),
    (qa(answer="Forty."), ""),  # a short answer is fine
])
def test_degenerate_answers_fail_with_their_reason(qa_request, obj, reason):
    assert check_output(qa_request, obj) == reason


def test_answer_at_the_cap_ending_a_sentence_is_not_truncated():
    assert is_truncated("x" * 117 + " end", 120)
    assert not is_truncated("x" * 116 + " end.", 120)
    assert not is_truncated("short and cut", 120)


def test_hidden_structure_references():
    for q in ("What is the main idea of the passage?", "In the text above, who speaks?", "What happens in passage 2?",
              "According to the summary, why?", "What does the first excerpt describe?"):
        assert refers_to_hidden_structure(q), q
    for q in ("Why does Laertes warn Ophelia about Hamlet?", "What passage of scripture does Hamlet quote?",
              "Which section of the army does Fortinbras lead?"):
        assert not refers_to_hidden_structure(q), q


def test_checks_can_be_switched_off_for_a_random_weight_model(summary_request):
    off = summary_request.meta["checks"].model_copy(update={"enabled": False})
    request = summary_request.__class__(**{**summary_request.__dict__, "meta": {**summary_request.meta, "checks": off}})
    assert check_output(request, {"summary": "..."}) == ""


def test_validate_hook_runs_schema_then_content_checks(qa_request):
    assert validate(qa_request, "not json", check_output) == (None, "invalid_json")
    assert validate(qa_request, json.dumps(qa(answer="How many sacks of barley did the miller count")), check_output)[1] == "restated_question"
    assert validate(qa_request, json.dumps(qa(answer="How many sacks of barley did the miller count")))[1] == ""  # no content check: schema only
    obj, reason = validate(qa_request, json.dumps(qa()), check_output)
    assert reason == "" and obj["answer"] == "He counted forty sacks."


def test_hidden_references_can_be_kept(planner):
    cfg = load_config(SynthConfig, "tiny", ["checks.enabled=true", "checks.hidden_references=keep"])
    p = RequestPlanner(cfg, lambda text: len(text.split()))
    doc = make_doc(3)
    fill_summaries(p, doc)
    p.make_plan(doc)
    req = p.qa_requests(doc)[0]
    assert check_output(req, qa(question="What does this passage say about the miller?")) == ""

"""Algorithm 1 driven through the request scheduler with an engine that answers by reading its prompt:
repeated questions run in rounds and see the earlier ones, content checks retry then fail with their
reason, and the judge pass decides which answers stay."""

from __future__ import annotations

import json
import re

from ctxforge.config import load_config
from ctxforge.generation.cache import RequestCache
from ctxforge.generation.requests import attempt_seed
from ctxforge.generation.scheduler import RequestScheduler
from ctxforge.pipeline.checks import check_output
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.document_passes import PASS_NAMES, QAAssembler, StreamingGenerator
from ctxforge.pipeline.hierarchy import RequestPlanner
from inprocess_pool import InProcessPool
from test_assemble import make_state


def reading_engine(row: dict) -> dict:
    """Summaries: "..." on a request's first attempt (a placeholder), then the first sentence of the text.
    Questions: answered by the first sentence of the text, quoting it; the question counts the questions
    already asked that its prompt lists. Judge: yes unless the answer mentions the smith."""
    user = json.loads(row["messages"])[-1]["content"]
    text = re.search(r"<text(?: 1)?>\n(.*?)\n</text", user, re.S) or re.search(r"\[1\] (.*)", user)
    sentence = text.group(1).split(". ")[0].strip().rstrip(".") + "."
    if row["schema_name"] == "summary":
        first_attempt = attempt_seed(row["request_id"], 1) == row["seed"]
        out = {"summary": "..." if first_attempt else sentence}
    elif row["schema_name"] == "judge":
        out = {"supported": "no" if "smith" in user.split("Answer:")[1] else "yes"}
    else:
        asked = len(re.findall(r"^- ", user, re.M))
        quote = sentence.rstrip(".")
        out = {"question": f"Which event about {sentence.split()[0]} is told here ({asked})?", "answer": sentence}
        out.update({"evidence_quotes": [quote, quote]} if row["schema_name"] == "qa_multi"
                   else {"evidence_quote": quote})
    return {"output_text": json.dumps(out), "prompt_tokens": 10, "completion_tokens": 5, "error": ""}


def test_rounds_checks_and_judge_through_the_scheduler(tmp_path):
    cfg = load_config(SynthConfig, "tiny", [
        "checks.enabled=true", "grounding.judge=true", "grounding.on_ungrounded=drop", "generator.max_attempts=3",
        "qa.hierarchical_per_document=4", "qa.diverse_per_document=6", "qa.duplicate_threshold=100",
        "qa.diverse_type_weights={local_specific: 1.0}",
        "limits.question_chars=200", "limits.answer_chars=300", "limits.quote_chars=200", "limits.summary_chars=300"])
    planner = RequestPlanner(cfg, lambda text: len(text.split()))
    scheduler = RequestScheduler(InProcessPool(reading_engine), RequestCache(tmp_path / "c.sqlite"), cfg.generator, "m",
                                 planner.prompts.hash, PASS_NAMES, content_check=check_output)
    doc = make_state(summaries={})
    StreamingGenerator(planner, scheduler, max_documents=1).run([doc], lambda rank, state: None)
    stats = {name: s.to_dict() for name, s in scheduler.finish().items()}
    # the "..." summaries failed their check and were retried with a new seed; all ended ok
    assert stats["summary_small"]["failed_attempts_by_reason"] == {"placeholder:summary": 3}  # one per chunk
    assert stats["summary_small"]["failed"] == 0 and stats["summary_small"]["ok"] == 3
    # every planned question was asked once, repeated ones in later rounds, listing the questions before them
    asked = sorted(doc.answers)
    assert asked == sorted(item.key for item in doc.plan)
    repeated = [item for item in doc.plan if item.after]
    assert repeated and all(f"({_chain(doc, item)})?" in doc.answers[item.key]["question"] for item in repeated)
    # the judge saw every answer; those about the smith were judged unsupported and dropped
    assert stats["judge"]["requests"] == len(doc.answers)
    assert any(v is False for v in doc.judged.values()) and any(doc.judged.values())
    asm = QAAssembler(cfg)
    _, records = asm.assemble(doc)
    assert asm.dropped["judged_unsupported_dropped"] > 0
    assert records and all(r.judge == "yes" for r in records if r.kind != "summary")


def _chain(doc, item) -> int:
    """How many questions came before this one over the same evidence."""
    n, key = 0, item.after
    while key:
        n += 1
        key = doc.item(key).after
    return n

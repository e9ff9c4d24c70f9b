"""The optional judge pass (grounding.judge): "is this answer supported by this text?", asked of the generator.

A quote check proves that the quote exists and lexical support that the answer's words do; neither
proves that the answer follows from the text. Users who can afford one more short request per QA
ask the same generator for a yes/no verdict (structured output, enum ["yes", "no"]). It runs after
the QA and follow-up passes, over every answered question; a "no" makes the QA unsupported, which
grounding.on_ungrounded then drops or flags. Verdicts are counted per question type in the manifest.
"""

from __future__ import annotations

from ctxforge.pipeline.prompts import judge_schema
from ctxforge.generation.requests import Request

JUDGE_MAX_TOKENS = 16  # {"supported": "yes"} and the template's end token


def judge_key(qa_key: str) -> str:
    return f"judge:{qa_key}"


def judge_requests(planner, doc) -> list[Request]:
    """One request per answered QA of the document that has no verdict yet."""
    reqs = []
    schema = judge_schema()
    for item in doc.plan:
        ans = doc.answers.get(item.key)
        if ans is None or item.key in doc.judged:
            continue
        # the evidence the question was written from (summaries for global/thematic questions)
        text = planner._clip("\n\n".join(doc.available_texts(item.evidence_ids)))
        user = planner.prompts.render("judge", text=text, question=ans["question"], answer=ans["answer"])
        reqs.append(Request("judge", doc.doc_id, judge_key(item.key), planner.prompts.messages(user), "judge", schema,
                            JUDGE_MAX_TOKENS, meta={"qtype": item.qtype}))
    return reqs


def record_verdicts(doc, got: dict[str, dict]) -> None:
    """Store the verdicts that came back ({judge key: {"supported": "yes"|"no"}}); failed ones stay unknown."""
    for item in doc.plan:
        verdict = got.get(judge_key(item.key))
        if verdict is not None:
            doc.judged[item.key] = verdict["supported"] == "yes"

"""The prompt set: every instruction the generator sees, and the JSON schemas its answers must match.

PROMPT_SET_VERSION and the templates below feed `prompt_set_hash()`, which is part of every request
id: editing a prompt changes the ids, so a rerun regenerates instead of reusing stale answers.
"""

from __future__ import annotations

import hashlib
import json

from ctxforge.pipeline.config import LimitsConfig

PROMPT_SET_VERSION = "2026-11-25.1"

SYSTEM = (
    "You are a careful annotator building reading-comprehension data from long documents. "
    "Use only the text you are given. Reply with one JSON object that matches the requested schema."
)

SUMMARY_CHUNK = (
    "Summarize the following passage from the document \"{title}\". Keep names, places, numbers, "
    "events and their order; write plain prose.\n\n<passage>\n{text}\n</passage>\n\n"
    "Reply as JSON: {{\"summary\": \"...\"}}"
)

SUMMARY_SECTION_TEXT = (
    "Summarize this section of the document \"{title}\" (section {section} of {sections}). Cover its main "
    "events, arguments and entities in order.\n\n<section>\n{text}\n</section>\n\nReply as JSON: {{\"summary\": \"...\"}}"
)

SUMMARY_SECTION_PARTS = (
    "Here are summaries of consecutive passages forming section {section} of {sections} of the document "
    "\"{title}\". Merge them into one summary of the section, keeping the order of events.\n\n{text}\n\n"
    "Reply as JSON: {{\"summary\": \"...\"}}"
)

SUMMARY_GLOBAL = (
    "Here are summaries of consecutive parts of the document \"{title}\". Write one summary of the whole "
    "{scope}: its overall subject, structure, main entities and how it develops.\n\n{text}\n\n"
    "Reply as JSON: {{\"summary\": \"...\"}}"
)

QA_RULES = (
    "Ask one question whose answer is in the text, then answer it fully. Also copy a short verbatim quote "
    "(5 to 30 words, exactly as written, no ellipsis) from the text that supports the answer. "
    "Reply as JSON: {{\"question\": \"...\", \"answer\": \"...\", \"evidence_quote\": \"...\"}}"
)

QA_GLOBAL = (
    "Below is a summary of the whole document \"{title}\", followed by summaries of its sections. Ask a "
    "high-level question about the document as a whole (its theme, structure, purpose or overall arc){variant}."
    "\n\n<summary>\n{summary}\n</summary>\n\n<sections>\n{text}\n</sections>\n\n" + QA_RULES
)

QA_SECTION = (
    "The document \"{title}\" is summarized as:\n<summary>\n{summary}\n</summary>\n\nBelow is its section "
    "{section} of {sections}. Ask a question about this section as a whole (what happens in it, its "
    "argument, how it fits the document){variant}.\n\n<text>\n{text}\n</text>\n\n" + QA_RULES
)

QA_CHUNK = (
    "The passage below comes from section {section} of the document \"{title}\", which is about:\n"
    "<context>\n{summary}\n</context>\n\nAsk a specific, detailed question about this passage (a fact, a "
    "name, a number, a quotation, a reason){variant}.\n\n<text>\n{text}\n</text>\n\n" + QA_RULES
)

QA_FOLLOWUP = (
    "A reader asked about the document \"{title}\":\nQuestion: {question}\nAnswer: {answer}\n\nAsk a natural "
    "follow-up question that goes deeper into the same part of the document, answerable from the text "
    "below{variant}.\n\n<text>\n{text}\n</text>\n\n" + QA_RULES
)

DIVERSE_INSTRUCTIONS = {
    "local_specific": "Ask a precise question about one specific detail of the passage.",
    "multi_hop": "The passages are far apart in the document. Ask a question that needs facts from at least "
                 "two of them together to answer.",
    "thematic": "Ask a question about a theme, motif or idea that runs through the whole document.",
    "comparison": "Ask a question that compares something in the first passage with something in the second.",
    "temporal_order": "Ask a question about the order of events or statements across the passages.",
    "cause_effect": "Ask a question about why something happens or what follows from it in the passage.",
    "counting": "Ask a question whose answer is a count or a number stated or derivable in the passage.",
    "entity_tracking": "Ask a question that tracks one person, place or object across the passages "
                       "(what they do or how they change).",
}

QA_DIVERSE = (
    "The following {what} come from the document \"{title}\". {instruction}{variant}\n\n{text}\n\n" + QA_RULES
)


def _bounded_string(max_chars: int) -> dict:
    # minLength 1 keeps a constrained decoder from closing a string at once; maxLength bounds the output.
    return {"type": "string", "minLength": 1, "maxLength": max_chars}


def summary_schema(limits: LimitsConfig) -> dict:
    return {
        "type": "object",
        "properties": {"summary": _bounded_string(limits.summary_chars)},
        "required": ["summary"],
        "additionalProperties": False,
    }


def qa_schema(limits: LimitsConfig) -> dict:
    return {
        "type": "object",
        "properties": {
            "question": _bounded_string(limits.question_chars),
            "answer": _bounded_string(limits.answer_chars),
            "evidence_quote": _bounded_string(limits.quote_chars),
        },
        "required": ["question", "answer", "evidence_quote"],
        "additionalProperties": False,
    }


def prompt_set_hash() -> str:
    parts = [PROMPT_SET_VERSION, SYSTEM, SUMMARY_CHUNK, SUMMARY_SECTION_TEXT, SUMMARY_SECTION_PARTS,
             SUMMARY_GLOBAL, QA_GLOBAL, QA_SECTION, QA_CHUNK, QA_FOLLOWUP, QA_DIVERSE,
             json.dumps(DIVERSE_INSTRUCTIONS, sort_keys=True)]
    return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()[:16]


def variant_note(variant: int) -> str:
    """Distinguishes repeated questions over the same evidence (and so their request ids)."""
    return "" if variant == 0 else f" (this is question {variant + 1} about it: ask about something different)"


def messages(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

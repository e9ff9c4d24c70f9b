"""Prompts, JSON schemas and seed instructions of the Self-Lengthen loop (our wording of the published recipe).

Self-instruct and judge requests are structured (JSON schema). Responses and extensions are free text
(schema None): long prose inside a JSON string fights the model's own newlines, and a small model closes
the string at its first line break (SmolLM2-135M answered `{"text": "1. Light"}`) or fills a list of
paragraphs with placeholders (`["first paragraph", "second paragraph"]`). A free-text answer cut by the
token budget is caught by the truncation check. Training samples hold exactly the text the model wrote.

The extend prompt asks to enrich, not continue (Self-Lengthen's extend_response template). The
completion step of an extension round is phrased as a chat turn (the draft, the enriched beginning, "write
the rest"): the published code prefills the assistant turn with the beginning and asks for a raw
completion, which no structured chat backend offers.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

PROMPT_SET_VERSION = "lengthen-v1"

# Subject areas drawn (seeded) into each self-instruct request, so two requests with the same examples
# still differ, and the new instructions spread over topics.
TOPICS = (
    "history", "science", "technology", "cooking", "travel", "health", "education", "business", "law",
    "the environment", "art", "music", "literature", "sport", "psychology", "philosophy", "economics",
    "architecture", "farming", "the ocean", "space", "family life", "a city", "a craft", "a festival",
    "friendship", "an invention", "a journey", "a mystery", "a historical figure", "animals", "the weather",
)

SELF_INSTRUCT = (
    "You write instructions for a writing assistant. Each instruction asks for a long, substantial piece of "
    "writing: an essay, a story, a report, a guide, a letter or a speech.\n\n"
    "Examples:\n{examples}\n\n"
    "Write one new instruction of this kind about {topic}. It must differ from the examples in subject and "
    "form, and ask for a text of several pages. Reply as JSON: {{\"instruction\": \"...\"}}"
)
JUDGE_INSTRUCTION = (
    "Is the following a clear, self-contained instruction that asks for a long piece of writing (many "
    "paragraphs)? Reply as JSON: {{\"suitable\": true}} or {{\"suitable\": false}}.\n\nInstruction: {instruction}"
)
EXTEND = (
    "Below are a writing instruction and a draft answer. Improve the draft by enriching it: expand every part "
    "with more information, concrete details, examples and description, and add subheadings where they help. "
    "Do not continue the text beyond what the draft covers, and do not repeat yourself.\n\n"
    "Instruction: {instruction}\n\nDraft:\n\n{draft}"
)
COMPLETE = (
    "Below are a writing instruction, a draft answer, and the beginning of an enriched version of that draft. "
    "Write the rest of the enriched version: continue exactly where the beginning stops, and enrich the "
    "remaining parts of the draft in the same way, up to the end of the draft. Do not repeat the beginning.\n\n"
    "Instruction: {instruction}\n\nDraft:\n\n{draft}\n\nBeginning of the enriched version:\n\n{beginning}"
)


def instruction_schema(max_chars: int) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["instruction"],
            "properties": {"instruction": {"type": "string", "minLength": 1, "maxLength": max_chars}}}


JUDGE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["suitable"],
                "properties": {"suitable": {"type": "boolean"}}}


def answer_text(answer: dict) -> str:
    """The text of a free-text answer (validation hands it over as {"text": ...}), stripped."""
    text = answer.get("text")
    return text.strip() if isinstance(text, str) else ""


def extend_prompt(instruction: str, draft: str) -> str:
    return EXTEND.format(instruction=instruction, draft=draft)


def prompt_set_hash() -> str:
    """Changes whenever a prompt, schema or topic changes, so edited prompts never reuse stale answers."""
    blob = json.dumps([PROMPT_SET_VERSION, TOPICS, SELF_INSTRUCT, JUDGE_INSTRUCTION, EXTEND, COMPLETE], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def packaged_text(name: str) -> str:
    return resources.files("ctxforge.lengthen").joinpath(name).read_text(encoding="utf-8")


def load_instructions(spec: str, packaged: str, field: str = "instruction") -> list[str]:
    """Instructions from `spec`: "builtin" (the packaged file `packaged`), a .jsonl file whose rows hold
    `field`, or a text file with one instruction per line. Raises ValueError naming the file and line."""
    if spec == "builtin":
        text, label, jsonl = packaged_text(packaged), f"ctxforge/lengthen/{packaged}", True
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"{spec}: no such file")
        text, label, jsonl = path.read_text(encoding="utf-8"), str(path), path.suffix == ".jsonl"
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{label}: line {n} is not JSON ({exc.msg})") from None
            value = row.get(field) if isinstance(row, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{label}: line {n} has no non-empty string field {field!r}")
            out.append(value.strip())
        else:
            out.append(line.strip())
    if not out:
        raise ValueError(f"{label}: no instructions")
    return out

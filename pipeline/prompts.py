"""The prompt set (a packaged, versioned YAML file the user may replace) and the JSON schemas of answers.

`load_prompt_set(path)` reads `prompts.yaml` next to this module, or the user's file given as
`generator.prompts=PATH`, and checks every template's placeholders against TEMPLATES before any work:
an unknown placeholder, a missing required one, a missing template or a stray brace is a
`PromptSetError` naming the file and the template. `PromptSet.hash` (of the parsed content, so
comments do not count) is part of every request id: an edited prompt set regenerates its answers.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ctxforge.pipeline.config import DIVERSE_TYPES, LimitsConfig

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.yaml")

_QA = {"title", "text", "summary", "rules", "self_contained", "asked"}
_RULES = {"question_chars", "answer_chars", "quote_chars"}
# template name -> (allowed placeholders, required placeholders)
TEMPLATES: dict[str, tuple[set[str], set[str]]] = {
    "system": (set(), set()),
    "summary_chunk": ({"title", "text", "max_chars"}, {"text"}),
    "summary_section_text": ({"title", "text", "max_chars"}, {"text"}),
    "summary_section_parts": ({"title", "text", "max_chars"}, {"text"}),
    "summary_global": ({"title", "scope", "text", "max_chars"}, {"text"}),
    "qa_rules": (_RULES, set()),
    "qa_rules_multi": (_RULES, set()),
    "self_contained": ({"title"}, set()),
    "asked": ({"questions"}, {"questions"}),
    "qa_global": (_QA, {"summary", "rules", "self_contained"}),
    "qa_section": (_QA, {"text", "rules", "self_contained"}),
    "qa_chunk": (_QA, {"text", "rules", "self_contained"}),
    "qa_followup": (_QA | {"question", "answer"}, {"question", "answer", "text", "rules", "self_contained"}),
    "qa_diverse": (_QA | {"what", "instruction"}, {"text", "instruction", "rules", "self_contained"}),
    "judge": ({"text", "question", "answer"}, {"text", "question", "answer"}),
}


class PromptSetError(ValueError):
    """A prompt file that cannot be used; the message names the file and the template."""


def placeholders(template: str) -> set[str]:
    """The {name} fields of a str.format template; raises ValueError on a stray brace or a field that
    is not a plain name ({0}, {a.b}, {a[0]}, {}) - those would fail or leak at format time."""
    names = set()
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{field}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} is not a plain {{name}}")
        names.add(field)
    return names


@dataclass(frozen=True)
class PromptSet:
    path: str
    version: str
    templates: dict[str, str]
    diverse_instructions: dict[str, str]
    hash: str

    def render(self, name: str, **values: object) -> str:
        return self.templates[name].format(**values)

    def messages(self, user: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.templates["system"]}, {"role": "user", "content": user}]


def _fail(path: str, what: str) -> PromptSetError:
    return PromptSetError(f"generator.prompts {path}: {what}")


@lru_cache(maxsize=8)
def _load(path: str, mtime: float) -> PromptSet:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _fail(path, f"cannot be read as YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise _fail(path, "must be a YAML mapping of template names to texts")
    unknown = sorted(set(data) - set(TEMPLATES) - {"version", "diverse_instructions"})
    if unknown:
        raise _fail(path, f"unknown template(s) {unknown}; known: {sorted(TEMPLATES)}")
    if not isinstance(data.get("version"), (str, int, float)) or not str(data.get("version")).strip():
        raise _fail(path, "needs a 'version' string")
    templates = {}
    for name, (allowed, required) in TEMPLATES.items():
        text = data.get(name)
        if not isinstance(text, str) or (not text.strip() and name != "self_contained"):
            raise _fail(path, f"template '{name}' is missing or not a text")
        try:
            used = placeholders(text)
        except ValueError as exc:
            raise _fail(path, f"template '{name}': {exc} (write literal braces as {{{{ and }}}})") from None
        if used - allowed:
            raise _fail(path, f"template '{name}' uses unknown placeholder(s) {sorted(used - allowed)}; "
                              f"allowed: {sorted(allowed) or 'none'}")
        if required - used:
            raise _fail(path, f"template '{name}' lacks required placeholder(s) {sorted(required - used)}")
        templates[name] = text.strip()
    instructions = data.get("diverse_instructions")
    if not isinstance(instructions, dict) or set(instructions) != set(DIVERSE_TYPES) \
            or not all(isinstance(v, str) and v.strip() for v in instructions.values()):
        raise _fail(path, f"'diverse_instructions' must give one text for each of {list(DIVERSE_TYPES)}")
    for qtype, text in instructions.items():
        try:
            if placeholders(text):
                raise ValueError("takes no placeholders")
        except ValueError as exc:
            raise _fail(path, f"diverse_instructions.{qtype}: {exc}") from None
    content = {"version": str(data["version"]), "templates": templates, "diverse_instructions": instructions}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return PromptSet(path, str(data["version"]), templates, dict(instructions), digest)


def load_prompt_set(path: str | None = None) -> PromptSet:
    """The packaged prompt set (path None) or the user's file, validated; cached per file and mtime."""
    p = Path(path).expanduser().resolve() if path else DEFAULT_PROMPTS
    try:
        mtime = p.stat().st_mtime
    except OSError:
        raise _fail(str(p), "does not exist") from None
    return _load(str(p), mtime)


def prompt_set_hash(path: str | None = None) -> str:
    return load_prompt_set(path).hash


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


def qa_multi_schema(limits: LimitsConfig, passages: int) -> dict:
    """A question over several evidence texts: one verbatim quote per text used, at least two."""
    return {
        "type": "object",
        "properties": {
            "question": _bounded_string(limits.question_chars),
            "answer": _bounded_string(limits.answer_chars),
            "evidence_quotes": {"type": "array", "items": _bounded_string(limits.quote_chars),
                                "minItems": 2, "maxItems": max(2, passages)},
        },
        "required": ["question", "answer", "evidence_quotes"],
        "additionalProperties": False,
    }


def judge_schema() -> dict:
    return {
        "type": "object",
        "properties": {"supported": {"type": "string", "enum": ["yes", "no"]}},
        "required": ["supported"],
        "additionalProperties": False,
    }


def answer_schemas(limits: LimitsConfig) -> dict[str, dict]:
    """The JSON schema each kind of prompt's answer must fill, keyed by the prompts that use it (the
    preflight checks that the grammar enforces every keyword of each)."""
    return {"summary_chunk/summary_section_*/summary_global": summary_schema(limits),
            "qa_global/qa_section/qa_chunk/qa_followup/qa_diverse": qa_schema(limits),
            "qa_* over several passages": qa_multi_schema(limits, 2),
            "judge": judge_schema()}

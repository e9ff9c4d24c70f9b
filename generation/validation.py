"""Output validation: the one check every generated answer goes through, whoever asked for it.

`validate(request, text, content_check)` first checks the text against the request's JSON schema
(`validate_output`: parses, matches, no blank strings; a free-text request, schema None, answers
{"text": ...}), then, when the schema holds, the client's content check (synthesis passes its
checks.py: truncation, placeholders, repetition...). A failed check is retried by the scheduler with a
new seed up to generator.max_attempts, then recorded as failed with its reason, counted per
`reason_class` in the manifest.
"""

from __future__ import annotations

import json
from typing import Callable

import jsonschema

from ctxforge.generation.requests import Request

# (request, schema-valid object) -> "" when the content is usable, else the reason it is not
ContentCheck = Callable[[Request, dict], str]

_VALIDATORS: dict[str, object] = {}


def _validator(schema: dict):
    """One checked validator per schema: jsonschema.validate checks the schema itself on every call, which
    costs ~20 ms, more than the rest of a request's handling in the driver."""
    key = json.dumps(schema, sort_keys=True)
    if key not in _VALIDATORS:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        _VALIDATORS[key] = cls(schema)
    return _VALIDATORS[key]


def validate_output(text: str, schema: dict | None) -> tuple[dict | None, str]:
    """(object, "") when text is a JSON object matching schema with non-blank strings, else (None, reason).
    A free-text request (schema None) answers {"text": the stripped text}."""
    if not text or not text.strip():
        return None, "empty_output"
    if schema is None:
        return {"text": text.strip()}, ""
    try:
        # strict=False: xgrammar's bounded strings admit raw control characters (tabs) that strict JSON rejects
        obj = json.loads(text, strict=False)
    except json.JSONDecodeError:
        return None, "invalid_json"
    err = jsonschema.exceptions.best_match(_validator(schema).iter_errors(obj))  # what jsonschema.validate raises
    if err is not None:
        where = ".".join(str(p) for p in err.absolute_path) or "object"
        return None, f"schema_mismatch:{where}:{err.validator}"
    blank = [k for k, v in obj.items() if isinstance(v, str) and not v.strip()]
    if blank:
        return None, f"blank_field:{blank[0]}"
    return {k: v.strip() if isinstance(v, str) else v for k, v in obj.items()}, ""


def validate(request: Request, text: str, content_check: ContentCheck | None = None) -> tuple[dict | None, str]:
    """The check every generated answer goes through: (object, "") when it is usable, else (None, reason).

    First the JSON schema of the request (validate_output), then, when the schema holds and the client
    gave one, its content check. Raises nothing for a bad answer (the reason says what is wrong);
    jsonschema.SchemaError when the request's own schema is not a valid JSON schema."""
    obj, reason = validate_output(text, request.schema)
    if obj is None or content_check is None:
        return obj, reason
    reason = content_check(request, obj)
    return (None, reason) if reason else (obj, "")


def reason_class(reason: str) -> str:
    """Group reasons for counting: schema_mismatch:answer:maxLength -> schema_mismatch:answer."""
    if reason.startswith("schema_mismatch:"):
        return ":".join(reason.split(":")[:2])
    if reason.startswith("engine_crash"):
        return "engine_crash"
    if reason.startswith("backend:"):
        return reason.split(" after ")[0][:80]
    return reason

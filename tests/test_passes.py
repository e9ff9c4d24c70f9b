"""The request scheduler: schema validation, retries with new seeds, failure reasons, cache skip on rerun,
identical requests asked once (an in-process stand-in answers for the engines)."""

from __future__ import annotations

import json

from ctxforge.generation.cache import RequestCache
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.requests import Request, attempt_seed
from ctxforge.generation.scheduler import RequestScheduler
from ctxforge.generation.validation import validate_output
from ctxforge.pipeline.config import LimitsConfig
from ctxforge.pipeline.prompts import qa_schema, summary_schema
from inprocess_pool import InProcessPool

SCHEMA = qa_schema(LimitsConfig())


def test_validate_output_reasons():
    good = json.dumps({"question": "Q?", "answer": "A", "evidence_quote": "a quote"})
    assert validate_output(good, SCHEMA)[1] == ""
    assert validate_output("", SCHEMA)[1] == "empty_output"
    assert validate_output('{"question": "Q?"', SCHEMA)[1] == "invalid_json"
    assert validate_output('{"question": "Q?"}', SCHEMA)[1].startswith("schema_mismatch")
    extra = json.dumps({"question": "Q", "answer": "A", "evidence_quote": "q", "x": 1})
    assert validate_output(extra, SCHEMA)[1].startswith("schema_mismatch")
    blank = json.dumps({"question": "  ", "answer": "A", "evidence_quote": "q"})
    assert validate_output(blank, SCHEMA)[1] == "blank_field:question"
    too_long = json.dumps({"summary": "x" * 5000})
    assert "maxLength" in validate_output(too_long, summary_schema(LimitsConfig()))[1]


def scripted(script: dict[str, list[str]]):
    """An engine answering by script: the request's user message (its key) -> one output per attempt
    ("!" = a transport error)."""
    def answer(row: dict) -> dict:
        key = json.loads(row["messages"])[-1]["content"]
        attempt = next(a for a in range(1, 10) if attempt_seed(row["request_id"], a) == row["seed"])
        out = script[key][min(attempt, len(script[key])) - 1]
        return {"output_text": "" if out == "!" else out, "prompt_tokens": 10, "completion_tokens": 5,
                "error": "http 500 after 8 retries" if out == "!" else ""}
    return answer


def _requests(keys):
    return [Request("qa", "doc", key, [{"role": "user", "content": key}], "qa", SCHEMA, 64) for key in keys]


def _run(script, cache, gen, keys):
    pool = InProcessPool(scripted(script))
    scheduler = RequestScheduler(pool, cache, gen, "m", "p", ("qa",))
    answers = {}
    scheduler.ask(_requests(keys), 0, lambda req, obj: answers.__setitem__(req.key, obj))
    scheduler.run()
    return answers, scheduler.finish()["qa"], pool


def test_retries_then_records_failures_and_rerun_skips_everything(tmp_path):
    ok = json.dumps({"question": "Q?", "answer": "A.", "evidence_quote": "some quote"})
    script = {"good": [ok], "fixed_on_retry": ["not json", ok],
              "always_bad": [json.dumps({"question": 1, "answer": "A", "evidence_quote": "q"})],
              "transport": ["!", "!", "!"]}
    cache = RequestCache(tmp_path / "c.sqlite")
    answers, stats, pool = _run(script, cache, GeneratorConfig(max_attempts=3), list(script))
    assert {k for k, a in answers.items() if a is not None} == {"good", "fixed_on_retry"}
    assert answers["always_bad"] is None and answers["transport"] is None   # every request got its callback
    assert stats.ok == 2 and stats.failed == 2 and stats.cache_hits == 0
    assert stats.failures == {"schema_mismatch:question": 1, "backend:http 500": 1}
    assert stats.attempt_errors["invalid_json"] == 1
    assert stats.sent == len(pool.rows) == 1 + 2 + 3 + 3   # each attempt sent once, with its own seed
    # a rerun asks nothing: finished ok and finished failed are both cached
    answers2, stats2, _ = _run(script, cache, GeneratorConfig(max_attempts=3), list(script))
    assert stats2.cache_hits == 4 and stats2.sent == 0 and answers2 == answers
    # ... unless the user asks to retry failures; then only the two failed ones go out again
    _, stats3, _ = _run(script, cache, GeneratorConfig(max_attempts=1, retry_failed=True), list(script))
    assert stats3.sent == 2 and stats3.cache_hits == 2
    assert cache.count() == {"ok": 2, "failed": 2}  # replaced, never duplicated


def test_identical_requests_are_asked_once(tmp_path):
    ok = json.dumps({"question": "Q?", "answer": "A.", "evidence_quote": "some quote"})
    answers, stats, pool = _run({"same": [ok]}, RequestCache(tmp_path / "c.sqlite"), GeneratorConfig(), ["same", "same"])
    assert stats.sent == len(pool.rows) == 1 and stats.requests == 2 and answers["same"] is not None

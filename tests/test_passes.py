"""The pass runner: schema validation, retries with new seeds, failure reasons, cache skip on rerun."""

from __future__ import annotations

import json


from ctxforge.generation.cache import RequestCache
from ctxforge.pipeline.config import LimitsConfig
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.backends.base import GeneratorBackend, batch_rows, rows_batch
from ctxforge.generation.validation import PassRunner, validate_output
from ctxforge.pipeline.prompts import qa_schema, summary_schema
from ctxforge.generation.requests import Request, attempt_seed

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


class ScriptedBackend(GeneratorBackend):
    """Answers by script: request key -> list of outputs per attempt ("!" = transport error)."""

    name = "scripted"

    def __init__(self, script: dict[str, list[str]], keys: dict[str, str]):
        super().__init__(GeneratorConfig(), "scripted")
        self.script, self.keys = script, keys
        self.calls = 0

    def apply(self, ds):
        script, keys = self.script, self.keys

        def answer(batch):
            rows = batch_rows(batch)
            for row in rows:
                key = keys[row["request_id"]]
                attempt = next(a for a in range(1, 10) if attempt_seed(row["request_id"], a) == row["seed"])
                outputs = script[key]
                out = outputs[min(attempt, len(outputs)) - 1]
                row.update(output_text="" if out == "!" else out, prompt_tokens=10, completion_tokens=5,
                           error="http 500 after 8 retries" if out == "!" else "")
            return rows_batch(rows)

        self.calls += 1
        return ds.map_batches(answer, batch_format="numpy", batch_size=2)


def _requests(keys):
    reqs = []
    for key in keys:
        r = Request("qa", "doc", key, [{"role": "user", "content": key}], "qa", SCHEMA, 64)
        reqs.append(r.finalize("m", 0.7, 0.95, "p"))
    return reqs


def test_retries_then_records_failures_and_rerun_skips_everything(ray_local, tmp_path):
    ok = json.dumps({"question": "Q?", "answer": "A.", "evidence_quote": "some quote"})
    script = {"good": [ok], "fixed_on_retry": ["not json", ok], "always_bad": [json.dumps({"question": 1, "answer": "A", "evidence_quote": "q"})],
              "transport": ["!", "!", "!"]}
    reqs = _requests(script)
    keys = {r.request_id: r.key for r in reqs}
    cache = RequestCache(tmp_path / "c.sqlite")
    backend = ScriptedBackend(script, keys)
    runner = PassRunner(backend, cache, GeneratorConfig(max_attempts=3))
    answers, stats = runner.run(reqs, "test")
    by_key = {keys[rid]: a for rid, a in answers.items()}
    assert set(by_key) == {"good", "fixed_on_retry"}
    assert stats.ok == 2 and stats.failed == 2 and stats.cache_hits == 0
    assert stats.failures == {"schema_mismatch:question": 1, "backend:http 500": 1}
    assert stats.attempt_errors["invalid_json"] == 1
    assert backend.calls == 3  # three rounds: attempts 1, 2, 3
    # a rerun asks nothing: finished ok and finished failed are both cached
    answers2, stats2 = PassRunner(ScriptedBackend(script, keys), cache, GeneratorConfig(max_attempts=3)).run(reqs, "again")
    assert stats2.cache_hits == 4 and stats2.sent == 0 and answers2 == answers
    # ... unless the user asks to retry failures; then only the two failed ones go out again
    _, stats3 = PassRunner(ScriptedBackend(script, keys), cache,
                           GeneratorConfig(max_attempts=1, retry_failed=True)).run(reqs, "retry")
    assert stats3.sent == 2 and stats3.cache_hits == 2
    assert cache.count() == {"ok": 2, "failed": 2}  # replaced, never duplicated


def test_identical_requests_are_asked_once(ray_local, tmp_path):
    ok = json.dumps({"question": "Q?", "answer": "A.", "evidence_quote": "some quote"})
    reqs = _requests(["same", "same"])
    keys = {r.request_id: r.key for r in reqs}
    runner = PassRunner(ScriptedBackend({"same": [ok]}, keys), RequestCache(tmp_path / "c.sqlite"), GeneratorConfig())
    answers, stats = runner.run(reqs, "dup")
    assert stats.sent == 1 and len(answers) == 1

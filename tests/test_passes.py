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
    # a rerun asks nothing: the cached attempts decide every request again, with the same counts
    answers2, stats2 = PassRunner(ScriptedBackend(script, keys), cache, GeneratorConfig(max_attempts=3)).run(reqs, "again")
    assert stats2.cache_hits == 4 and stats2.sent == 0 and answers2 == answers
    assert (stats2.ok, stats2.failed, stats2.failures, stats2.attempt_errors) == (
        stats.ok, stats.failed, stats.failures, stats.attempt_errors)
    # ... unless the user asks to retry failures; then only the transport failures go out again (a schema
    # failure is judged again from its cached output)
    _, stats3 = PassRunner(ScriptedBackend(script, keys), cache,
                           GeneratorConfig(max_attempts=3, retry_failed=True)).run(reqs, "retry")
    assert stats3.sent == 3 and stats3.cache_hits == 3
    assert cache.count() == {"requests": 4, "attempts": 1 + 2 + 3 + 3, "transport_failures": 3}  # replaced


def test_identical_requests_are_asked_once(ray_local, tmp_path):
    ok = json.dumps({"question": "Q?", "answer": "A.", "evidence_quote": "some quote"})
    reqs = _requests(["same", "same"])
    keys = {r.request_id: r.key for r in reqs}
    runner = PassRunner(ScriptedBackend({"same": [ok]}, keys), RequestCache(tmp_path / "c.sqlite"), GeneratorConfig())
    answers, stats = runner.run(reqs, "dup")
    assert stats.sent == 1 and len(answers) == 1


GOOD = json.dumps({"question": "Where did the ferry go?", "answer": "Across the river.", "evidence_quote": "the quote"})
WEAK = json.dumps({"question": "Where did the ferry go?", "answer": "None", "evidence_quote": "the quote"})


def _checked_requests(keys, enabled: bool):
    from ctxforge.pipeline.config import ChecksConfig

    reqs = []
    for key in keys:  # the checks are not part of the request id: the same ids whatever the rules
        r = Request("qa", "doc", key, [{"role": "user", "content": key}], "qa", SCHEMA, 64,
                    meta={"checks": ChecksConfig(enabled=enabled)})
        reqs.append(r.finalize("m", 0.7, 0.95, "p"))
    return reqs


def test_a_verdict_is_decided_from_cached_attempts_by_todays_rules():
    from ctxforge.generation.cache import Attempt
    from ctxforge.generation.verdicts import decide

    off, on = (_checked_requests(["k"], enabled)[0] for enabled in (False, True))
    cached = {1: Attempt(WEAK), 2: Attempt(GOOD)}
    assert decide(off, cached, 3, False).obj["answer"] == "None"          # checks off: the first attempt is kept
    v = decide(on, cached, 3, False)                                       # checks on: it fails, the second is kept
    assert v.obj["answer"] == "Across the river." and v.reasons == ["placeholder:answer"]
    v = decide(on, cached, 1, False)                                       # one attempt allowed: failed
    assert v.decided and v.obj is None and v.reason == "placeholder:answer"
    v = decide(on, {1: Attempt(WEAK)}, 3, False)                           # attempt 2 not cached: send it
    assert not v.decided and v.next_attempt == 2
    transport = {1: Attempt("", "http 500"), 2: Attempt(GOOD)}
    assert decide(on, transport, 3, False).reasons == ["backend:http 500"]
    assert decide(on, transport, 3, True).next_attempt == 1                # retry_failed asks it again ...
    fresh = {1: Attempt("", "http 500", fresh=True), 2: Attempt(GOOD)}
    assert decide(on, fresh, 3, True).decided                              # ... once per run


def test_changed_checks_over_a_full_cache_give_the_fresh_runs_verdicts(ray_local, tmp_path):
    script = {"weak_then_good": [WEAK, GOOD], "always_weak": [WEAK], "good": [GOOD]}

    def run(cache_name: str, enabled: bool):
        reqs = _checked_requests(script, enabled)
        keys = {r.request_id: r.key for r in reqs}
        runner = PassRunner(ScriptedBackend(script, keys), RequestCache(tmp_path / cache_name), GeneratorConfig(max_attempts=3))
        answers, stats = runner.run(reqs, "checks")
        return {keys[rid]: a["answer"] for rid, a in answers.items()}, stats

    def verdicts(result):
        answers, st = result
        return answers, st.ok, st.failed, dict(st.failures), dict(st.attempt_errors)

    fresh_off, fresh_on = run("off.sqlite", False), run("on.sqlite", True)
    # negative control: the rules matter here
    assert verdicts(fresh_off) != verdicts(fresh_on)
    assert fresh_on[0] == {"weak_then_good": "Across the river.", "good": "Across the river."}
    # checks off -> on into the same cache: what a fresh run with the checks on decides
    off_then_on = run("off.sqlite", True)
    assert verdicts(off_then_on) == verdicts(fresh_on)
    assert off_then_on[1].sent == 3 and off_then_on[1].cache_hits == 1   # attempts 2 (and 3 of always_weak) sent
    # and back: every attempt is cached now, nothing is sent, the verdicts are the fresh checks-off run's
    on_then_off = run("off.sqlite", False)
    assert verdicts(on_then_off) == verdicts(fresh_off) and on_then_off[1].sent == 0

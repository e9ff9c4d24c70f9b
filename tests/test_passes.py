"""The request scheduler: schema validation, retries with new seeds, failure reasons, cache skip on rerun,
identical requests asked once (an in-process stand-in answers for the engines)."""

from __future__ import annotations

import functools
import json

from ctxforge.generation.cache import RequestCache
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.requests import Request, attempt_seed
from ctxforge.generation.scheduler import RequestScheduler
from ctxforge.generation.validation import validate_output
from ctxforge.pipeline.checks import check_output
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


def _run(script, cache, gen, keys, requests=None, content_check=None):
    pool = InProcessPool(scripted(script))
    scheduler = RequestScheduler(pool, cache, gen, "m", "p", ("qa",), content_check=content_check)
    answers = {}
    scheduler.ask(requests or _requests(keys), 0, lambda req, obj: answers.__setitem__(req.key, obj))
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
    # a rerun asks nothing: the cached attempts decide every request again, with the same counts
    answers2, stats2, _ = _run(script, cache, GeneratorConfig(max_attempts=3), list(script))
    assert stats2.cache_hits == 4 and stats2.sent == 0 and answers2 == answers
    assert (stats2.ok, stats2.failed, stats2.failures, stats2.attempt_errors) == (
        stats.ok, stats.failed, stats.failures, stats.attempt_errors)
    # ... unless the user asks to retry failures; then only the transport failures go out again (a schema
    # failure is judged again from its cached output)
    _, stats3, _ = _run(script, cache, GeneratorConfig(max_attempts=3, retry_failed=True), list(script))
    assert stats3.sent == 3 and stats3.cache_hits == 3
    assert cache.count() == {"requests": 4, "attempts": 1 + 2 + 3 + 3, "transport_failures": 3}  # replaced


def test_identical_requests_are_asked_once(tmp_path):
    ok = json.dumps({"question": "Q?", "answer": "A.", "evidence_quote": "some quote"})
    answers, stats, pool = _run({"same": [ok]}, RequestCache(tmp_path / "c.sqlite"), GeneratorConfig(), ["same", "same"])
    assert stats.sent == len(pool.rows) == 1 and stats.requests == 2 and answers["same"] is not None


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
    from ctxforge.generation import verdicts

    off, on = (_checked_requests(["k"], enabled)[0] for enabled in (False, True))
    cached = {1: Attempt(WEAK), 2: Attempt(GOOD)}
    decide = functools.partial(verdicts.decide, content_check=check_output)
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


def test_changed_checks_over_a_full_cache_give_the_fresh_runs_verdicts(tmp_path):
    script = {"weak_then_good": [WEAK, GOOD], "always_weak": [WEAK], "good": [GOOD]}

    def run(cache_name: str, enabled: bool):
        answers, stats, _ = _run(script, RequestCache(tmp_path / cache_name), GeneratorConfig(max_attempts=3), list(script),
                                 requests=_checked_requests(script, enabled), content_check=check_output)
        return {k: a["answer"] for k, a in answers.items() if a is not None}, stats

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

"""The engine pool survives a poisoned request and a broken engine, with the fake engine's injected faults:
a request that breaks every engine it reaches is resent a bounded number of times, each time to a fresh
engine, then recorded as failed (engine_crash); an engine configuration that always breaks stops the run
with one line after a bounded number of loads; an engine that dies once by chance is replaced and every
request completes (the negative control)."""

from __future__ import annotations

import pytest

from ctxforge.generation.backends import make_backend
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.pool import EngineFailureError
from ctxforge.generation.requests import Request
from ctxforge.generation.session import Generation
from ctxforge.generation.validation import reason_class

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def requests(texts: list[str]) -> list[Request]:
    return [Request("qa", "doc", f"k{i}", [{"role": "user", "content": text}], "qa", SCHEMA, 16)
            for i, text in enumerate(texts)]


def run(tmp_path, texts: list[str], **engine_kwargs):
    """Every request through Generation's scheduler on one fake engine at a time: (answers by key, stats, counts,
    cache rows by key)."""
    gen = GeneratorConfig(backend="fake", model="fake", concurrency=1, num_cpus=0.25,
                          engine_kwargs={"slots": 2, **engine_kwargs})
    answers = {}
    with Generation.open(make_backend(gen, "fake"), gen, tmp_path / "requests.sqlite") as generation:
        scheduler = generation.scheduler("p", ("qa",))
        scheduler.ask(requests(texts), 0, lambda req, obj: answers.__setitem__(req.key, obj))
        scheduler.run()
        rows = generation.cache.db.execute("SELECT key, status, error FROM results").fetchall()
    return answers, scheduler.finish()["qa"], generation.pool.counts(), {k: (s, e) for k, s, e in rows}


def test_a_poisoned_request_fails_as_engine_crash_and_the_rest_completes(ray_local, tmp_path):
    texts = ["one", "two", "POISON three", "four", "five"]
    answers, stats, counts, rows = run(tmp_path, texts, crash_on="POISON")
    assert answers["k2"] is None and all(answers[f"k{i}"] is not None for i in (0, 1, 3, 4))
    status, error = rows["k2"]
    assert status == "failed" and error.startswith("engine_crash: EngineCrashed: fake engine broken by its request")
    assert stats.failures == {"engine_crash": 1} and stats.ok == 4
    # sent once, then resent at most max_engine_crashes_per_request (2) times, each time to a new engine
    assert counts["deaths"] == 3 and counts["replacements"] in (2, 3) and counts["loads"] == 1 + counts["replacements"]
    assert reason_class(error) == "engine_crash"


def test_an_engine_that_always_breaks_stops_the_run_in_one_line_after_bounded_loads(ray_local, tmp_path):
    with pytest.raises(EngineFailureError) as err:
        run(tmp_path, ["one", "two", "three"], crash_on="")   # every request breaks its engine
    message = str(err.value)
    assert "\n" not in message
    assert "4 engines in a row failed to load or died with no request completed" in message
    assert "last error: EngineCrashed: fake engine broken by its request" in message
    assert "engine arguments: {" in message and "'crash_on': ''" in message


def test_an_engine_that_dies_once_by_chance_is_replaced_and_every_request_completes(ray_local, tmp_path):
    answers, stats, counts, rows = run(tmp_path, ["one", "two", "three", "four"], crash_once=str(tmp_path / "died"))
    assert all(a is not None for a in answers.values()) and stats.ok == 4 and stats.failed == 0
    assert counts == {"loads": 2, "load_failures": 0, "deaths": 1, "replacements": 1}
    assert stats.lost_resent >= 1 and (tmp_path / "died").exists()


def test_crash_bounds_are_checked_together():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="one poisoned request alone would stop the run"):
        GeneratorConfig(max_engine_crashes_per_request=3, max_engine_failures_in_a_row=4)
    assert GeneratorConfig(max_engine_crashes_per_request=3, max_engine_failures_in_a_row=5)

"""The eval client against the fault-injecting fake OpenAI server: retries, bounded concurrency,
per-sample cache and resume, latency records, auth."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

from ctxforge.serve.client import EvalClient, EvalItem, ResultCache, request_key  # noqa: E402
from ctxforge.serve.eval_config import ClientConfig  # noqa: E402


def items(n: int, tag: str = "q") -> list[EvalItem]:
    return [EvalItem({"messages": [{"role": "user", "content": f"{tag} {i}"}], "max_tokens": 8},
                     {"task": "t", "index": i}, lambda pred: 100.0 if pred.startswith("{") else 0.0) for i in range(n)]


def run(server, its, cache=None, api_key=None, **cfg):
    conf = ClientConfig(**{"concurrency": 4, "max_retries": 3, "backoff_s": 0.01, "timeout_s": 10, **cfg})
    client = EvalClient(server.base_url, "m", "model-a", conf, api_key=api_key, cache=cache)
    return asyncio.run(client.run(its))


def test_transient_errors_are_retried_and_scored():
    with FakeOpenAIServer(fail_first=2, fail_with=503) as server:
        recs = run(server, items(5))
    assert [r.error for r in recs] == [None] * 5 and [r.score for r in recs] == [100.0] * 5
    assert [r.attempts for r in recs] == [3] * 5 and server.stats.by_status[503] == 10
    assert all(r.latency_s > 0 for r in recs)


def test_non_transient_errors_are_recorded_not_retried_nor_cached(tmp_path):
    cache = ResultCache(tmp_path / "c.sqlite")
    with FakeOpenAIServer(permanent=400) as server:
        recs = run(server, items(3), cache)
    assert all(r.error and "HTTP 400" in r.error and r.score is None for r in recs)
    assert server.stats.requests == 3 and len(cache) == 0


def test_gives_up_after_max_retries():
    with FakeOpenAIServer(permanent=500) as server:
        recs = run(server, items(1), max_retries=2)
    assert "gave up after 3 attempts" in recs[0].error and server.stats.requests == 3


@pytest.mark.parametrize("concurrency", [1, 3])
def test_in_flight_requests_are_bounded(concurrency):
    with FakeOpenAIServer(latency_s=0.05) as server:
        run(server, items(12), concurrency=concurrency)
    assert 1 <= server.stats.max_in_flight <= concurrency


def test_cache_resumes_an_interrupted_evaluation(tmp_path):
    cache = ResultCache(tmp_path / "c.sqlite")
    all_items = items(10)
    with FakeOpenAIServer() as server:
        first = run(server, all_items[:4], cache)       # "interrupted" after 4 samples
        assert server.stats.requests == 4
        second = run(server, all_items, cache)          # the rerun sends only the other 6
        assert server.stats.requests == 10
        third = run(server, all_items, cache)           # everything cached now
        assert server.stats.requests == 10
    assert [r.cached for r in second] == [True] * 4 + [False] * 6 and all(r.cached for r in third)
    assert [r.prediction for r in third[:4]] == [r.prediction for r in first]
    assert len(cache) == 10
    # the key is the model label + body: another model label is not served from this cache
    assert request_key("model-a", all_items[0].body) != request_key("model-b", all_items[0].body)


def test_api_key_is_sent_as_bearer():
    with FakeOpenAIServer(api_key="k-1") as server:
        ok = run(server, items(1), api_key="k-1")
        bad = run(server, items(1, tag="x"), api_key="wrong")
    assert ok[0].error is None and "HTTP 401" in bad[0].error

"""The http generator backend through the real Ray Data path, against a local fake OpenAI server."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai_server import FakeOpenAIServer, answer_for, request_key  # noqa: E402

from ctxforge.generation.config import GeneratorConfig  # noqa: E402
from ctxforge.generation.backends.base import REQUEST_COLUMNS, RESULT_COLUMNS  # noqa: E402
from ctxforge.generation.backends.http import HTTPBackend, HTTPEngine  # noqa: E402
from ctxforge.generation.pool import EnginePool  # noqa: E402

pytestmark = pytest.mark.slow

# Set before ray.init: Ray workers inherit the environment of the node they are spawned on, which is
# how a real deployment gets the key to the generator actors (never through Ray's object store).
KEY_ENV = "CTXFORGE_TEST_HTTP_KEY"
SECRET = "sk-test-5e3c1b0d9a7f"

SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string", "maxLength": 400},
        "answer": {"type": "string", "maxLength": 1200},
        "evidence_quote": {"type": "string", "maxLength": 300},
    },
    "required": ["question", "answer", "evidence_quote"],
    "additionalProperties": False,
}

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters."
)


@pytest.fixture(scope="module")
def ray_local():
    """Overrides conftest's ray_local: this one must (re)start Ray after KEY_ENV is set."""
    import ray

    os.environ[KEY_ENV] = SECRET
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    os.environ.pop(KEY_ENV, None)


def make_rows(n: int, tag: str = "") -> list[dict]:
    return [
        {
            "request_id": f"req-{tag}{i:03d}",
            "messages": json.dumps([
                {"role": "system", "content": "Answer in JSON."},
                {"role": "user", "content": f"Document {tag}{i}: {TEXT}\nAsk one question about it."},
            ]),
            "schema": json.dumps(SCHEMA),
            "schema_name": "qa",
            "max_tokens": 256,
            "temperature": 0.7,
            "top_p": 0.95,
            "repetition_penalty": 1.0,
            "seed": 1000 + i,
        }
        for i in range(n)
    ]


def run(ray, server: FakeOpenAIServer, rows: list[dict], **overrides) -> list[dict]:
    cfg = GeneratorConfig(**{
        "backend": "http", "base_url": server.base_url, "model": "fake", "api_key_env": KEY_ENV + "_UNSET",
        "concurrency": 4, "retry_base_s": 0.01, "max_retries": 3, "timeout_s": 10.0, **overrides,
    })
    pool = EnginePool(HTTPBackend(cfg, "fake"))   # the engine pool's http engine, as a run uses it
    answers, queue = {}, list(rows)
    try:
        while len(answers) < len(rows):
            pool.autoscale(len(queue))
            while queue and pool.submit(queue[0], queue[0]["request_id"]):
                queue.pop(0)
            answered, lost = pool.poll(0.5)
            assert not lost
            answers.update({rid: result for rid, result in answered})
    finally:
        pool.shutdown()
    return sorted(({**row, **answers[row["request_id"]]} for row in rows), key=lambda r: r["request_id"])


def columns(engine, rows: list[dict]) -> dict[str, list]:
    """The engine's answers to `rows`, one after another, as columns (request and result fields)."""
    out = [{**row, **engine.generate(row)} for row in rows]
    return {key: [r[key] for r in out] for key in out[0]}


def key_of(row: dict) -> str:
    return request_key(json.loads(row["messages"]))


def test_all_succeed_and_validate(ray_local):
    rows = make_rows(12)
    with FakeOpenAIServer() as server:
        out = run(ray_local, server, rows)
        bodies = list(server.stats.bodies)
    assert server.stats.requests == 12
    for row, res in zip(rows, out):
        assert set(REQUEST_COLUMNS + RESULT_COLUMNS) <= set(res)
        assert {k: res[k] for k in REQUEST_COLUMNS} == row  # input columns pass through unchanged
        assert res["error"] == ""
        answer = json.loads(res["output_text"])
        jsonschema.validate(answer, SCHEMA)
        assert answer["evidence_quote"] in json.loads(row["messages"])[-1]["content"]
        assert res["prompt_tokens"] > 0 and res["completion_tokens"] > 0
    body = next(b for b in bodies if b["seed"] == 1000)
    assert body["model"] == "fake" and body["max_tokens"] == 256 and body["top_p"] == 0.95
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "qa", "schema": SCHEMA, "strict": True},
    }


def test_429_and_500_are_retried(ray_local):
    rows = make_rows(8)
    with FakeOpenAIServer(schedule=(429, 500)) as server:
        out = run(ray_local, server, rows, max_retries=3)
    assert all(r["error"] == "" for r in out)
    stats = server.stats
    assert stats.by_status[429] == 8 and stats.by_status[500] == 8 and stats.by_status[200] == 8
    assert all(stats.attempts[key_of(r)] == 3 for r in rows)


def test_permanent_500_becomes_a_failed_row(ray_local):
    rows = make_rows(6)
    bad = rows[2]["request_id"]
    with FakeOpenAIServer(permanent=500, match="Document 2:") as server:
        out = run(ray_local, server, rows, max_retries=2)
    by_id = {r["request_id"]: r for r in out}
    assert by_id[bad]["error"] == "http 500 after 2 retries"
    assert by_id[bad]["output_text"] == "" and by_id[bad]["completion_tokens"] == 0
    assert server.stats.attempts[key_of(rows[2])] == 3  # 1 + max_retries
    assert all(r["error"] == "" for r in out if r["request_id"] != bad)


def test_timeout_is_retried(ray_local):
    rows = make_rows(4)
    with FakeOpenAIServer(schedule=("timeout",), timeout_sleep_s=10.0) as server:
        out = run(ray_local, server, rows, timeout_s=1.0)
    assert all(r["error"] == "" for r in out)
    assert server.stats.faults["timeout"] == 4
    assert all(server.stats.attempts[key_of(r)] == 2 for r in rows)


def test_400_is_not_retried(ray_local):
    rows = make_rows(4)
    with FakeOpenAIServer(permanent=400) as server:
        out = run(ray_local, server, rows, max_retries=5)
    assert all(r["error"].startswith("http 400: ") and "injected 400" in r["error"] for r in out)
    assert all(r["output_text"] == "" for r in out)
    assert all(server.stats.attempts[key_of(r)] == 1 for r in rows)
    assert server.stats.requests == 4


def test_api_key_from_env_reaches_server_only(ray_local):
    rows = make_rows(4)
    with FakeOpenAIServer(api_key=SECRET) as server:
        out = run(ray_local, server, rows, api_key_env=KEY_ENV)
        assert all(r["error"] == "" for r in out)
        assert dict(server.stats.authorization) == {f"Bearer {SECRET}": 4}
        assert SECRET not in repr(out)
        assert SECRET not in json.dumps(HTTPBackend(GeneratorConfig(backend="http", base_url=server.base_url,
                                                                    api_key_env=KEY_ENV), "fake").describe())

        # Negative control: an unset variable sends no Authorization header, and 401 is not retried.
        server.stats.reset()
        out = run(ray_local, server, rows, api_key_env=KEY_ENV + "_UNSET")
    assert all(r["error"].startswith("http 401: ") for r in out)
    assert dict(server.stats.authorization) == {None: 4}


@pytest.mark.parametrize("concurrency", [1, 3])
def test_in_flight_requests_are_bounded(ray_local, concurrency):
    rows = make_rows(24)
    with FakeOpenAIServer(latency_s=0.05) as server:
        out = run(ray_local, server, rows, concurrency=concurrency)
    assert all(r["error"] == "" for r in out)
    assert server.stats.max_in_flight <= concurrency
    if concurrency > 1:
        assert server.stats.max_in_flight > 1


def test_udf_in_process_connection_drop_and_malformed_content():
    """Transport-only: a dropped connection is retried; non-JSON content passes through unvalidated
    (schema validation and its attempts belong to the pass runner)."""
    rows = make_rows(3)
    with FakeOpenAIServer(schedule=("disconnect", "malformed")) as server:
        engine = HTTPEngine(server.base_url, "fake", KEY_ENV + "_UNSET", 2, 5.0, 3, 0.01)
        out = columns(engine, rows)
    assert list(out["error"]) == ["", "", ""]
    assert all(text.startswith("Sure!") for text in out["output_text"])
    assert server.stats.faults == {"disconnect": 3, "malformed": 3}

    with FakeOpenAIServer(permanent="disconnect") as server:
        engine = HTTPEngine(server.base_url, "fake", KEY_ENV + "_UNSET", 2, 5.0, 1, 0.01)
        out = columns(engine, rows[:1])
    assert out["error"][0].startswith("connection error (") and out["error"][0].endswith("after 1 retries")


def test_fake_answers_validate_for_nested_schemas():
    schema = {
        "type": "object",
        "$defs": {"qa": {"type": "object", "properties": {"q": {"type": "string", "minLength": 3, "maxLength": 10},
                                                          "quote": {"type": "string", "maxLength": 20}},
                         "required": ["q", "quote"], "additionalProperties": False}},
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/qa"}, "minItems": 2},
                       "kind": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 3},
                       "note": {"anyOf": [{"type": "null"}, {"type": "string"}]}},
        "required": ["items", "kind", "n", "note"],
        "additionalProperties": False,
    }
    answer = answer_for(schema, TEXT)
    jsonschema.validate(answer, schema)
    assert all(item["quote"] in TEXT for item in answer["items"])


def test_synthesis_preflight_reaches_the_endpoint_before_any_work(monkeypatch, tmp_path):
    """A down or mistyped endpoint, or a refused key, is one line naming generator.base_url at preflight
    (not hours of retried requests); a live endpoint with its key passes."""
    from ctxforge.config import PreflightError, load_config
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import preflight
    from ports import free_port

    def cfg(base_url):
        return load_config(SynthConfig, "tiny", [
            "generator.backend=http", f"generator.base_url={base_url}", "generator.model=fake",
            f"generator.api_key_env={KEY_ENV}", f"output.dir={tmp_path / 'out'}"])

    monkeypatch.setenv(KEY_ENV, "sk-right")
    down = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(PreflightError, match=rf"generator.base_url: cannot reach {down}/models: Connect"):
        preflight(cfg(down))
    with FakeOpenAIServer(api_key="sk-other") as server:
        with pytest.raises(PreflightError, match=rf"refused the API key from \${KEY_ENV} \(HTTP 401\)"):
            preflight(cfg(server.base_url))
    with FakeOpenAIServer(api_key="sk-right") as server:
        preflight(cfg(server.base_url))                       # negative control: a live endpoint passes
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PreflightError, match="output.dir .*a-file' is a file, not a directory"):
        preflight(load_config(SynthConfig, "tiny", [f"output.dir={tmp_path / 'a-file'}"]))
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(PreflightError, match="input.path .*empty' holds no files"):
        preflight(load_config(SynthConfig, "tiny", [f"input.path={tmp_path / 'empty'}"]))

"""End to end: the served tiny model evaluated on RULER + InfiniteBench, two models side by side,
report files written, and a rerun served entirely from the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ports import free_port

from ctxforge.serve import ruler_metrics as rm
from ctxforge.serve.config import EvalConfig

FIXTURES = Path(__file__).parent / "fixtures"
API_KEY = "e2e-key"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def endpoint(ray_local, tiny_model_path):
    from ray import serve

    from ctxforge.serve.app import run_app
    from ctxforge.serve.config import ServeConfig

    cfg = ServeConfig(model=tiny_model_path, port=free_port(), max_model_len=4096, max_ongoing_requests=8,
                      app_name="test-eval-e2e")
    yield run_app(cfg, api_key=API_KEY)
    serve.shutdown()


def _config(endpoint, tiny_model_path, out_dir) -> EvalConfig:
    return EvalConfig.model_validate({
        "output_dir": str(out_dir),
        "models": [{"name": "base", "model": tiny_model_path, "base_url": endpoint},
                   {"name": "trained", "model": tiny_model_path, "base_url": endpoint}],
        "ruler": {"tasks": ["niah_single_2", "vt", "qa_1"], "lengths": [1024, 2048], "num_samples": 3,
                  "depths": [10, 50, 90], "squad_path": str(FIXTURES / "ruler_squad_v2_mini.json")},
        "infinitebench": {"enabled": True, "data_dir": str(FIXTURES / "infinitebench"), "num_samples": 1,
                          "tasks": ["passkey", "kv_retrieval", "longbook_choice_eng", "code_run"]},
        "client": {"concurrency": 8, "max_retries": 2, "timeout_s": 300},
        "references": [{"name": "published-row", "benchmark": "ruler", "scores": {"1024": 90.0, "2048": 80.0}}],
    })


@pytest.fixture(scope="module")
def evaluated(endpoint, tiny_model_path, tmp_path_factory):
    from ctxforge.serve.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval")
    cfg = _config(endpoint, tiny_model_path, out)
    results = evaluate(cfg, api_keys={"base": API_KEY, "trained": API_KEY}, config_label="e2e")
    return cfg, out, results


def test_report_files_are_written(evaluated):
    _, out, _ = evaluated
    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["models"]) == {"base", "trained"}
    md = (out / "report.md").read_text()
    assert "| model | 1K | 2K | Avg. |" in md and "base (RULER (3 of 13 tasks))" in md
    assert "published-row (reference)" in md and "## InfiniteBench" in md
    assert "| qa_1 |" in md and "| model | passkey | kv_retrieval | longbook_choice_eng | code_run | Avg. |" in md
    assert "| **mean** |" in md
    for name in ("niah_heatmap_base.png", "niah_heatmap_trained.png", "ruler_tasks_vs_length.png", "ruler_average_vs_length.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_request_scored_with_latency_and_matching_prompt_size(evaluated):
    _, out, results = evaluated
    for name in ("base", "trained"):
        m = results["models"][name]
        assert m["requests"] == {"total": 3 * 2 * 3 + 4, "cached": 0, "errors": 0}
        assert m["latency"]["count"] == 22 and m["latency"]["median_s"] > 0
        recs = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert len(recs) == 22
        for r in recs:
            assert r["latency_s"] > 0 and r["prediction"] is not None
            if r["meta"]["benchmark"] == "ruler":
                # the endpoint saw exactly the prompt the generator sized with the tokenizer
                assert r["usage"]["prompt_tokens"] == r["meta"]["prompt_tokens"]
                assert r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"] <= r["meta"]["length"]
                assert r["score"] == rm.score_sample(r["meta"]["task"], r["prediction"], r["meta"]["outputs"])


def test_ruler_aggregation_and_heatmap_inputs(evaluated):
    _, _, results = evaluated
    r = results["models"]["base"]["ruler"]
    assert r["label"] == "RULER (3 of 13 tasks)" and set(r["per_length"]) == {"1024", "2048"}
    assert r["skipped"] == {} and set(r["tasks"]) == {"niah_single_2", "vt", "qa_1"}
    for n in ("1024", "2048"):
        assert r["per_length"][n] == pytest.approx(sum(r["tasks"][t][n]["score"] for t in r["tasks"]) / 3)
    assert sorted({round(d["depth"]) for d in r["niah_depth"]}) == [10, 50, 90]
    ib = results["models"]["base"]["infinitebench"]
    assert set(ib["tasks"]) == {"passkey", "kv_retrieval", "longbook_choice_eng", "code_run"}
    assert all(0 <= t["score"] <= 100 for t in ib["tasks"].values())


def test_rerun_is_served_from_the_cache(evaluated):
    from ctxforge.serve.evaluate import evaluate

    cfg, out, first = evaluated
    again = evaluate(cfg, api_keys={"base": API_KEY, "trained": API_KEY}, config_label="e2e")
    for name in ("base", "trained"):
        assert again["models"][name]["requests"]["cached"] == again["models"][name]["requests"]["total"] == 22
        assert again["models"][name]["ruler"]["per_length"] == first["models"][name]["ruler"]["per_length"]

"""Long-output evaluation in `ctxforge eval`: LonGen-style requests against an OpenAI-compatible endpoint (the
fake test server), length scores, the quality-judge plumbing, report section and plot, and a cached rerun."""

from __future__ import annotations

import json
import math

import pytest

from ctxforge.serve.eval_config import EvalConfig, LongGenConfig
from ctxforge.serve.eval_longgen import eval_constraint, longgen_items, parse_judgement
from fake_openai_server import FakeOpenAIServer


def test_eval_constraints_and_budgets(tiny_tokenizer):
    assert eval_constraint("range", 4000).text == "Write between 3000 and 5000 words."
    assert (eval_constraint("above", 2000).lower, eval_constraint("above", 2000).upper) == (2000, 3000)
    cfg = LongGenConfig(enabled=True, targets=[2000, 8000], samples=2)
    out: dict = {}
    items = longgen_items(cfg, tiny_tokenizer, 8192, out)
    assert len(items) == 2 * 4 * 2 and not out["skipped"]
    about = next(i for i in items if i.meta["type"] == "about" and i.meta["target"] == 2000)
    assert about.body["max_tokens"] == math.ceil(1.5 * 2400 * 1.6)           # 1.5 x upper bound x tokens/word
    assert all(i.body["max_tokens"] <= 8192 for i in items)                 # capped by the window
    assert about.score("word " * 2000) == 100.0 and about.score("word " * 600) == 0.0
    assert len({json.dumps(i.body, sort_keys=True) for i in items}) == len(items)


def test_judgement_parsing():
    reply = 'Sure. {"analysis": "ok", "Relevance": 8, "coherence": 6, "accuracy": 7, "consistency": 7, ' \
            '"clarity": 9, "creativity": 5, "engagement": 7}'
    assert parse_judgement(reply) == pytest.approx(7.0)
    assert math.isnan(parse_judgement("no json here"))
    assert math.isnan(parse_judgement('{"relevance": 42}'))                  # out of the 1-10 scale


def test_longgen_in_eval_against_an_endpoint(tmp_path, tiny_model_path):
    from ctxforge.serve.evaluate import evaluate
    from ctxforge.serve.preflight import preflight_eval

    with FakeOpenAIServer() as server:
        cfg = EvalConfig.model_validate({
            "output": {"dir": str(tmp_path)}, "ruler": {"enabled": False},
            "models": [{"name": "fake", "model": tiny_model_path, "base_url": server.base_url, "max_model_len": 4096}],
            "longgen": {"enabled": True, "targets": [20, 40], "samples": 1,
                        "judge": {"base_url": server.base_url, "model": "fake"}}})
        preflight_eval(cfg, {"longgen_judge": None})
        results = evaluate(cfg, {"longgen_judge": None})
        first = server.stats.requests
        lg = results["models"]["fake"]["longgen"]
        assert lg["n"] == 8 and lg["errors"] == 0 and results["models"]["fake"]["requests"]["total"] == 8 and set(lg["by_type"]) == {"about", "range", "above", "below"}
        assert 0 <= lg["score"] <= 100 and lg["words"]["n"] == 8
        assert lg["quality"]["errors"] == 0 and lg["quality"]["n"] + lg["quality"]["unparsed"] == 8
        assert first == 16                                                   # 8 answers + 8 judgements
        report = (tmp_path / "report.md").read_text()
        assert "## Long-output generation" in report and (tmp_path / "plots" / "longgen_lengths.png").is_file()
        again = evaluate(cfg, {"longgen_judge": None})
        assert server.stats.requests == first                                # all from the cache
        assert again["models"]["fake"]["longgen"]["score"] == lg["score"]

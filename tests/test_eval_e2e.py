"""End to end against one served tiny model: RULER + InfiniteBench with two models side by side, report
files written, a rerun served entirely from the cache; lm-eval through `ctxforge eval` (a multiple-choice
log-likelihood task and a generation task the test writes, their scores checked against the model
in-process); LongBench-Chat with the served model as its own judge on fixture questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ports import free_port

from ctxforge.serve import ruler_metrics as rm
from ctxforge.serve.eval_config import EvalConfig

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
        "output": {"dir": str(out_dir)},
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
        assert m["label"] == ""
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


# --- lm-evaluation-harness through ctxforge eval ------------------------------------------------------

MC_DOCS = [{"question": "Which is a colour?", "choices": ["red", "table", "seven"], "label": 0},
           {"question": "Which is a number?", "choices": ["cloud", "four", "river"], "label": 1},
           {"question": "Which is an animal?", "choices": ["stone", "song", "horse"], "label": 2},
           {"question": "Which is a season?", "choices": ["winter", "spoon", "iron"], "label": 0}]
GEN_DOCS = [{"question": "Name a river."}, {"question": "Name a mountain."}, {"question": "Name a city."}]


def _write_tasks(root: Path, gen_answers: list[str]) -> Path:
    tasks = root / "tasks"
    tasks.mkdir()
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (root / "gen.jsonl").write_text("".join(json.dumps(dict(d, answer=a)) + "\n" for d, a in zip(GEN_DOCS, gen_answers)))
    (tasks / "ctx_mc.yaml").write_text(f"""task: ctx_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    (tasks / "ctx_gen.yaml").write_text(f"""task: ctx_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")
    return tasks


def _loglikelihood(lm, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as lm-eval scores it (its _encode_pair: encode the whole, split)."""
    import torch

    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    with torch.inference_mode():
        logp = torch.log_softmax(lm(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


@pytest.fixture(scope="module")
def lmeval_run(endpoint, tiny_model_path, tiny_tokenizer, tmp_path_factory):
    pytest.importorskip("lm_eval")
    import httpx

    from ctxforge.serve.evaluate import evaluate
    from ctxforge.serve.preflight import preflight_eval

    root = tmp_path_factory.mktemp("lmeval")
    # what the endpoint answers to the generation prompts (greedy, stop at a newline): doc 0's target is
    # exactly that, the others are not, so exact_match must come out 1/3
    first = httpx.post(endpoint + "/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60, json={
        "prompt": tiny_tokenizer.encode("Q: Name a river.\nA:", add_special_tokens=False), "max_tokens": 6,
        "temperature": 0, "stop": ["\n"], "seed": 1234}).json()["choices"][0]["text"]
    tasks = _write_tasks(root, [first, first + " (not this)", "no such answer"])
    cfg = EvalConfig.model_validate({
        "output": {"dir": str(root / "out")}, "models": [{"name": "tiny", "model": tiny_model_path, "base_url": endpoint}],
        "ruler": {"enabled": False},
        "lmeval": {"enabled": True, "tasks": ["ctx_mc", "ctx_gen"], "include_path": str(tasks), "batch_size": 4,
                   "builtin_tasks": False,
                   "concurrency": 2}})
    preflight_eval(cfg, {"tiny": API_KEY})
    return cfg, root, first, evaluate(cfg, api_keys={"tiny": API_KEY}, config_label="lmeval")


def test_lm_eval_multiple_choice_loglikelihood_equals_the_models(lmeval_run, tiny_model_path, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    _, root, _, results = lmeval_run
    got = results["models"]["tiny"]["lmeval"]["tasks"]["ctx_mc"]["acc,none"]
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    torch.set_num_threads(1)
    right = 0
    for doc in MC_DOCS:
        context = f"Question: {doc['question']}\nAnswer:"
        scores = [_loglikelihood(lm, tiny_tokenizer, context, " " + c) for c in doc["choices"]]
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert got == pytest.approx(right / len(MC_DOCS))
    assert results["models"]["tiny"]["lmeval"]["n_samples"]["ctx_mc"] == 4


def test_lm_eval_generation_task_through_the_endpoint(lmeval_run):
    cfg, root, first, results = lmeval_run
    lmeval = results["models"]["tiny"]["lmeval"]
    assert first.strip() and lmeval["tasks"]["ctx_gen"]["exact_match,none"] == pytest.approx(1 / 3)
    md = (root / "out" / "report.md").read_text()
    assert "## lm-evaluation-harness" in md and "| ctx_gen | exact_match,none | 33.33 |" in md
    assert (root / "out" / "plots" / "lmeval.png").read_bytes()[:4] == b"\x89PNG"
    assert list((root / "out" / "tiny" / "lmeval").glob("requests*"))  # lm-eval's request cache: reruns resume


def test_lm_eval_preflight_names_unknown_tasks_and_missing_data(lmeval_run, tmp_path):
    from ctxforge.config import PreflightError
    from ctxforge.serve.preflight import preflight_eval

    cfg, root, _, _ = lmeval_run
    bad = cfg.model_copy(deep=True)
    bad.lmeval.tasks = ["ctx_mc", "no_such_task"]
    with pytest.raises(PreflightError, match=r"lmeval.tasks: unknown task\(s\) \['no_such_task'\]"):
        preflight_eval(bad, {"tiny": API_KEY})
    moved = tmp_path / "tasks"
    moved.mkdir()
    (moved / "ctx_mc.yaml").write_text((Path(cfg.lmeval.include_path) / "ctx_mc.yaml").read_text()
                                       .replace(str(root / "mc.jsonl"), str(tmp_path / "gone.jsonl")))
    bad = cfg.model_copy(deep=True)
    bad.lmeval.tasks, bad.lmeval.include_path = ["ctx_mc"], str(moved)
    with pytest.raises(PreflightError, match="lmeval.tasks: a task cannot load its data"):
        preflight_eval(bad, {"tiny": API_KEY})


# --- LongBench-Chat with our served model as the judge ------------------------------------------------

def test_longbench_chat_judge_flow_on_fixtures(endpoint, tiny_model_path, tmp_path):
    from ctxforge.serve.evaluate import evaluate
    from ctxforge.serve.preflight import preflight_eval

    import httpx

    data = FIXTURES / "longbench_chat"
    served_id = httpx.get(endpoint + "/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]
    cfg = EvalConfig.model_validate({
        "output": {"dir": str(tmp_path)}, "models": [{"name": "tiny", "model": tiny_model_path, "base_url": endpoint}],
        "ruler": {"enabled": False},
        "longbench_chat": {"enabled": True, "path": str(data / "test_cases.json"), "few_shots_path": str(data / "few_shots.json"),
                           "max_tokens": 12, "judge": {"base_url": endpoint, "model": served_id, "api_key_env": "X",
                                                       "structured": True, "analysis_chars": 40, "max_tokens": 120,
                                                       "max_attempts": 3}}})
    keys = {"tiny": API_KEY, "judge": API_KEY}
    preflight_eval(cfg, keys)
    results = evaluate(cfg, api_keys=keys, config_label="lbc")
    lbc = results["models"]["tiny"]["longbench_chat"]
    assert lbc["n"] == 3 and [q["idx"] for q in lbc["questions"]] == [1, 2, 3]
    rated = [q for q in lbc["questions"] if q["status"] == "ok"]
    assert rated, lbc  # the schema makes the tiny judge's rating parse
    for q in rated:
        assert q["rating"] in range(1, 11) and json.loads(q["judge_reply"])["rating"] == q["rating"]
    assert lbc["mean"] == pytest.approx(sum(q["rating"] or 0 for q in lbc["questions"]) / 3)
    assert lbc["failed"] == 3 - len(rated)
    md = (tmp_path / "report.md").read_text()
    assert "## LongBench-Chat" in md and "### Per question" in md and "| 2 | How many walnut trees" in md
    # the judge saw the reference answer and the three rated examples of its question
    preds = [json.loads(line) for line in (tmp_path / "tiny" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and all(p["meta"]["benchmark"] == "longbench_chat" for p in preds)

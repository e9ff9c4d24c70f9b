"""Generator backends: hf in-process (structured output, seeding, over-long prompts) and the vLLM
processor wiring (built on CPU without vllm; run for real only where a GPU is lent)."""

from __future__ import annotations

import json

import pytest

from ctxforge.pipeline.config import LimitsConfig
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.backends.base import REQUEST_COLUMNS, RESULT_COLUMNS
from ctxforge.generation.validation import validate_output
from ctxforge.pipeline.prompts import load_prompt_set, qa_schema


def request(seed: int, text: str = "The miller counted forty sacks of grain before dawn.", max_tokens: int = 160):
    schema = qa_schema(LimitsConfig(question_chars=60, answer_chars=80, quote_chars=40))
    return {
        "request_id": f"r{seed}", "messages": json.dumps(load_prompt_set().messages(f"Ask about: {text}")),
        "schema": json.dumps(schema), "schema_name": "qa", "max_tokens": max_tokens,
        "temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.0, "seed": seed,
    }


@pytest.fixture(scope="module")
def hf_udf(tiny_model_path):
    from ctxforge.generation.backends.hf import HFEngine
    return HFEngine(tiny_model_path, device="cpu", dtype="auto", max_model_len=2048)


def columns(engine, rows: list[dict]) -> dict[str, list]:
    """The engine's answers to `rows`, one after another, as columns (request and result fields)."""
    out = [{**row, **engine.generate(row)} for row in rows]
    return {key: [r[key] for r in out] for key in out[0]}


def test_hf_structured_output_is_seeded_and_schema_shaped(hf_udf):
    out = columns(hf_udf, ([request(1), request(1), request(2)]))
    assert set(REQUEST_COLUMNS + RESULT_COLUMNS) <= set(out)
    texts = list(out["output_text"])
    assert texts[0] == texts[1]          # same seed, same text: reruns reproduce
    assert texts[0] != texts[2]          # negative control: the seed is used
    schema = json.loads(request(1)["schema"])
    for text, n in zip(texts, out["completion_tokens"]):
        # grammar-constrained: JSON-shaped from the first token; it validates unless the budget ran out
        assert text.startswith("{")
        obj, reason = validate_output(text, schema)
        assert obj is not None or reason in ("invalid_json",) and n == 160
        if obj is not None:
            assert set(obj) == {"question", "answer", "evidence_quote"}
            assert len(obj["question"]) <= 60 and len(obj["evidence_quote"]) <= 40


def test_hf_prompt_longer_than_window_is_an_error_row_not_a_crash(hf_udf):
    out = columns(hf_udf, ([request(3, text="grain " * 3000)]))
    assert out["output_text"][0] == ""
    assert out["error"][0].startswith("prompt_too_long")


def test_vllm_engine_arguments_and_sampling_on_cpu_without_vllm():
    from ctxforge.generation.backends.vllm import VLLMBackend, sampling_params

    cfg = GeneratorConfig(backend="vllm", tensor_parallel_size=4, concurrency=(1, 8), accelerator_type="H100",
                          max_model_len=32768, engine_kwargs={"gpu_memory_utilization": 0.9})
    kwargs = VLLMBackend(cfg, "/models/Qwen2.5-72B-Instruct").engine_factory().kwargs["engine_kwargs"]
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["max_model_len"] == 32768
    assert kwargs["gpu_memory_utilization"] == 0.9
    row = request(5)
    params = sampling_params(row)
    assert params["structured_outputs"] == {"json": json.loads(row["schema"])} and params["seed"] == 5
    assert "structured_outputs" not in sampling_params({**row, "schema": ""})   # free text: unconstrained


def test_vllm_engine_actor_wiring_on_cpu_without_vllm():
    """What the engine pool builds for vLLM: one placement group of tensor_parallel_size GPU bundles per
    engine (vLLM's Ray executor places its workers there), or one GPU on the actor when TP = 1."""
    from ctxforge.generation.backends.vllm import VLLMBackend, VLLMEngine, sampling_params

    tp4 = VLLMBackend(GeneratorConfig(backend="vllm", tensor_parallel_size=4, concurrency=(1, 8), accelerator_type="H100",
                                      max_model_len=32768, engine_kwargs={"gpu_memory_utilization": 0.9}), "/m/qwen72b")
    factory = tp4.engine_factory()
    assert factory.target.endswith(":VLLMEngine") and factory.kwargs["model_source"] == "/m/qwen72b"
    kw = factory.kwargs["engine_kwargs"]
    assert kw["distributed_executor_backend"] == "ray" and kw["tensor_parallel_size"] == 4
    assert kw["max_model_len"] == 32768 and kw["gpu_memory_utilization"] == 0.9 and kw["enable_prefix_caching"]
    assert factory.kwargs["slots"] == 256 and tp4.engine_range() == (1, 8) and tp4.gpus_per_engine() == 4
    assert tp4.placement_bundles() == [{"GPU": 1, "CPU": 1, "accelerator_type:H100": 0.001}] * 4
    assert tp4.actor_options() == {"num_cpus": 1, "num_gpus": 0}
    tp1 = VLLMBackend(GeneratorConfig(backend="vllm", accelerator_type="H100", requests_per_engine=64), "/m/8b")
    assert tp1.placement_bundles() is None and tp1.gpus_per_engine() == 1
    assert tp1.actor_options() == {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "H100"}
    assert tp1.engine_factory().kwargs["engine_kwargs"]["distributed_executor_backend"] == "uni"
    assert tp1.engine_factory().kwargs["slots"] == 64
    import importlib
    module, _, name = factory.target.partition(":")
    assert getattr(importlib.import_module(module), name) is VLLMEngine and VLLMEngine.is_async
    params = sampling_params(request(9))
    assert params["seed"] == 9 and params["structured_outputs"] == {"json": json.loads(request(9)["schema"])}


@pytest.mark.gpu
def test_vllm_engine_in_the_pool_generates_schema_valid_json_on_gpu(ray_local, tiny_model_path):
    pytest.importorskip("vllm")
    from ctxforge.generation.pool import EnginePool
    from ctxforge.generation.backends.vllm import VLLMBackend

    cfg = GeneratorConfig(backend="vllm", concurrency=1, max_model_len=2048,
                          engine_kwargs={"gpu_memory_utilization": 0.3, "enforce_eager": True})
    pool = EnginePool(VLLMBackend(cfg, tiny_model_path))
    pool.start()
    rows = [request(s) for s in range(4)]
    pending, answers = list(rows), []
    try:
        while len(answers) < 4:
            while pending and pool.submit(pending[0], pending[0]["request_id"]):  # False until the engine loaded
                pending.pop(0)
            got, lost = pool.poll(1.0)
            assert not lost
            answers.extend(r for _, r in got)
    finally:
        pool.shutdown()
    schema = json.loads(rows[0]["schema"])
    assert all(r["error"] == "" for r in answers)
    assert sum(validate_output(r["output_text"], schema)[0] is not None for r in answers) >= 3
    assert pool.engine_records()[0]["requests"] == 4


def test_http_payload_can_leave_out_length_bounds_for_strict_endpoints():
    from ctxforge.generation.backends.http import HTTPEngine

    row = request(7)
    with_bounds = HTTPEngine("http://127.0.0.1:9/v1", "m", "NO_SUCH_KEY_VAR", 1, 1.0, 0, 0.01)._payload(row)
    without = HTTPEngine("http://127.0.0.1:9/v1", "m", "NO_SUCH_KEY_VAR", 1, 1.0, 0, 0.01,
                               length_bounds=False)._payload(row)
    sent = json.dumps(without["response_format"])
    assert "maxLength" in json.dumps(with_bounds["response_format"])  # control: bounds are sent by default
    assert "maxLength" not in sent and "minLength" not in sent
    assert without["response_format"]["json_schema"]["schema"]["required"] == ["question", "answer", "evidence_quote"]


def test_repetition_penalty_reaches_the_request_id_and_every_backend(hf_udf):
    from ctxforge.generation.backends.http import HTTPEngine
    from ctxforge.generation.backends.vllm import sampling_params
    from ctxforge.generation.requests import Request, request_row

    def rid(**kw):
        req = Request("qa", "d", "qa:h000", [{"role": "user", "content": "x"}], "qa", {"type": "object"}, 64)
        return req.finalize("m", 0.7, 0.95, "p", **kw).request_id

    assert rid() == rid(repetition_penalty=1.0)        # off: ids of earlier runs (and their caches) stay valid
    assert rid(repetition_penalty=1.1) != rid()         # on: a different answer, a different id
    req = Request("qa", "d", "k", [{"role": "user", "content": "x"}], "qa", None, 8).finalize("m", 0.7, 0.95, "p")
    assert request_row(req, 0, 0.7, 0.95, 1.1)["repetition_penalty"] == 1.1

    row = {**request(7), "repetition_penalty": 1.1}
    assert sampling_params(row)["repetition_penalty"] == 1.1                          # vLLM SamplingParams
    udf = HTTPEngine("http://127.0.0.1:9/v1", "m", "CTXFORGE_UNSET_KEY", 1, 1.0, 0, 0.01)
    assert udf._payload(row)["repetition_penalty"] == 1.1
    assert "repetition_penalty" not in udf._payload(request(7))  # 1.0 is not sent: OpenAI's API rejects the key
    # transformers: generate() receives it (the random tiny model's flat logits would hide its effect)
    seen, generate = [], hf_udf.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("repetition_penalty"))
        return generate(*args, **kwargs)

    hf_udf.model.generate = spy
    try:
        columns(hf_udf, ([{**request(8), "max_tokens": 16}, {**request(8), "max_tokens": 16, "repetition_penalty": 1.5}]))
    finally:
        hf_udf.model.generate = generate
    assert seen == [1.0, 1.5]


def test_request_rows_keep_the_schemas_property_order(hf_udf):
    """Constrained decoders write properties in schema order: a sorted schema would make the model answer
    before it asks (answer, evidence_quote, question)."""
    from ctxforge.generation.requests import Request, request_row

    schema = qa_schema(LimitsConfig())
    req = Request("qa", "d", "k", [{"role": "user", "content": "x"}], "qa", schema, 8).finalize("m", 0.7, 0.95, "p")
    assert list(json.loads(request_row(req, 0, 0.7, 0.95)["schema"])["properties"]) == ["question", "answer", "evidence_quote"]
    out = columns(hf_udf, ([{**request(9), "schema": json.dumps(schema), "max_tokens": 24}]))
    assert out["output_text"][0].startswith('{"question": ')


def test_bounded_json_strings_admit_no_control_characters(tiny_tokenizer):
    """xgrammar's rule for a string with maxLength admits a raw tab (JSON forbids it, json.loads rejects the
    output); the compiled schema must not, bounded or not."""
    import xgrammar as xgr

    from ctxforge.structured import Grammars

    grammars = Grammars(tiny_tokenizer)
    for string in ({"type": "string", "maxLength": 5}, {"type": "string"}):
        compiled = grammars.json_schema({"type": "object", "properties": {"t": string}, "required": ["t"]})
        matcher = xgr.GrammarMatcher(compiled)
        assert matcher.accept_string('{"t": "a') and not matcher.accept_string("\t"), string
        assert xgr.GrammarMatcher(compiled).accept_string('{"t": "a b"}')  # positive control

"""The vLLM backend's Serve configuration, built without starting anything: the same ServeConfig keys on CPU
and GPU, and what each device asks Ray Serve LLM and vLLM for (bundles, executor, KV cache, prompts never
split on CPU); engine arguments that cannot work named before any engine starts. The deployment itself
runs in test_vllm_serve.py."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ctxforge.config import ConfigError
from ctxforge.serve.config import ServeConfig
from ctxforge.vllm_sizing import GiB, kv_bytes_per_token

# SmolLM2-135M-Instruct's shape (config.json): 30 layers, 9 heads of 64, 3 KV heads
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "max_position_embeddings": 8192,
           "rope_theta": 100000, "dtype": "float32"}
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture
def ckpt(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    return str(tmp_path)


def test_kv_bytes_per_token_is_the_layer_head_arithmetic():
    # 2 (K and V) x 30 layers x 3 KV heads x 64 head size x 2 bytes (vLLM serves float32 checkpoints in 16 bits)
    assert kv_bytes_per_token(SMOLLM2) == 2 * 30 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(SMOLLM2, "float32") == 46080
    with pytest.raises(ValueError, match="num_hidden_layers"):
        kv_bytes_per_token({"num_attention_heads": 9, "hidden_size": 576})


def test_cpu_engine_gets_cpu_bundles_a_bounded_kv_cache_and_unsplit_prompts(ckpt):
    from ctxforge.serve.vllm_app import build_llm_config, vllm_builder_config

    cfg = ServeConfig(model=ckpt, backend="vllm", device="cpu", max_model_len=4096, num_cpus=1.5,
                      max_ongoing_requests=4, served_model_name="smollm2")
    llm = build_llm_config(cfg, ckpt)
    assert llm["accelerator_config"] == {"kind": "cpu"} and "accelerator_type" not in llm
    assert llm["placement_group_config"] == {"bundle_per_worker": {"CPU": 1.5}, "strategy": "PACK"}
    assert llm["deployment_config"]["ray_actor_options"] == {"num_cpus": 0}
    assert llm["runtime_env"]["env_vars"] == {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    eng = llm["engine_kwargs"]
    assert eng["kv_cache_memory_bytes"] == 23040 * 4096 * 4  # 4 full windows, a whole number of MiB here
    assert eng["enable_chunked_prefill"] is False and eng["max_num_batched_tokens"] >= 4096
    assert eng["enforce_eager"] is True and eng["max_model_len"] == 4096
    assert llm["model_loading_config"] == {"model_id": "smollm2", "model_source": ckpt}
    builder = vllm_builder_config(cfg, ckpt, "digest")
    assert builder["ingress_deployment_config"] == {"ray_actor_options": {"num_cpus": 0}}
    # the same keys, sizes chosen: kv_cache_gib, eager off, more threads
    sized = build_llm_config(cfg.model_copy(update={"kv_cache_gib": 1.5, "enforce_eager": False, "num_cpus": 4}), ckpt)
    assert sized["engine_kwargs"]["kv_cache_memory_bytes"] == int(1.5 * GiB)
    assert sized["engine_kwargs"]["enforce_eager"] is False
    assert sized["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "4"
    with pytest.raises(ConfigError, match=r"kv_cache_gib 0.05 holds less than one window: max_model_len 4096 needs 0.09 GiB"):
        build_llm_config(cfg.model_copy(update={"kv_cache_gib": 0.05}), ckpt)


def test_gpu_engine_keeps_vllms_own_sizing(ckpt):
    """Negative control: the same config on cuda asks for none of the CPU settings."""
    from ctxforge.serve.vllm_app import build_llm_config, vllm_builder_config

    cfg = ServeConfig(model=ckpt, backend="vllm", device="cuda", max_model_len=4096)
    llm = build_llm_config(cfg, ckpt)
    assert "accelerator_config" not in llm and "placement_group_config" not in llm and "runtime_env" not in llm
    eng = llm["engine_kwargs"]
    assert eng["enable_chunked_prefill"] is True
    assert "kv_cache_memory_bytes" not in eng and "enforce_eager" not in eng
    assert "ingress_deployment_config" not in vllm_builder_config(cfg, ckpt, None)
    # on GPU too, kv_cache_gib bounds the cache when set
    assert build_llm_config(cfg.model_copy(update={"kv_cache_gib": 20}), ckpt)["engine_kwargs"]["kv_cache_memory_bytes"] == 20 * GiB


def test_rope_override_and_served_name_are_the_same_on_both_devices(ckpt):
    from ctxforge.serve.vllm_app import build_llm_config
    from ctxforge.train.rope import RopeConfig

    rope = RopeConfig(type="linear", factor=2.0)
    cpu, gpu = (build_llm_config(ServeConfig(model=ckpt, backend="vllm", device=d, rope=rope, served_model_name="x"), ckpt)
                for d in ("cpu", "cuda"))
    assert cpu["engine_kwargs"]["hf_overrides"] == gpu["engine_kwargs"]["hf_overrides"]
    assert cpu["engine_kwargs"]["hf_overrides"]["rope_parameters"]["factor"] == 2.0
    assert cpu["engine_kwargs"]["max_model_len"] == 16384 == gpu["engine_kwargs"]["max_model_len"]
    assert cpu["model_loading_config"] == gpu["model_loading_config"] == {"model_id": "x", "model_source": ckpt}


def test_auto_device_with_a_gpu_accelerator_type_is_cuda_and_cpu_with_one_is_refused(ckpt):
    from ctxforge.serve.vllm_app import serving_device

    assert serving_device(ServeConfig(model=ckpt, accelerator_type="H100")) == "cuda"
    with pytest.raises(ConfigError, match="accelerator_type 'H100'.*device is cpu"):
        serving_device(ServeConfig(model=ckpt, accelerator_type="H100", device="cpu"))


@pytest.mark.parametrize("kwargs, message", [
    ({"enable_chunked_prefill": True}, "engine_kwargs.enable_chunked_prefill: true splits long prompts"),
    ({"max_num_batched_tokens": 1024}, r"engine_kwargs.max_num_batched_tokens \(1024\) < max_model_len \(4096\)"),
    ({"served_model_name": "y"}, "engine_kwargs.served_model_name: set by ray.serve.llm"),
])
def test_engine_kwargs_that_cannot_work_on_cpu_are_named(ckpt, kwargs, message):
    from ctxforge.serve.vllm_app import check_engine_kwargs

    cfg = ServeConfig(model=ckpt, backend="vllm", device="cpu", max_model_len=4096, engine_kwargs=kwargs)
    with pytest.raises(ConfigError, match=message):
        check_engine_kwargs(cfg, 4096)
    if "served_model_name" not in kwargs:  # negative control: on a GPU chunked prefill is vLLM's default
        check_engine_kwargs(cfg.model_copy(update={"device": "cuda"}), 4096)


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed: unknown engine arguments are checked against vLLM's own list")
def test_unknown_engine_argument_is_named_with_the_close_match(ckpt):
    from ctxforge.serve.vllm_app import check_engine_kwargs

    cfg = ServeConfig(model=ckpt, backend="vllm", device="cpu", max_model_len=4096,
                      engine_kwargs={"max_num_seq": 8})
    with pytest.raises(ConfigError, match=r"engine_kwargs.max_num_seq: not a vLLM engine argument \(did you mean max_num_seqs"):
        check_engine_kwargs(cfg, 4096)
    check_engine_kwargs(cfg.model_copy(update={"engine_kwargs": {"max_num_seqs": 8}}), 4096)


def test_serve_preflight_names_the_engine_key(smollm2_path):
    from ctxforge.config import PreflightError
    from ctxforge.serve.preflight import preflight_serve

    cfg = ServeConfig(model=smollm2_path, backend="vllm", device="cpu", max_model_len=4096,
                      engine_kwargs={"enable_chunked_prefill": True})
    with pytest.raises(PreflightError, match="^engine_kwargs.enable_chunked_prefill"):
        preflight_serve(cfg)
    assert preflight_serve(cfg.model_copy(update={"engine_kwargs": {}})) == smollm2_path
    assert preflight_serve(cfg.model_copy(update={"backend": "hf"})) == smollm2_path  # hf ignores engine_kwargs


def test_eval_window_is_read_from_ray_serve_llm_model_cards():
    from ctxforge.serve.client import card_window

    assert card_window({"id": "m", "metadata": {"max_request_context_length": 4096}}) == 4096
    assert card_window({"id": "m", "max_model_len": 2048}) == 2048
    assert card_window({"id": "m"}) is None


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed: ray.serve.llm's LLMConfig needs it to build the engine config")
def test_ray_serve_llm_turns_the_cpu_config_into_the_mp_executor_and_cpu_bundles(ckpt):
    """What Ray Serve LLM itself derives from our dict: the executor vLLM accepts on CPU, and a placement
    group of only the engine's CPUs (the replica adds none)."""
    from ray.llm._internal.serve.core.server.llm_server import LLMServer
    from ray.serve.llm import LLMConfig

    from ctxforge.serve.vllm_app import build_llm_config

    cfg = ServeConfig(model=ckpt, backend="vllm", device="cpu", max_model_len=4096, num_cpus=0.5)
    llm = LLMConfig(**build_llm_config(cfg, ckpt))
    engine = llm.get_engine_config()
    assert engine.get_initialization_kwargs()["distributed_executor_backend"] == "mp"
    opts = LLMServer.get_deployment_options(llm)
    assert [{k: v for k, v in b.items() if v} for b in opts["placement_group_bundles"]] == [{"CPU": 0.5}]


def test_plain_rope_served_past_the_checkpoint_window_raises_only_the_position_count(ckpt, tmp_path_factory):
    """The base row of a context-extension table: vLLM, like transformers, runs plain RoPE past the trained
    window; scaled RoPE would change with max_position_embeddings, so it is refused by name."""
    from ctxforge.serve.vllm_app import build_llm_config

    within = build_llm_config(ServeConfig(model=ckpt, backend="vllm", device="cpu", max_model_len=8192), ckpt)
    assert "hf_overrides" not in within["engine_kwargs"]  # negative control: inside the window, nothing
    past = build_llm_config(ServeConfig(model=ckpt, backend="vllm", device="cpu", max_model_len=16384), ckpt)
    assert past["engine_kwargs"]["hf_overrides"] == {"max_position_embeddings": 16384}
    scaled = tmp_path_factory.mktemp("dynamic")
    (scaled / "config.json").write_text(json.dumps(
        dict(SMOLLM2, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100000})))
    with pytest.raises(ConfigError, match="max_model_len 32768 > the dynamic-scaled window"):
        build_llm_config(ServeConfig(model=str(scaled), backend="vllm", device="cpu", max_model_len=32768), str(scaled))


def test_eval_serves_its_models_with_vllm_from_the_serve_section(ckpt):
    """`ctxforge eval ... serve.backend=vllm`: each model served here gets the CPU engine config with its own
    name, window and RoPE override."""
    from ctxforge.config import load_config
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.serve.evaluate import served_here_config
    from ctxforge.serve.vllm_app import build_llm_config

    cfg = load_config(EvalConfig, "eval-smollm2", [
        "serve.backend=vllm", "serve.device=cpu", "serve.num_cpus=1", "serve.max_ongoing_requests=2",
        f"models=[{{name: base, model: {ckpt}}}, {{name: zero-shot, model: {ckpt}, rope: {{type: linear, factor: 2.0}}, max_model_len: 16384}}]"])
    base, zero = (served_here_config(cfg, m) for m in cfg.models)
    assert (base.route_prefix, zero.route_prefix) == ("/eval-base", "/eval-zero-shot")
    llm = build_llm_config(base, ckpt)
    assert llm["accelerator_config"] == {"kind": "cpu"} and llm["engine_kwargs"]["max_model_len"] == 8192
    assert llm["engine_kwargs"]["kv_cache_memory_bytes"] == 23040 * 8192 * 2
    assert llm["model_loading_config"]["model_id"] == base.model_id()
    zllm = build_llm_config(zero, ckpt)
    assert zllm["engine_kwargs"]["max_model_len"] == 16384
    assert zllm["engine_kwargs"]["hf_overrides"]["rope_parameters"]["rope_type"] == "linear"


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_building_the_vllm_app_leaves_the_drivers_logging_as_it_was(smollm2_path):
    """ray.serve.llm puts Ray's JSON formatter on the root logger when it builds an app; the console of
    `ctxforge eval`/`demo` must keep its plain lines."""
    import logging

    from ray.llm._internal.serve.observability.logging.setup import setup_logging

    from ctxforge.serve.vllm_app import build_vllm_app

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        build_vllm_app(ServeConfig(model=smollm2_path, backend="vllm", device="cpu", max_model_len=2048),
                       smollm2_path, None, 2048)
        assert root.handlers == handlers and root.level == level
        setup_logging()                                  # negative control: what it does unguarded
        assert root.handlers != handlers
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)

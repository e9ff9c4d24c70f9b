"""vLLM engine arguments per device (no vLLM import, no model load): what the engine pool asks Ray for and
passes to vLLM on CPU and on GPU, and the preflight's one-line errors naming the key."""

from __future__ import annotations

import json

import pytest

from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.backends import vllm_args
from ctxforge.generation.backends.vllm import VLLMBackend


@pytest.fixture()
def model_dir(tmp_path):
    """A model directory holding only a Llama config like SmolLM2's (30 layers, 3 KV heads of 64, 8K window)."""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "hidden_size": 576, "head_dim": 64, "max_position_embeddings": 8192}))
    return str(tmp_path)


def cpu(**kw) -> GeneratorConfig:
    return GeneratorConfig(backend="vllm", device="cpu", **{"max_model_len": 2048, **kw})


def test_cpu_engine_asks_ray_for_cpus_only_and_avoids_the_cpu_traps(model_dir):
    backend = VLLMBackend(cpu(concurrency=1, num_cpus=0.5, max_model_len=2048, requests_per_engine=8), model_dir)
    assert backend.actor_options() == {"num_cpus": 0.5}          # no num_gpus: schedulable on a CPU node
    assert backend.placement_bundles() is None and backend.gpus_per_engine() == 0.0
    factory = backend.engine_factory()
    kw = factory.kwargs["engine_kwargs"]
    assert kw["enable_chunked_prefill"] is False               # seeded requests are never split
    assert kw["distributed_executor_backend"] == "mp" and kw["enforce_eager"] is True
    # 8 sequences of 2,048 tokens x 23,040 bytes a token (2 x 30 layers x 3 heads x 64 x bf16)
    assert kw["kv_cache_memory_bytes"] == 8 * 2048 * 23040
    env = factory.kwargs["env"]
    assert int(env["OMP_NUM_THREADS"]) >= 1 and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    # the same config on a GPU: only the device changes
    gpu = VLLMBackend(GeneratorConfig(backend="vllm", device="cuda", concurrency=1, max_model_len=2048), model_dir)
    gkw = gpu.engine_factory().kwargs["engine_kwargs"]
    assert gpu.actor_options()["num_gpus"] == 1 and gkw["enable_chunked_prefill"] is True
    assert gkw["distributed_executor_backend"] == "uni" and "kv_cache_memory_bytes" not in gkw
    assert "enforce_eager" not in gkw and gpu.engine_factory().kwargs["env"] == {}


def test_cpu_kv_cache_is_bounded_and_never_below_one_sequence(model_dir):
    per_seq = 2048 * 23040
    many = cpu(max_model_len=2048)   # 256 slots by default: 11.3 GiB unbounded
    assert vllm_args.cpu_kv_cache_bytes(many, model_dir, 256, memory_per_engine=16 * vllm_args.GiB) == 4 * vllm_args.GiB
    assert vllm_args.cpu_kv_cache_bytes(many, model_dir, 256, memory_per_engine=None) == 256 * per_seq
    assert vllm_args.cpu_kv_cache_bytes(many, model_dir, 256, memory_per_engine=1000) == per_seq
    assert vllm_args.cpu_kv_cache_bytes(cpu(kv_cache_gib=1.5), model_dir, 256, None) == int(1.5 * vllm_args.GiB)


def test_cpu_threads_from_config_or_from_the_nodes_cpus():
    assert vllm_args.cpu_threads(cpu(threads=3), node_cpus=2, engines_per_node=1) == 3
    assert vllm_args.cpu_threads(cpu(), node_cpus=2, engines_per_node=1) >= 1
    assert vllm_args.cpu_threads(cpu(), node_cpus=16, engines_per_node=2) > vllm_args.cpu_threads(cpu(), 16, 4)
    assert vllm_args.cpu_threads(cpu(), node_cpus=1, engines_per_node=4) == 1


@pytest.mark.parametrize("overrides, key, words", [
    ({"engine_kwargs": {"enforce_eagre": True}}, "generator.engine_kwargs.enforce_eagre", "enforce_eager"),
    ({"engine_kwargs": {"no_such_thing": 1}}, "generator.engine_kwargs.no_such_thing", "not a vLLM engine argument"),
    ({"max_model_len": 16384}, "generator.max_model_len 16384", "8192"),
    ({"tensor_parallel_size": 2}, "generator.tensor_parallel_size 2", "generator.device=cuda"),
    ({"engine_kwargs": {"distributed_executor_backend": "ray"}}, "distributed_executor_backend='ray'", "'mp'"),
    ({"engine_kwargs": {"enable_chunked_prefill": True}}, "enable_chunked_prefill", "CPU Generator does not use offset"),
    ({"engine_kwargs": {"max_model_len": 4096}}, "generator.engine_kwargs.max_model_len", "generator.max_model_len"),
])
def test_preflight_names_the_key_of_a_bad_engine_argument(model_dir, overrides, key, words):
    if "enforce_eagre" in str(overrides) or "no_such_thing" in str(overrides):
        if vllm_args.engine_arg_names() is None:
            pytest.skip("vLLM is not installed here: its argument names are not known")
    with pytest.raises(ValueError) as info:
        VLLMBackend(cpu(**overrides), model_dir).engine_factory()
    message = str(info.value)
    assert key in message and words in message and "\n" not in message


def test_valid_engine_arguments_pass_preflight(model_dir):
    # negative control of the test above: real vLLM arguments, a window that fits, TP 4 on GPUs
    VLLMBackend(cpu(max_model_len=8192, engine_kwargs={"max_num_seqs": 16, "enforce_eager": False}), model_dir).engine_factory()
    VLLMBackend(GeneratorConfig(backend="vllm", device="cuda", tensor_parallel_size=4, max_model_len=8192,
                                engine_kwargs={"gpu_memory_utilization": 0.9, "enable_chunked_prefill": True}),
                model_dir).engine_factory()



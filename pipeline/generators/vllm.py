"""The `vllm` backend: `ray.data.llm` vLLM engine processors on GPU actors.

The processor is Ray's own: chat template -> tokenize -> vLLM engine (an autoscaling actor pool,
tensor parallel inside each engine) -> detokenize. Structured outputs go through vLLM's xgrammar
backend (`sampling_params.structured_outputs = {"json": schema}`). vLLM itself is imported only
inside the engine actors, so building this stage works on a CPU machine without vllm (that is what
the CPU test checks); running it needs the `gpu` extra (`ray[llm]==2.60.0`, `vllm==0.29.0`).

Engines load once per pass: keep run.documents_per_wave large on big corpora, or serve the model
with `ray.serve.llm` once and use the http backend for multi-day jobs.
"""

from __future__ import annotations

import json

from ctxforge.pipeline.generators.base import GeneratorBackend

# The CPU stages around the engine are actor pools too; fractional CPUs keep them from starving the
# upstream read tasks (the Ray Data deadlock on small machines).
CPU_STAGE = {"enabled": True, "num_cpus": 0.25}


def _preprocess(row: dict) -> dict:
    return {
        "request_id": row["request_id"],
        "messages": json.loads(row["messages"]),
        "sampling_params": {
            "temperature": float(row["temperature"]),
            "top_p": float(row["top_p"]),
            "max_tokens": int(row["max_tokens"]),
            "seed": int(row["seed"]),
            **({"structured_outputs": {"json": json.loads(row["schema"])}} if row["schema"] else {}),
        },
        "orig_messages": row["messages"], "schema": row["schema"], "schema_name": row["schema_name"],
        "max_tokens": row["max_tokens"], "temperature": row["temperature"], "top_p": row["top_p"], "seed": row["seed"],
    }


def _postprocess(row: dict) -> dict:
    error = row.get("__inference_error__") or ""
    return {
        "request_id": row["request_id"], "messages": row["orig_messages"], "schema": row["schema"],
        "schema_name": row["schema_name"], "max_tokens": row["max_tokens"], "temperature": row["temperature"],
        "top_p": row["top_p"], "seed": row["seed"],
        "output_text": "" if error else (row.get("generated_text") or ""),
        "prompt_tokens": int(row.get("num_input_tokens") or 0),
        "completion_tokens": int(row.get("num_generated_tokens") or 0),
        "error": str(error)[:300],
    }


class VLLMBackend(GeneratorBackend):
    name = "vllm"

    def processor_config(self):
        from ray.data.llm import vLLMEngineProcessorConfig

        cfg = self.cfg
        engine_kwargs = {
            "max_model_len": cfg.max_model_len,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "enable_prefix_caching": True,   # every request of a document shares the system prompt
            "enable_chunked_prefill": True,
            **cfg.engine_kwargs,
        }
        concurrency = cfg.concurrency if isinstance(cfg.concurrency, int) else tuple(cfg.concurrency)
        return vLLMEngineProcessorConfig(
            model_source=self.model_path,
            engine_kwargs=engine_kwargs,
            batch_size=cfg.batch_size,
            concurrency=concurrency,
            accelerator_type=cfg.accelerator_type,
            # the engine's GPU bundles carry the generation node type's custom resource (Ray's default bundle + it)
            **({"placement_group_config": {"bundle_per_worker": {"CPU": 1, "GPU": 1, **cfg.resources},
                                           "strategy": "PACK"}} if cfg.resources else {}),
            should_continue_on_error=True,  # a failed row gets __inference_error__ instead of killing the job
            chat_template_stage=CPU_STAGE,
            tokenize_stage=CPU_STAGE,
            detokenize_stage=CPU_STAGE,
        )

    def build(self):
        from ray.data.llm import build_processor

        return build_processor(
            self.processor_config(), preprocess=_preprocess, postprocess=_postprocess,
            preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25},
        )

    def apply(self, ds):
        return self.build()(ds)

    def describe(self) -> dict:
        return {**super().describe(), "tensor_parallel_size": self.cfg.tensor_parallel_size,
                "concurrency": self.cfg.concurrency, "accelerator_type": self.cfg.accelerator_type}

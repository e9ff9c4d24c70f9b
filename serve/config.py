"""Config of the serve stage: one validated pydantic model each (see ctxforge.config).

`ServeConfig` describes one served checkpoint (a transformers deployment, or `ray.serve.llm` with vLLM on
CPU or GPU: the same keys on both, only `device` and the sizes change);
the evaluation's config is eval_config.py's `EvalConfig` (it imports this module, never the reverse). This module knows nothing about HTTP or Ray;
`checkpoint_context_length` reads a checkpoint's config.json (and an optional RoPE override) to find
the window its RoPE setup is built for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ctxforge.config import PathStr
from ctxforge.generation.config import EnginePlacement
from ctxforge.train.rope import RopeConfig, stage_rope_parameters


class ServeConfig(EnginePlacement):
    """`ctxforge serve`: the model, the HTTP endpoint, replicas, and where each engine runs (EnginePlacement's
    num_cpus, num_gpus, tensor_parallel_size, accelerator_type, resources, shared with the generator section)."""

    model: PathStr = Field("ctxforge:tiny", description="Checkpoint to serve: a model directory, a hub name (vllm), or ctxforge:tiny / ctxforge:smollm2.")
    served_model_name: str | None = Field(None, description="Model id clients send in `model` (default: the directory name, or the packaged name: `tiny` for ctxforge:tiny, `smollm2` for ctxforge:smollm2).")
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
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs (both backends): cpu, cuda, or auto = vllm: cuda when accelerator_type is set or the Ray cluster lists GPUs (before Ray starts: torch sees one), else cpu; hf: cuda when the replica's torch sees a GPU (num_gpus). cuda with no GPU possible (a local Ray on a machine without one) is refused at preflight. vllm on cpu: ray.serve.llm's accelerator_config {kind: cpu} (CPU bundles, vLLM's multiprocessing executor).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="hf backend weights dtype (auto = bf16 on GPU, fp32 on CPU).")
    kv_cache_gib: float = Field(0.0, ge=0, description="vllm: KV-cache memory per engine in GiB. 0 = on CPU, room for max_ongoing_requests sequences of the whole window (layers x KV heads x head size from config.json); on GPU, vLLM's gpu_memory_utilization share.")
    enforce_eager: bool | None = Field(None, description="vllm: run without torch.compile and CUDA graphs; null = true on CPU (compiling costs minutes per engine start there), vLLM's default on GPU.")
    engine_kwargs: dict = Field(default_factory=dict, description="vllm: extra vLLM engine arguments (merged over the ones derived here).")
    # What one request may ask of an hf replica (request_limits()).
    prompt_logprobs_max_tokens: int = Field(32768, ge=1, description="hf: longest prompt whose per-token logprobs (echo + logprobs, prompt_logprobs) are computed; longer ones get a 400 naming this key.")
    trust_request_chat_template: bool = Field(False, description="hf: render a chat template sent with a request (chat_template, chat_template_kwargs.chat_template); off = such requests get a 400 (vLLM's --trust-request-chat-template).")
    logprobs_chunk_tokens: int = Field(256, ge=1, description="hf: prompt positions whose logits exist at once while prompt logprobs are computed (memory: this x vocabulary x 8 bytes).")

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

    def request_limits(self) -> dict:
        """The hf replica's per-request limits (OpenAIServer's `limits`)."""
        return {"prompt_logprobs_max_tokens": self.prompt_logprobs_max_tokens,
                "trust_request_chat_template": self.trust_request_chat_template,
                "logprobs_chunk_tokens": self.logprobs_chunk_tokens}

    def model_id(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        if self.model.startswith("ctxforge:"):  # a packaged model: ctxforge:smollm2 -> smollm2
            return self.model.split(":", 1)[1]
        return Path(self.model.rstrip("/")).name or self.model


def read_checkpoint_config(model_path: str) -> dict:
    """The checkpoint's config.json as a dict (its text_config for multimodal wrappers). A hub id (not a
    directory) is read through transformers, which needs the hub.

    Raises FileNotFoundError naming the model when its config.json cannot be read (or, for a hub id, loaded from
    the hub).
    """
    path = Path(model_path) / "config.json"
    if not Path(model_path).exists() and not model_path.startswith(("/", ".", "~")):
        from transformers import AutoConfig
        try:
            cfg = AutoConfig.from_pretrained(model_path).to_dict()
        except OSError as exc:
            raise FileNotFoundError(f"model {model_path!r}: not a local model directory, and its config cannot be "
                                    f"loaded from the model hub ({str(exc).splitlines()[0]})") from None
        return cfg.get("text_config", cfg)
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
    """The window of a checkpoint (config.json), or of the checkpoint with a RoPE override applied.

    Raises FileNotFoundError (read_checkpoint_config), and ValueError when config.json has no
    max_position_embeddings.
    """
    cfg = read_checkpoint_config(model_path)
    params = rope_parameters(cfg)
    if rope is not None:
        params = stage_rope_parameters(params, rope, int(cfg.get("max_position_embeddings") or 0) or None)
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


"""The Ray Serve application: the CPU transformers deployment, the GPU `ray.serve.llm` builder, and
starting either under its own name and route prefix.

Routes (both backends): GET /v1/models, POST /v1/chat/completions, POST /v1/completions (JSON or SSE
streaming); the CPU deployment adds GET /health. The route logic lives in routes.py. With an API key,
every route needs `Authorization: Bearer <key>` on both backends (auth.py). Requests beyond
`max_ongoing_requests` wait in Ray Serve's queue.

`build_app(cfg, api_key)` returns the Serve application for a ServeConfig: `OpenAIServer` for backend
hf, or `ray.serve.llm`'s OpenAI app for backend vllm (vllm and ray.serve.llm are imported only there;
`build_llm_config` builds its config dict without them). A RoPE override (`cfg.rope`) is applied to
the checkpoint's config before the model is built (hf) or passed as vLLM `hf_overrides`.
`run_app` deploys it at `cfg.route_prefix`, so several applications (a served model, an evaluation's
own models) share one Serve cluster; it returns the /v1 base URL of the proxy that actually runs.
"""


import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ctxforge.serve.auth import AuthIngressMixin, key_digest
from ctxforge.serve.config import ServeConfig, checkpoint_context_length, read_checkpoint_config, rope_parameters
from ctxforge.serve.engine import HFEngine
from ctxforge.serve.routes import OpenAIRoutes, error

log = logging.getLogger(__name__)

fastapi_app = FastAPI(title="ctxforge OpenAI-compatible endpoint")


@fastapi_app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):  # OpenAI's envelope, never a plain-text 500
    log.exception("unhandled error on %s", request.url.path)
    return error(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError")


@serve.deployment
@serve.ingress(fastapi_app)
class OpenAIServer(AuthIngressMixin):
    """Transformers deployment: one HFEngine per replica behind the OpenAI routes."""

    def __init__(self, model_path: str, model_id: str, max_model_len: int, device: str, dtype: str,
                 rope: dict | None, key_digest: str | None):
        from ctxforge.train.rope import RopeConfig

        self.key_digest = key_digest
        engine = HFEngine(model_path, model_id, max_model_len, device, dtype,
                          rope=RopeConfig.model_validate(rope) if rope else None)
        self.routes = OpenAIRoutes(engine)

    @fastapi_app.get("/health")
    async def health(self):
        return JSONResponse({"status": "ok"})

    @fastapi_app.get("/v1/models")
    async def models(self):
        return JSONResponse(self.routes.models())

    @fastapi_app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self.routes.handle(request, chat=True)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.routes.handle(request, chat=False)


def resolve_backend(cfg: ServeConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    import importlib.util

    import torch
    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None else "hf"


def served_window(cfg: ServeConfig, model_path: str) -> int:
    """The served context window: max_model_len, else the checkpoint's (after the RoPE override)."""
    return cfg.max_model_len or checkpoint_context_length(model_path, cfg.rope)


def _deployment_options(cfg: ServeConfig) -> dict:
    opts = dict(max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests)
    if cfg.max_replicas:
        opts["autoscaling_config"] = dict(min_replicas=cfg.min_replicas, max_replicas=cfg.max_replicas,
                                          target_ongoing_requests=cfg.target_ongoing_requests)
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def vllm_hf_overrides(cfg: ServeConfig, model_path: str, window: int) -> dict:
    """vLLM `hf_overrides` for the RoPE override: the checkpoint's rope_parameters with the override
    applied, and max_position_embeddings raised to the served window."""
    from ctxforge.train.rope import stage_rope_parameters

    ckpt = read_checkpoint_config(model_path)
    trained = int(ckpt.get("max_position_embeddings") or 0) or None  # before the raise to `window`
    params = stage_rope_parameters(rope_parameters(ckpt), cfg.rope, trained)
    return {"rope_parameters": params, "max_position_embeddings": max(window, int(ckpt.get("max_position_embeddings") or 0))}


def build_llm_config(cfg: ServeConfig, model_path: str) -> dict:
    """The `ray.serve.llm.LLMConfig` fields for the vLLM backend, as a plain dict (importable on CPU)."""
    max_len = served_window(cfg, model_path)
    engine_kwargs = dict(max_model_len=max_len, tensor_parallel_size=cfg.tensor_parallel_size,
                         enable_chunked_prefill=True, **({"dtype": cfg.dtype} if cfg.dtype != "auto" else {}))
    if cfg.rope is not None:
        engine_kwargs["hf_overrides"] = vllm_hf_overrides(cfg, model_path, max_len)
    engine_kwargs.update(cfg.engine_kwargs)
    llm = dict(model_loading_config=dict(model_id=cfg.model_id(), model_source=model_path),
               engine_kwargs=engine_kwargs, deployment_config=_deployment_options(cfg))
    if cfg.accelerator_type:
        llm["accelerator_type"] = cfg.accelerator_type
    if cfg.resources:  # every GPU worker of the engine (tensor_parallel_size bundles) on the node type asked for
        llm["placement_group_config"] = {"bundle_per_worker": {"CPU": 1, "GPU": 1, **cfg.resources}, "strategy": "PACK"}
    return llm


def vllm_builder_config(cfg: ServeConfig, model_path: str, digest: str | None) -> dict:
    """`build_openai_app`'s argument; with a key, the ingress is ray.serve.llm's OpenAI ingress with
    our bearer check in front (auth.AuthIngressMixin)."""
    builder: dict = {"llm_configs": [build_llm_config(cfg, model_path)]}
    if digest:
        builder["ingress_cls_config"] = {"ingress_cls": "ctxforge.serve.vllm_ingress:AuthOpenAiIngress",
                                         "ingress_extra_kwargs": {"key_digest": digest}}
    return builder


def build_vllm_app(cfg: ServeConfig, model_path: str, api_key: str | None = None):
    """`ray.serve.llm`'s OpenAI app (needs vllm; GPU only)."""
    from ray.serve.llm import LLMConfig, build_openai_app

    builder = vllm_builder_config(cfg, model_path, key_digest(api_key) if api_key else None)
    builder["llm_configs"] = [LLMConfig(**c) for c in builder["llm_configs"]]
    return build_openai_app(builder)


def hf_actor_options(cfg: ServeConfig) -> dict:
    """`ray_actor_options` of an hf replica: its CPUs, GPUs and custom resources."""
    return dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **({"resources": dict(cfg.resources)} if cfg.resources else {}))


def build_app(cfg: ServeConfig, api_key: str | None = None):
    """The Serve application for `cfg` (model resolved, window from the checkpoint when not set)."""
    from ctxforge.models import resolve_model_path

    model_path = resolve_model_path(cfg.model)
    if resolve_backend(cfg) == "vllm":
        return build_vllm_app(cfg, model_path, api_key)
    actor = hf_actor_options(cfg)
    return OpenAIServer.options(ray_actor_options=actor, **_deployment_options(cfg)).bind(
        model_path, cfg.model_id(), served_window(cfg, model_path), cfg.device, cfg.dtype,
        cfg.rope.model_dump() if cfg.rope else None, key_digest(api_key) if api_key else None)


def proxy_url(cfg: ServeConfig) -> str:
    """http://host:port of the Serve HTTP proxy that runs: the cluster's, when Serve was already
    started there with other http_options (serve.start keeps those)."""
    host, port = cfg.host, cfg.port
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:  # no running client API in this Ray version: fall back to what we asked for
        pass
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{port}"


def run_app(cfg: ServeConfig, api_key: str | None = None) -> str:
    """Start the HTTP proxy (if not running) and the application at cfg.route_prefix (Ray must be
    initialised); returns the /v1 base URL."""
    from ctxforge.console import quiet_serve_driver

    quiet_serve_driver()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, api_key), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    prefix = "" if cfg.route_prefix == "/" else cfg.route_prefix
    return f"{proxy_url(cfg)}{prefix}/v1"

"""The Ray Serve application: the transformers deployment (backend hf), `ray.serve.llm` with vLLM
(backend vllm, on CPU or GPU: vllm_app.py), and starting either under its own name and route prefix.

Routes (both backends): GET /v1/models, POST /v1/chat/completions, POST /v1/completions (JSON or SSE
streaming); the transformers deployment adds GET /health (serve/README.md lists how the backends differ). The route logic lives in routes.py. With an API key,
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
from ctxforge.serve.config import ServeConfig, checkpoint_context_length
from ctxforge.serve.served_model import HFServedModel
from ctxforge.serve.routes import OpenAIRoutes, error
from ctxforge.serve.vllm_app import build_llm_config, build_vllm_app, deployment_options, vllm_builder_config  # noqa: F401 (public here)

log = logging.getLogger(__name__)

fastapi_app = FastAPI(title="ctxforge OpenAI-compatible endpoint")


@fastapi_app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):  # OpenAI's envelope, never a plain-text 500
    log.exception("unhandled error on %s", request.url.path)
    return error(500, f"internal error: {type(exc).__name__}: {exc}", "InternalServerError")


@serve.deployment
@serve.ingress(fastapi_app)
class OpenAIServer(AuthIngressMixin):
    """Transformers deployment: one HFServedModel per replica behind the OpenAI routes."""

    def __init__(self, model_path: str, model_id: str, max_model_len: int, device: str, dtype: str,
                 rope: dict | None, key_digest: str | None, limits: dict | None = None):
        """`limits`: ServeConfig.request_limits() (what a request may ask of this replica)."""
        from ctxforge.train.rope import RopeConfig

        limits = dict(limits or {})
        self.key_digest = key_digest
        engine = HFServedModel(model_path, model_id, max_model_len, device, dtype,
                               rope=RopeConfig.model_validate(rope) if rope else None,
                               logprobs_chunk_tokens=limits.pop("logprobs_chunk_tokens", 256))
        self.routes = OpenAIRoutes(engine, **limits)

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
    """hf or vllm; auto = vllm when a CUDA GPU and vllm are present, else hf."""
    if cfg.backend != "auto":
        return cfg.backend
    import importlib.util

    import torch
    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None else "hf"


def served_window(cfg: ServeConfig, model_path: str) -> int:
    """The served context window: max_model_len, else the checkpoint's (after the RoPE override)."""
    return cfg.max_model_len or checkpoint_context_length(model_path, cfg.rope)


def hf_actor_options(cfg: ServeConfig) -> dict:
    """`ray_actor_options` of an hf replica: its CPUs, GPUs and custom resources."""
    return dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, **({"resources": dict(cfg.resources)} if cfg.resources else {}))


def build_app(cfg: ServeConfig, api_key: str | None = None):
    """The Serve application for `cfg` (model resolved, window from the checkpoint when not set)."""
    from ctxforge.models import resolve_model_path

    model_path = resolve_model_path(cfg.model)
    if resolve_backend(cfg) == "vllm":
        return build_vllm_app(cfg, model_path, api_key, served_window(cfg, model_path))
    actor = hf_actor_options(cfg)
    return OpenAIServer.options(ray_actor_options=actor, **deployment_options(cfg)).bind(
        model_path, cfg.model_id(), served_window(cfg, model_path), cfg.device, cfg.dtype,
        cfg.rope.model_dump() if cfg.rope else None, key_digest(api_key) if api_key else None, cfg.request_limits())


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

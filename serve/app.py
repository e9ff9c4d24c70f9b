"""The Ray Serve application: OpenAI-compatible routes over an `Engine`, and the GPU `ray.serve.llm` builder.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions (JSON or SSE
streaming). Every route checks the bearer API key when one is set. Bodies are validated here (not by
FastAPI's 422 handler) so errors come back in OpenAI's envelope with status 400 and the field named;
a prompt that does not fit the window is a 400 stating both token counts. Requests beyond
`max_ongoing_requests` wait in Ray Serve's queue.

`build_app(cfg)` returns the Serve application for a ServeConfig: the transformers deployment
(`OpenAIServer`) for backend hf, or `ray.serve.llm`'s OpenAI app for backend vllm (vllm and
ray.serve.llm are imported only there; `build_llm_config` builds its config dict without them).
"""


import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from ctxforge.serve import protocol as p
from ctxforge.serve.config import ServeConfig, checkpoint_context_length
from ctxforge.serve.engine import ContextLengthError, Engine, HFEngine, SamplingParams

log = logging.getLogger(__name__)

fastapi_app = FastAPI(title="ctxforge OpenAI-compatible endpoint")


def _error(status: int, message: str, err_type: str = "BadRequestError", param: str | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, err_type, param, status), status_code=status)


def _validation_error(err: ValidationError) -> JSONResponse:
    first = err.errors()[0]
    field = ".".join(str(x) for x in first["loc"]) or "(body)"
    msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or '(body)'}: {e['msg']}" for e in err.errors())
    return _error(400, f"invalid request: {msgs}", param=field)


async def _parse(request: Request, model: type):
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, _error(400, f"request body is not valid JSON: {exc}")
    try:
        return model.model_validate(body), None
    except ValidationError as err:
        return None, _validation_error(err)


def _sse(payload) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=True)
    return f"data: {data}\n\n"


class OpenAIRoutes:
    """The route logic over an Engine; the Serve deployment below only binds it to FastAPI."""

    def __init__(self, engine: Engine, api_key: str | None = None):
        self.engine = engine
        self.api_key = api_key or None

    def auth_error(self, request: Request) -> "JSONResponse | None":
        if self.api_key is None:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return _error(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "AuthenticationError")
        return None

    def _model_error(self, req) -> JSONResponse | None:
        if req.model is not None and req.model != self.engine.model_id:
            return _error(404, f"model {req.model!r} is not served here (served: {self.engine.model_id!r})",
                          "NotFoundError", "model")
        return None

    def models(self) -> dict:
        card = p.ModelCard(id=self.engine.model_id, max_model_len=self.engine.max_model_len)
        return p.ModelList(data=[card]).model_dump()

    async def chat(self, request: Request):
        req, err = await _parse(request, p.ChatCompletionRequest)
        if err is None:
            err = self._model_error(req)
        if err is not None:
            return err
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = self.engine.encode_chat(messages, req.add_generation_prompt, req.continue_final_message)
        except Exception as exc:  # a chat template that rejects the conversation (e.g. role order)
            return _error(400, f"messages: the chat template cannot render them: {exc}", param="messages")
        return await self._respond(req, ids, chat=True)

    async def completions(self, request: Request):
        req, err = await _parse(request, p.CompletionRequest)
        if err is None:
            err = self._model_error(req)
        if err is not None:
            return err
        return await self._respond(req, self.engine.encode_prompt(req.prompt), chat=False)

    async def _respond(self, req, ids: list[int], chat: bool):
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                stop=req.stop_list(), seed=req.seed)
        try:
            self.engine.completion_budget(len(ids), req.max_tokens)
        except ContextLengthError as exc:
            return _error(400, str(exc), param="messages" if chat else "prompt")
        steps = self.engine.generate(ids, params)
        if req.stream:
            maker = self._chat_stream if chat else self._completion_stream
            return StreamingResponse(maker(req, steps), media_type="text/event-stream")
        text, last = [], None
        async for step in steps:
            text.append(step.text)
            last = step
        usage = p.Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                        total_tokens=last.prompt_tokens + last.completion_tokens)
        model = self.engine.model_id
        if chat:
            choice = p.ChatChoice(message=p.ResponseMessage(content="".join(text)), finish_reason=last.finish_reason)
            return JSONResponse(p.ChatCompletion(model=model, choices=[choice], usage=usage).model_dump())
        prefix = self.engine.tokenizer.decode(ids) if req.echo and hasattr(self.engine, "tokenizer") else ""
        choice = p.CompletionChoice(text=prefix + "".join(text), finish_reason=last.finish_reason)
        return JSONResponse(p.Completion(model=model, choices=[choice], usage=usage).model_dump())

    async def _chat_stream(self, req, steps):
        head = dict(id=p.new_id("chatcmpl"), created=p.now(), model=self.engine.model_id)
        yield _sse(p.ChatCompletionChunk(**head, choices=[p.ChatChunkChoice(delta=p.Delta(role="assistant", content=""))]))
        async for step in steps:
            if step.text:
                yield _sse(p.ChatCompletionChunk(**head, choices=[p.ChatChunkChoice(delta=p.Delta(content=step.text))]))
            if step.finish_reason:
                yield _sse(p.ChatCompletionChunk(**head, choices=[p.ChatChunkChoice(delta=p.Delta(), finish_reason=step.finish_reason)]))
                if req.include_usage():
                    usage = p.Usage(prompt_tokens=step.prompt_tokens, completion_tokens=step.completion_tokens,
                                    total_tokens=step.prompt_tokens + step.completion_tokens)
                    yield _sse(p.ChatCompletionChunk(**head, choices=[], usage=usage))
        yield _sse("[DONE]")

    async def _completion_stream(self, req, steps):
        head = dict(id=p.new_id("cmpl"), created=p.now(), model=self.engine.model_id)
        async for step in steps:
            if step.text or step.finish_reason:
                yield _sse(p.Completion(**head, choices=[p.CompletionChoice(text=step.text, finish_reason=step.finish_reason)]))
            if step.finish_reason and req.include_usage():
                usage = p.Usage(prompt_tokens=step.prompt_tokens, completion_tokens=step.completion_tokens,
                                total_tokens=step.prompt_tokens + step.completion_tokens)
                yield _sse(p.Completion(**head, choices=[], usage=usage))
        yield _sse("[DONE]")


@serve.deployment
@serve.ingress(fastapi_app)
class OpenAIServer:
    """Transformers deployment: one HFEngine per replica behind the OpenAI routes."""

    def __init__(self, model_path: str, model_id: str, max_model_len: int, device: str, dtype: str,
                 api_key: str | None):
        self.routes = OpenAIRoutes(HFEngine(model_path, model_id, max_model_len, device, dtype), api_key)

    @fastapi_app.get("/health")
    async def health(self, request: Request):
        return self.routes.auth_error(request) or JSONResponse({"status": "ok"})

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request):
        return self.routes.auth_error(request) or JSONResponse(self.routes.models())

    @fastapi_app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return self.routes.auth_error(request) or await self.routes.chat(request)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        return self.routes.auth_error(request) or await self.routes.completions(request)


def resolve_backend(cfg: ServeConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    import importlib.util

    import torch
    return "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None else "hf"


def _deployment_options(cfg: ServeConfig) -> dict:
    opts = dict(max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests)
    if cfg.max_replicas:
        opts["autoscaling_config"] = dict(min_replicas=cfg.min_replicas, max_replicas=cfg.max_replicas,
                                          target_ongoing_requests=cfg.target_ongoing_requests)
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def build_llm_config(cfg: ServeConfig, model_path: str) -> dict:
    """The `ray.serve.llm.LLMConfig` fields for the vLLM backend, as a plain dict (importable on CPU)."""
    max_len = cfg.max_model_len or checkpoint_context_length(model_path)
    engine_kwargs = dict(max_model_len=max_len, tensor_parallel_size=cfg.tensor_parallel_size,
                         enable_chunked_prefill=True, **({"dtype": cfg.dtype} if cfg.dtype != "auto" else {}))
    engine_kwargs.update(cfg.engine_kwargs)
    llm = dict(model_loading_config=dict(model_id=cfg.model_id(), model_source=model_path),
               engine_kwargs=engine_kwargs, deployment_config=_deployment_options(cfg))
    if cfg.accelerator_type:
        llm["accelerator_type"] = cfg.accelerator_type
    return llm


def build_vllm_app(cfg: ServeConfig, model_path: str, api_key: str | None = None):
    """`ray.serve.llm`'s OpenAI app (needs vllm; GPU only)."""
    if api_key:
        # Ray 2.60's LLM ingress has no API-key check of its own.
        raise ValueError(f"serve: an API key is set (${cfg.api_key_env}) but the vllm backend's ingress "
                         "(ray.serve.llm 2.60) cannot check it; unset it or put the endpoint behind a gateway")
    from ray.serve.llm import LLMConfig, build_openai_app

    return build_openai_app({"llm_configs": [LLMConfig(**build_llm_config(cfg, model_path))]})


def build_app(cfg: ServeConfig, api_key: str | None = None):
    """The Serve application for `cfg` (model resolved, window from the checkpoint when not set)."""
    from ctxforge.models import resolve_model_path

    model_path = resolve_model_path(cfg.model)
    if resolve_backend(cfg) == "vllm":
        return build_vllm_app(cfg, model_path, api_key)
    max_len = cfg.max_model_len or checkpoint_context_length(model_path)
    actor = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    return OpenAIServer.options(ray_actor_options=actor, **_deployment_options(cfg)).bind(
        model_path, cfg.model_id(), max_len, cfg.device, cfg.dtype, api_key)


def run_app(cfg: ServeConfig, api_key: str | None = None) -> str:
    """Start the HTTP proxy and the application (Ray must be initialised); returns the /v1 base URL."""
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, api_key), name=cfg.app_name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}/v1"

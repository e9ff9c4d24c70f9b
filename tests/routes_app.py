"""The OpenAI routes over one engine as a plain FastAPI app, for in-process endpoint tests without Ray Serve
(the same handlers serve/app.py's deployment mounts)."""

from __future__ import annotations

from fastapi import FastAPI, Request

from ctxforge.serve.routes import OpenAIRoutes


def routes_app(engine, **opts) -> FastAPI:
    """GET /health, GET /v1/models, POST /v1/completions and /v1/chat/completions over `engine`; `opts` go
    to OpenAIRoutes (request limits, chat-template trust)."""
    routes = OpenAIRoutes(engine, **opts)
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return routes.models()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await routes.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await routes.handle(request, chat=True)
    return app

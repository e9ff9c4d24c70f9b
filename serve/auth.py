"""Bearer-token check for every served route, the same for the CPU deployment and vLLM's ingress.

`BearerAuth` is a plain ASGI middleware: an HTTP request without `Authorization: Bearer <key>` gets
401 in OpenAI's error envelope before it reaches any route. The replica holds only the key's SHA-256
digest (the key itself never enters Ray's object store or the Serve config).

`AuthIngressMixin` puts the middleware in front of a Ray Serve ingress deployment's ASGI app. Serve
(2.60) builds the replica's app after the deployment's own constructor and hands it to
`ASGIAppReplicaWrapper._set_asgi_app`; the mixin sits before that wrapper in the MRO and wraps the
app there. `ray.serve.llm`'s OpenAI ingress has no key check of its own, so this is how the vLLM
backend gets one (its ingress class is a subclass with this mixin; see app.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json

UNAUTHORIZED = json.dumps({"error": {"message": "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                     "type": "AuthenticationError", "param": None, "code": 401}}).encode()


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def authorized(header: str, digest: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key_digest(token.strip()), digest)


class BearerAuth:
    def __init__(self, app, digest: str):
        self.app = app
        self.digest = digest

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"), "")
            if not authorized(header, self.digest):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": UNAUTHORIZED})
                return
        await self.app(scope, receive, send)

    def __getattr__(self, name):  # Serve reads attributes (docs_url, ...) of the app it wraps
        if name == "app":
            raise AttributeError(name)
        return getattr(self.app, name)


class AuthIngressMixin:
    """Mix into a `@serve.ingress` deployment class; set `self.key_digest` in its constructor."""

    key_digest: str | None = None

    def _set_asgi_app(self, app) -> None:
        if self.key_digest:
            app = BearerAuth(app, self.key_digest)
        super()._set_asgi_app(app)

"""A local OpenAI-compatible server for tests and benchmarks (not shipped in the package).

    with FakeOpenAIServer(latency_s=0.05, fail_first=2, fail_with=429) as server:
        cfg = GeneratorConfig(backend="http", base_url=server.base_url, ...)
        ...
        assert server.stats.by_status[429] == 2 * n_requests

stdlib ThreadingHTTPServer: starts in milliseconds, a thread per connection (so 32+ concurrent
keep-alive connections are fine), and a handler can sleep without blocking the others.

Every answer validates against the request's `response_format.json_schema.schema`; a string property
whose name contains "quote" is a verbatim run of words from the middle of the first text the last user
message shows between <text> tags (a list of quotes: one from each text shown), so that grounding succeeds
in integration tests wherever a real model could ground its answer.

Faults (constructor keywords, changeable at runtime via `server.configure(...)`); the outcome of the
k-th attempt (0-based) of a request, keyed by a hash of its messages, is the first that applies of:
  permanent               every attempt gets this fault
  schedule[k]             e.g. (429, 500) = 429, then 500, then success
  k < fail_first          fail_with
  p_429/p_500/p_503/p_timeout/p_malformed   random draws (seeded; for benchmarks, not for asserts)
and then a successful completion. `match` restricts faults to requests whose last user message contains
it. A fault is an HTTP status (429 carries `Retry-After: <retry_after>`), "timeout" (sleep
`timeout_sleep_s`, longer than the client's timeout, then drop the connection), "malformed" (200 with
content that is not JSON) or "disconnect" (close the connection without a response).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# the shipped fake engine's reading of a prompt: one implementation for both fakes
from ctxforge.generation.backends.fake import last_user, middle_quote

Fault = int | str | None  # status code, "timeout", "malformed", "disconnect"; None = succeed


@dataclasses.dataclass
class Faults:
    latency_s: float = 0.0
    permanent: Fault = None
    schedule: tuple = ()
    fail_first: int = 0
    fail_with: Fault = 500
    p_429: float = 0.0
    p_500: float = 0.0
    p_503: float = 0.0
    p_timeout: float = 0.0
    p_malformed: float = 0.0
    match: str | None = None
    retry_after: str | None = "0"
    timeout_sleep_s: float = 30.0
    seed: int = 0


class Stats:
    """Counters, safe to read while the server runs (`snapshot()` for a consistent copy)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.requests = 0                                      # chat completion requests received
            self.by_status: collections.Counter = collections.Counter()  # status codes sent
            self.faults: collections.Counter = collections.Counter()     # fault kinds injected
            self.attempts: collections.Counter = collections.Counter()   # request key -> attempts
            self.in_flight = 0
            self.max_in_flight = 0
            self.authorization: collections.Counter = collections.Counter()  # Authorization headers seen
            self.bodies: list[dict] = []                           # parsed request bodies, in arrival order
            self.first_request_at: float | None = None             # time.monotonic() of the first arrival
            self.last_response_at: float | None = None             # ... and of the last answer sent

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests, "by_status": dict(self.by_status), "faults": dict(self.faults),
                "attempts": dict(self.attempts), "max_in_flight": self.max_in_flight,
                "authorization": dict(self.authorization),
                "first_request_at": self.first_request_at, "last_response_at": self.last_response_at,
            }


def request_key(messages: Any) -> str:
    """The identity of a request across its retries: a hash of its messages."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


_TEXT_BLOCK = re.compile(r"<text(?: \d+)?>\n(.*?)\n</text(?: \d+)?>", re.S)


def text_blocks(prompt: str) -> list[str]:
    """The texts a prompt shows between <text> / <text k> tags (the whole prompt when it has none): an
    instruction-following model quotes from them, not from the instructions around them."""
    return [m.group(1) for m in _TEXT_BLOCK.finditer(prompt)] or [prompt]


def answer_for(schema: dict, prompt: str) -> Any:
    """A deterministic instance of `schema` derived from prompt (the subset of JSON Schema that
    structured outputs use: object, string, integer, number, boolean, array, enum, const, anyOf, $ref)."""
    return _instance(schema, schema, prompt, "value")


def _instance(node: dict, root: dict, prompt: str, name: str) -> Any:
    if "$ref" in node:
        target: Any = root
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return _instance(target, root, prompt, name)
    if "const" in node:
        return node["const"]
    if "enum" in node:
        return node["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            options = [o for o in node[key] if o.get("type") != "null"] or node[key]
            return _instance(options[0], root, prompt, name)
    kind = node.get("type", "object" if "properties" in node else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = node.get("properties", {})
        required = node.get("required", list(props))
        return {k: _instance(props[k], root, prompt, k) for k in props if k in required}
    if kind == "array":
        n = max(int(node.get("minItems", 1)), 1)
        if "maxItems" in node:
            n = min(n, int(node["maxItems"]))
        if "quote" in name.lower():  # one quote from each text shown, as the prompt asks
            blocks = text_blocks(prompt)
            n = max(n, min(len(blocks), int(node.get("maxItems", len(blocks)))))
            return [middle_quote(blocks[i % len(blocks)], node.get("items", {}).get("maxLength")) for i in range(n)]
        return [_instance(node.get("items", {}), root, prompt, name) for _ in range(n)]
    if kind in ("integer", "number"):
        low = node.get("minimum", node.get("exclusiveMinimum", -1) + 1)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    max_len = node.get("maxLength")
    if "quote" in name.lower():
        text = middle_quote(text_blocks(prompt)[0], max_len)
    else:
        digest = hashlib.sha256(f"{name}\0{prompt}".encode()).hexdigest()[:12]
        text = f"{name} {digest}: " + " ".join(prompt.split()[:12])
        if max_len is not None:
            text = text[:max_len]
    return text.ljust(int(node.get("minLength", 0)), "x")


class FakeOpenAIServer:
    def __init__(self, api_key: str | None = None, **faults):
        self.api_key = api_key  # when set, requests without `Authorization: Bearer <api_key>` get 401
        self.faults = Faults(**faults)
        self.stats = Stats()
        self._rng = random.Random(self.faults.seed)
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> "FakeOpenAIServer":
        handler = type("Handler", (_Handler,), {"fake": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        httpd.daemon_threads = True
        # The default backlog of 5 drops SYNs when 32 clients connect at once (1 s retransmit stalls).
        httpd.request_queue_size = 256
        httpd.allow_reuse_address = True
        httpd.server_bind()
        httpd.server_activate()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()  # wakes handlers sleeping in a "timeout" fault
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def configure(self, **changes) -> None:
        """Change faults at runtime, e.g. server.configure(permanent=None, latency_s=0.2)."""
        with self.stats.lock:
            self.faults = dataclasses.replace(self.faults, **changes)
            if "seed" in changes:
                self._rng = random.Random(changes["seed"])

    # decisions

    def _decide(self, key: str, prompt: str) -> tuple[Fault, int]:
        """Count the attempt and pick its fault under one lock, so schedules are exact under concurrency."""
        with self.stats.lock:
            f = self.faults
            attempt = self.stats.attempts[key]
            self.stats.attempts[key] += 1
            if f.match is not None and f.match not in prompt:
                return None, attempt
            if f.permanent is not None:
                return f.permanent, attempt
            if attempt < len(f.schedule):
                return f.schedule[attempt], attempt
            if attempt < f.fail_first:
                return f.fail_with, attempt
            r = self._rng.random()
            for fault, p in ((429, f.p_429), (500, f.p_500), (503, f.p_503),
                             ("timeout", f.p_timeout), ("malformed", f.p_malformed)):
                if r < p:
                    return fault, attempt
                r -= p
            return None, attempt


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAIServer
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection pool is exercised
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed
    # ACK and every request costs an extra ~40 ms (real servers such as uvicorn set TCP_NODELAY too).
    disable_nagle_algorithm = True

    def log_message(self, *args):  # quiet: tests print nothing per request
        pass

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        with self.fake.stats.lock:
            self.fake.stats.by_status[status] += 1

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        with self.fake.stats.lock:
            self.fake.stats.authorization[auth] += 1
        if self.fake.api_key and auth != f"Bearer {self.fake.api_key}":
            self._send_json(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            return False
        return True

    def do_GET(self):
        if self.path.rstrip("/") != "/v1/models":
            return self._send_json(404, {"error": {"message": f"no route {self.path}"}})
        if self._authorized():
            self._send_json(200, {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "test"}]})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._send_json(404, {"error": {"message": f"no route {self.path}"}})
        stats = self.fake.stats
        with stats.lock:
            if stats.first_request_at is None:
                stats.first_request_at = time.monotonic()
            stats.requests += 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            self._complete(raw)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True  # the client gave up (timeout fault): nothing to answer
        finally:
            with stats.lock:
                stats.in_flight -= 1
                stats.last_response_at = time.monotonic()

    def _complete(self, raw: bytes):
        fake = self.fake
        if not self._authorized():
            return
        try:
            req = json.loads(raw)
            messages = req["messages"]
        except (ValueError, KeyError, TypeError) as e:
            return self._send_json(400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}})
        prompt = last_user(messages)
        key = request_key(messages)
        with fake.stats.lock:
            fake.stats.bodies.append(req)
        fault, _ = fake._decide(key, prompt)
        latency = fake.faults.latency_s
        if latency > 0:
            fake._stopping.wait(latency)
        if fault == "timeout":
            with fake.stats.lock:
                fake.stats.faults["timeout"] += 1
            fake._stopping.wait(fake.faults.timeout_sleep_s)
            self.close_connection = True
            return
        if fault == "disconnect":
            with fake.stats.lock:
                fake.stats.faults["disconnect"] += 1
            self.close_connection = True
            return
        if isinstance(fault, int):
            headers = {"Retry-After": fake.faults.retry_after} if fault == 429 and fake.faults.retry_after is not None else None
            return self._send_json(fault, {"error": {"message": f"injected {fault}", "type": "fake_fault", "code": fault}}, headers)
        schema = (((req.get("response_format") or {}).get("json_schema") or {}).get("schema")) or {"type": "object"}
        if fault == "malformed":
            with fake.stats.lock:
                fake.stats.faults["malformed"] += 1
            content = "Sure! Here is the JSON you asked for: {not json"
        else:
            content = json.dumps(answer_for(schema, prompt))
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
        self._send_json(200, {
            "id": f"chatcmpl-{key}",
            "object": "chat.completion",
            "model": req.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content.split()),
                      "total_tokens": prompt_tokens + len(content.split())},
        })

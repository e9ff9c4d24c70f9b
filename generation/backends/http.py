"""The http backend: any OpenAI-compatible chat-completions endpoint (OpenAI, Together, vLLM, Ray Serve).

One engine actor holds one `httpx.Client` (pooled keep-alive connections) and takes `cfg.concurrency`
requests at once, each on its own thread, so at most `cfg.concurrency` requests are in flight. The
scheduler refills a slot as soon as its answer is back, across passes and documents: the pipe stays
full to the end of the run, and the actor starts once per run.

Why not `ray.data.llm.HttpRequestProcessorConfig` (Ray 2.60, see
ray/llm/_internal/batch/stages/http_request_stage.py):
  - it retries only 408/429/502/503/504, not 500;
  - it has no bound on requests in flight: the batch's `session.post(...)` calls are created up front
    and then awaited one after the other, so the batch goes out sequentially (or paced by `qps`) and
    in-flight concurrency is whatever number of batches Ray Data happens to run;
  - it ignores Retry-After (fixed base * 2**n backoff, no jitter, no cap);
  - after the last retry it raises, which fails the whole dataset, where we want the row recorded
    as failed (error set) so that the scheduler can account for it and a rerun can retry it.

Transport only: schema validation and validation attempts live in the scheduler (scheduler.py, validation.py).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Any

from ctxforge.generation.backends import register
from ctxforge.generation.backends.base import Engine, EngineFactory, GeneratorBackend, parse_messages

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_BACKOFF_S = 60.0


def max_concurrency(concurrency: int | tuple[int, int]) -> int:
    """cfg.concurrency is an actor count for the local backends; here it is requests in flight."""
    return int(concurrency[1] if isinstance(concurrency, (tuple, list)) else concurrency)


@register("http")
class HTTPBackend(GeneratorBackend):
    uses_model_path = False   # the endpoint knows the model by its served name, not by a resolved path

    @classmethod
    def check(cls, cfg, model_path: str) -> None:
        key_env = cfg.api_key_env
        if key_env and not os.environ.get(key_env):
            raise ValueError(
                f"generator.api_key_env: ${key_env} is not set; export it with the endpoint's API key, or set "
                f"generator.api_key_env to the variable that holds it (null for an endpoint that takes no key)")
        check_endpoint(cfg)

    def _client_kwargs(self) -> dict[str, Any]:
        if not self.cfg.base_url:
            raise ValueError("generator.base_url is required when generator.backend = http")
        return {
            "base_url": self.cfg.base_url,
            # The endpoint's own model name, not a local path that model_path may have resolved to.
            "model": self.cfg.model,
            # The variable's name, never its value: the key must not enter Ray's object store or logs.
            "api_key_env": self.cfg.api_key_env or "",
            "concurrency": max_concurrency(self.cfg.concurrency),
            "timeout_s": self.cfg.timeout_s,
            "max_retries": self.cfg.max_retries,
            "retry_base_s": self.cfg.retry_base_s,
            "length_bounds": self.cfg.schema_length_bounds,
        }

    def engine_factory(self) -> EngineFactory:
        return EngineFactory(f"{__name__}:HTTPEngine", self._client_kwargs())

    def engine_range(self) -> tuple[int, int]:
        return 1, 1  # one client; generator.concurrency is the number of requests in flight

    def default_slots(self) -> int:
        return max_concurrency(self.cfg.concurrency)

    def gpus_per_engine(self) -> float:
        return 0.0  # the endpoint's GPUs are not ours: APIs are priced per token (cost.*_usd_per_mtok)

    def actor_options(self) -> dict[str, Any]:
        # Threads mostly wait on sockets: a small CPU share leaves the CPUs to Ray Data and rendering.
        return {"num_cpus": min(self.cfg.num_cpus, 0.25), **self.node_resources()}

    def describe(self) -> dict:
        return {
            **super().describe(),
            "base_url": self.cfg.base_url,
            "concurrency": max_concurrency(self.cfg.concurrency),
        }


class HTTPEngine(Engine):
    """An OpenAI-compatible client: `generate(row)` is called from up to `concurrency` threads at once (the
    pool's slots) and returns the RESULT_COLUMNS."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str,
        concurrency: int,
        timeout_s: float,
        max_retries: int,
        retry_base_s: float,
        length_bounds: bool = True,
    ):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries = max_retries
        self.retry_base_s = retry_base_s
        self.length_bounds = length_bounds
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(api_key_env or "", "")
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.slots = concurrency
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    def generate(self, row: dict[str, Any]) -> dict[str, Any]:
        return self._generate(row)

    def close(self) -> None:
        self.__del__()

    def _payload(self, row: dict[str, Any]) -> dict[str, Any]:
        payload = {
            "model": self.model,
            "messages": parse_messages(row["messages"]),
            "max_tokens": int(row["max_tokens"]),
            "temperature": float(row["temperature"]),
            "top_p": float(row["top_p"]),
            "seed": int(row["seed"]),
        }
        if float(row.get("repetition_penalty", 1.0)) != 1.0:  # an extension of vLLM/SGLang/TGI servers
            payload["repetition_penalty"] = float(row["repetition_penalty"])
        if not row["schema"]:  # a free-text request
            return payload
        schema = json.loads(row["schema"])
        if not self.length_bounds:
            schema = strip_length_bounds(schema)
        payload["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": row["schema_name"], "schema": schema, "strict": True},
        }
        return payload

    def _generate(self, row: dict[str, Any]) -> dict[str, Any]:
        """One request with retries; never raises, so one bad row cannot fail the dataset."""
        import httpx

        try:
            body = json.dumps(self._payload(row))
        except Exception as e:  # a malformed request row is that row's failure, not the dataset's
            return _failed(f"bad request row: {type(e).__name__}: {e}"[:300])
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                resp = self.client.post(self.url, content=body)
            except httpx.TimeoutException:
                reason = "timeout"
            except httpx.TransportError as e:
                reason = f"connection error ({type(e).__name__})"
            else:
                if resp.status_code == 200:
                    return _parse_completion(resp)
                if resp.status_code not in RETRYABLE_STATUS:
                    return _failed(f"http {resp.status_code}: {resp.text[:200]}")
                reason = f"http {resp.status_code}"
                retry_after = _retry_after_s(resp.headers.get("retry-after"))
            if attempt < self.max_retries:
                time.sleep(self._backoff_s(attempt, retry_after))
        return _failed(f"{reason} after {self.max_retries} retries")

    def _backoff_s(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            # The server knows when it will take us back; jitter would only make us early or late.
            return min(retry_after, MAX_BACKOFF_S)
        with self._rng_lock:
            jitter = self._rng.uniform(0.0, 0.1)
        # Jitter so that requests throttled together do not come back together.
        return min(self.retry_base_s * (2**attempt) * (1.0 + jitter), MAX_BACKOFF_S)

    def __del__(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.close()


def check_endpoint(cfg) -> None:
    """The endpoint answers (GET /models, as every OpenAI-compatible server serves) before any work: a down or
    mistyped endpoint is one line at once, not hours of retried requests. Raises ValueError naming
    generator.base_url when it cannot be reached or refuses the API key (HTTP 401/403)."""
    import httpx

    url = (cfg.base_url or "").rstrip("/") + "/models"
    key = os.environ.get(cfg.api_key_env or "", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=min(30.0, cfg.timeout_s))
    except httpx.HTTPError as exc:
        raise ValueError(f"generator.base_url: cannot reach {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code in (401, 403):
        raise ValueError(f"generator.base_url: {url} refused the API key from ${cfg.api_key_env} "
                         f"(HTTP {response.status_code})")


def strip_length_bounds(schema: Any) -> Any:
    """The schema without minLength/maxLength anywhere (for endpoints whose strict mode rejects them)."""
    if isinstance(schema, dict):
        return {k: strip_length_bounds(v) for k, v in schema.items() if k not in ("minLength", "maxLength")}
    if isinstance(schema, list):
        return [strip_length_bounds(v) for v in schema]
    return schema


def _parse_completion(resp) -> dict[str, Any]:
    try:
        data = resp.json()
        choice = data["choices"][0]
        content = choice["message"].get("content")
        usage = data.get("usage") or {}
    except Exception as e:  # a 200 that is not a chat completion (e.g. a proxy's HTML page)
        return _failed(f"bad response: {type(e).__name__}: {resp.text[:200]}")
    if content is None:
        return _failed(f"no content (finish_reason={choice.get('finish_reason')})")
    return {
        "output_text": str(content),
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "error": "",
    }


def _failed(reason: str) -> dict[str, Any]:
    return {"output_text": "", "prompt_tokens": 0, "completion_tokens": 0, "error": reason}


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form is rare on these APIs and falls back to backoff."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None

"""The evaluation client: bounded concurrency, retries, a per-sample result cache, latency per request.

Each `EvalItem` is one request body plus what is needed to score its answer. `EvalClient.run` sends
the items to an OpenAI-compatible endpoint with at most `concurrency` in flight, retries transient
failures (connection errors, timeouts, 408/409/429/5xx) with exponential backoff, scores each answer
as soon as it arrives and stores the scored record in a SQLite cache keyed by a hash of (model label,
request body). A rerun after an interruption skips everything already scored. Non-transient errors
(a 400 for a prompt that does not fit, say) are recorded as errors and not cached, so a rerun retries
them. The client knows nothing about benchmarks: scoring is a callable it is given.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from ctxforge.serve.eval_config import ClientConfig

log = logging.getLogger(__name__)
TRANSIENT_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclass
class EvalItem:
    body: dict                      # the /v1/chat/completions body (without `model`)
    meta: dict                      # benchmark, task, length, index, golds, depths...
    score: Callable[[str], float]   # prediction -> score in [0, 100]


@dataclass
class Record:
    key: str
    meta: dict
    prediction: str | None
    score: float | None
    latency_s: float | None = None
    attempts: int = 0
    usage: dict = field(default_factory=dict)
    error: str | None = None
    cached: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def request_key(model_label: str, body: dict) -> str:
    blob = json.dumps({"model": model_label, "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResultCache:
    """Scored records in SQLite (one file per evaluation output dir; safe across processes)."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=60)
        self._lock = threading.Lock()
        self._db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, record TEXT NOT NULL)")
        self._db.commit()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM results WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, record: Record) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO results (key, record) VALUES (?, ?)",
                             (record.key, json.dumps(record.to_dict(), ensure_ascii=False)))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class EndpointError(RuntimeError):
    """A request that failed after every retry (the message says why); recorded, never fatal to the run."""


class EvalClient:
    def __init__(self, base_url: str, model_id: str, model_label: str, cfg: ClientConfig,
                 api_key: str | None = None, cache: ResultCache | None = None):
        self.base_url = base_url.rstrip("/")
        self.model_id = model_id
        self.model_label = model_label
        self.cfg = cfg
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.cache = cache

    async def chat(self, http: httpx.AsyncClient, body: dict) -> tuple[dict, float, int]:
        """POST one chat completion; returns (response JSON, latency of the successful attempt, attempts).

        Raises EndpointError at once for a status that is not transient (not 408/409/429/5xx), and after
        client.max_retries retries (exponential backoff from client.backoff_s, capped at 30 s) of transient
        statuses, connection errors and timeouts.
        """
        payload = dict(body, model=self.model_id)
        delay = self.cfg.backoff_s
        for attempt in range(1, self.cfg.max_retries + 2):
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{self.base_url}/chat/completions", json=payload, headers=self.headers)
                latency = time.perf_counter() - t0
                if r.status_code == 200:
                    return r.json(), latency, attempt
                problem = f"HTTP {r.status_code}: {r.text[:500]}"
                if r.status_code not in TRANSIENT_STATUS:
                    raise EndpointError(problem)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            if attempt > self.cfg.max_retries:
                raise EndpointError(f"gave up after {attempt} attempts: {problem}")
            log.warning("request failed (%s); retry %d/%d in %.1fs", problem, attempt, self.cfg.max_retries, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    async def _one(self, http, sem, item: EvalItem) -> Record:
        key = request_key(self.model_label, item.body)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return Record(**dict(hit, cached=True))
        async with sem:
            try:
                resp, latency, attempts = await self.chat(http, item.body)
            except EndpointError as exc:
                return Record(key, item.meta, None, None, error=str(exc))
        text = resp["choices"][0]["message"].get("content") or ""
        rec = Record(key, item.meta, text, float(item.score(text)), latency, attempts, resp.get("usage") or {})
        if self.cache is not None:
            self.cache.put(rec)
        return rec

    async def run(self, items: list[EvalItem], progress: Callable[[int, int], None] | None = None) -> list[Record]:
        """All items' records, in the items' order."""
        sem = asyncio.Semaphore(self.cfg.concurrency)
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits) as http:
            tasks = [asyncio.create_task(self._one(http, sem, it)) for it in items]
            done = 0
            for fut in asyncio.as_completed(tasks):
                await fut
                done += 1
                if progress:
                    progress(done, len(items))
            return [t.result() for t in tasks]


def card_window(card: dict) -> int | None:
    """A /v1/models card's context window: `max_model_len` (vLLM's own server, ctxforge's transformers
    deployment) or `metadata.max_request_context_length` (ray.serve.llm); None when it states none."""
    return card.get("max_model_len") or (card.get("metadata") or {}).get("max_request_context_length") or None


async def list_models(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> list[dict]:
    """The endpoint's model cards; EndpointError (one line, naming the URL) when it cannot be reached."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{base_url.rstrip('/')}/models"
    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            r = await http.get(url, headers=headers)
    except (httpx.TransportError, httpx.TimeoutException, httpx.InvalidURL, ValueError) as exc:
        raise EndpointError(f"cannot reach {url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")) from None
    if r.status_code != 200:
        raise EndpointError(f"{url}: HTTP {r.status_code}: {' '.join(r.text[:300].split())}")
    try:
        return r.json()["data"]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"{url}: not an OpenAI-compatible model list: {' '.join(r.text[:200].split())}") from None

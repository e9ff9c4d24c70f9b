"""The generator backend interface: an engine built once per actor, and the Ray Data transform around it.

A backend (hf, vllm, http, fake) describes two ways to run the same generator:
  - `engine_factory()`: the `Engine` that a long-lived actor of the engine pool (pool.py) builds
    once (loads the model) and then asks request after request, for every pass, wave and retry of
    the run. That is the default path (runtime.scheduler=streaming).
  - `apply(ds)`: a Ray Data transform from request rows to result rows, one job per pass (the
    earlier design, runtime.scheduler=passes). Its actors load the engine again for every job.
Backends do transport only: schema validation, attempts, caching and accounting happen in the
scheduler (scheduler.py) or the pass runner (validation.py), the same for every backend.

A request row:
  request_id  str   content-addressed id (cache key)
  messages    str   JSON list of {"role", "content"} chat messages
  schema      str   JSON schema the completion must match (structured outputs); "" = free text
  schema_name str   short name of that schema (summary, qa)
  max_tokens  int   completion budget
  temperature float
  top_p       float
  repetition_penalty float  1.0 = off (transformers / vLLM semantics)
  seed        int   per-request sampling seed (derived from request_id and attempt)
A result row adds:
  output_text       str  the raw completion ("" on error)
  prompt_tokens     int
  completion_tokens int
  error             str  "" when the backend got a completion, else the reason (e.g. "http 500 after 8 retries")
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

REQUEST_COLUMNS = ("request_id", "messages", "schema", "schema_name", "max_tokens", "temperature", "top_p",
                   "repetition_penalty", "seed")
RESULT_COLUMNS = ("output_text", "prompt_tokens", "completion_tokens", "error")
# Added by engines run through EngineUDF (passes mode), for the accounting: which engine answered, when
# it started (wall clock), how long it took to load, its busy seconds so far, and this request's seconds.
ENGINE_COLUMNS = ("engine_id", "engine_started_at", "engine_load_s", "engine_busy_s", "duration_s")


class Engine(abc.ABC):
    """One loaded generator (a model in memory, an HTTP client...), built once inside an actor.

    Sync engines implement `generate`, called from up to `slots` threads at once (an engine that
    can only do one at a time serializes inside). Async engines (`is_async = True`) implement
    `agenerate`, awaited up to `slots` times at once on the actor's event loop (vLLM's continuous
    batching). Both take a request row (REQUEST_COLUMNS) and return the RESULT_COLUMNS; they never
    raise for one bad request: the error goes in the `error` field.
    """

    is_async: bool = False
    slots: int = 1

    def generate(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def agenerate(self, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the engine holds (child processes, connections)."""


@dataclass(frozen=True)
class EngineFactory:
    """How an actor builds its engine: `module:Class` and keyword arguments (picklable, no live objects)."""

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Engine:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)(**self.kwargs)


class EngineMeter:
    """Where an engine's seconds go: loading, generating (at least one request in it), the rest idle.

    Durations are measured inside the engine's process (no clock is compared across machines);
    `started_at` (wall clock) only dates the engine for the pass-per-job accounting.
    """

    def __init__(self):
        self.engine_id = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        self.load_s = 0.0
        self.busy_s = 0.0
        self.requests = 0
        self.request_s = 0.0
        self._in_flight = 0
        self._busy_since = 0.0
        self._lock = threading.Lock()

    def loaded(self) -> None:
        self.load_s = time.perf_counter() - self._t0

    def begin(self) -> float:
        now = time.perf_counter()
        with self._lock:
            if self._in_flight == 0:
                self._busy_since = now
            self._in_flight += 1
        return now

    def end(self, began: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self._in_flight -= 1
            self.requests += 1
            self.request_s += now - began
            if self._in_flight == 0:
                self.busy_s += now - self._busy_since
        return now - began

    def snapshot(self) -> dict[str, Any]:
        now = time.perf_counter()
        with self._lock:
            busy = self.busy_s + (now - self._busy_since if self._in_flight else 0.0)
            return {"engine_id": self.engine_id, "started_at": self.started_at, "alive_s": now - self._t0,
                    "load_s": self.load_s, "busy_s": busy, "requests": self.requests, "request_s": self.request_s,
                    "in_flight": self._in_flight, "pid": os.getpid()}


def error_result(reason: str) -> dict[str, Any]:
    return {"output_text": "", "prompt_tokens": 0, "completion_tokens": 0, "error": reason[:300]}


class EngineUDF:
    """A Ray Data callable class around an Engine (passes mode): built once per Ray Data actor, i.e. once
    per job. Rows of a batch run `slots` at a time; result rows carry ENGINE_COLUMNS for the accounting."""

    def __init__(self, factory: EngineFactory):
        self.meter = EngineMeter()
        self.engine = factory.build()
        self.meter.loaded()
        self.pool = None if self.engine.is_async else ThreadPoolExecutor(max(1, self.engine.slots))

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        began = self.meter.begin()
        try:
            out = self.engine.generate(row)
        except Exception as exc:  # an engine must not raise for one request; if it does, that row failed
            out = error_result(f"{type(exc).__name__}: {exc}")
        return {**row, **out, "duration_s": self.meter.end(began)}

    async def _aone(self, row: dict[str, Any]) -> dict[str, Any]:
        began = self.meter.begin()
        try:
            out = await self.engine.agenerate(row)
        except Exception as exc:
            out = error_result(f"{type(exc).__name__}: {exc}")
        return {**row, **out, "duration_s": self.meter.end(began)}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch_rows(batch)
        if self.engine.is_async:
            async def run_all():
                return await asyncio.gather(*(self._aone(r) for r in rows))
            out = asyncio.run(run_all())
        else:
            out = list(self.pool.map(self._one, rows))
        snap = self.meter.snapshot()
        for r in out:
            r.update(engine_id=snap["engine_id"], engine_started_at=snap["started_at"], engine_load_s=snap["load_s"],
                     engine_busy_s=snap["busy_s"])
        return rows_batch(out)


class GeneratorBackend(abc.ABC):
    """A generator: the engine an actor builds (streaming) and the Ray Data stage around it (passes)."""

    name: str = ""

    def __init__(self, cfg: Any, model_path: str):
        self.cfg = cfg                # pipeline.config.GeneratorConfig
        self.model_path = model_path  # resolved local directory or hub name

    @abc.abstractmethod
    def apply(self, ds):
        """Return a Dataset with REQUEST_COLUMNS + RESULT_COLUMNS for every input row (one job, passes mode)."""

    def engine_factory(self) -> EngineFactory:
        """What each engine actor builds once and keeps for the whole run (streaming)."""
        raise NotImplementedError(f"generator backend {self.name!r} has no engine for the streaming scheduler; "
                                  f"use runtime.scheduler=passes")

    def engine_range(self) -> tuple[int, int]:
        """(min, max) engine actors: generator.concurrency, an int or [min, max]."""
        c = self.cfg.concurrency
        return (int(c[0]), int(c[1])) if isinstance(c, (tuple, list)) else (int(c), int(c))

    def slots_per_engine(self) -> int:
        """Requests in flight per engine: generator.requests_per_engine, else the backend's default."""
        return int(self.cfg.requests_per_engine or self.default_slots())

    def default_slots(self) -> int:
        return 1

    def gpus_per_engine(self) -> float:
        """GPUs one engine holds while alive (what GPU-hours are counted in)."""
        return float(self.cfg.num_gpus)

    def actor_options(self) -> dict[str, Any]:
        """Ray actor options of one engine actor (resources, scheduling)."""
        opts: dict[str, Any] = {"num_cpus": self.cfg.num_cpus}
        if self.cfg.num_gpus:
            opts["num_gpus"] = self.cfg.num_gpus
        return {**opts, **self.node_resources()}

    def node_resources(self) -> dict[str, Any]:
        """{"resources": generator.resources} (the generation node type's custom resource), or {} when none."""
        return {"resources": dict(self.cfg.resources)} if self.cfg.resources else {}

    def placement_bundles(self) -> list[dict[str, float]] | None:
        """Bundles of a placement group reserved per engine (vLLM tensor parallel), or None."""
        return None

    def describe(self) -> dict:
        """What the manifest records about the generator."""
        return {"backend": self.name, "model": self.model_path}


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data numpy batch as a list of row dicts (python scalars)."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _py(batch[k][i]) for k in keys} for i in range(n)]


def rows_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The inverse of batch_rows, keeping strings as object arrays."""
    if not rows:
        return {}
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = np.array(values, dtype=object) if isinstance(values[0], str) else np.array(values)
    return out


def parse_messages(messages_json: str) -> list[dict[str, str]]:
    return json.loads(messages_json)


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value

"""The generator backend interface: the engine a long-lived actor of the engine pool builds once.

A backend (hf, vllm, http, fake: one file each, registered by name in backends/__init__.py) says how
to build its `Engine` (`engine_factory()`), which the pool's actors (pool.py) load once and then ask
request after request, for every pass, round and retry of the run, and where those actors go (CPUs,
GPUs, placement groups, custom resources). Backends do transport only: schema validation, attempts,
caching and accounting happen in the scheduler (scheduler.py, validation.py), the same for every backend.

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
import importlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


REQUEST_COLUMNS = ("request_id", "messages", "schema", "schema_name", "max_tokens", "temperature", "top_p",
                   "repetition_penalty", "seed")
RESULT_COLUMNS = ("output_text", "prompt_tokens", "completion_tokens", "error")
RAY_ADDRESS_KEYS = "runtime.address or RAY_ADDRESS"   # how a run is pointed at a Ray cluster (ctxforge.raycluster)
class EngineCrashed(RuntimeError):
    """Raised by an engine that can no longer generate (its runtime's fatal errors: a dead worker process, a
    corrupted device state). The engine pool then treats the engine as dead: it is released, counted as a
    death, and the requests it held are sent again to a fresh engine (pool.py)."""


class Engine(abc.ABC):
    """One loaded generator (a model in memory, an HTTP client...), built once inside an actor.

    Sync engines implement `generate`, called from up to `slots` threads at once (an engine that
    can only do one at a time serializes inside). Async engines (`is_async = True`) implement
    `agenerate`, awaited up to `slots` times at once on the actor's event loop (vLLM's continuous
    batching). Both take a request row (REQUEST_COLUMNS) and return the RESULT_COLUMNS; they never
    raise for one bad request: the error goes in the `error` field. They raise EngineCrashed when the
    engine itself is broken.
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
    `started_at` (wall clock) only dates the engine in its snapshot.
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


class GeneratorBackend(abc.ABC):
    """A generator: the engine an actor builds once, and where that actor is placed."""

    name: str = ""                # set by @register
    uses_model_path: bool = True  # False: the model is a served name (http) or none (fake), never resolved

    def __init__(self, cfg: Any, model_path: str):
        self.cfg = cfg                # ctxforge.generation.config.GeneratorConfig
        self.model_path = model_path  # resolved local directory or hub name (the served name when not uses_model_path)

    @classmethod
    def check(cls, cfg: Any, model_path: str) -> None:
        """Preflight checks of this backend's settings that need the filesystem, the environment or the network.
        Raises ValueError with one line naming the key when the run could not work."""

    @classmethod
    def check_device(cls, cfg: Any, ray_address: str | None) -> None:
        """Preflight check of where the engines run, for backends with a `generator.device` (hf, vllm): raises
        PreflightError naming the key when they ask for a GPU that no node can ever offer the run on the Ray
        cluster at `ray_address` (ctxforge.devices.check_gpu_reachable). Backends without a device check nothing."""

    @abc.abstractmethod
    def engine_factory(self) -> EngineFactory:
        """What each engine actor builds once and keeps for the whole run. Raises ValueError naming the key of
        a setting the engine cannot take."""

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


def parse_messages(messages_json: str) -> list[dict[str, str]]:
    return json.loads(messages_json)

"""The entry point of every client of the generation layer: `Generation.open(backend, gen, cache)`.

A client (synthesis's document passes, Self-Lengthen's tasks, the judge pass) builds `Request`s and hands
them to a scheduler of an open generation; the answer comes back through its callback. The route of one
request:

    client -> RequestScheduler (cache lookup, queue by priority, attempts and seeds)
           -> EnginePool (long-lived engine actors, grown and shrunk with the queue, replaced when they die)
           -> Engine (the backend: hf, vllm, http, fake) -> validation (schema, then the client's content check)
           -> RequestCache (every finished request, persisted at once) -> the client's callback

Engines start with the first request that the cache cannot answer and are released when the block ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctxforge.generation.backends.base import GeneratorBackend
from ctxforge.generation.cache import RequestCache
from ctxforge.generation.pool import EnginePool
from ctxforge.generation.scheduler import RequestScheduler
from ctxforge.generation.validation import ContentCheck


class Generation:
    """An engine pool for one backend and the request cache it answers into; schedulers are made on it.

    Use as a context manager: `with Generation.open(backend, gen, cache) as generation: ...`; leaving the
    block releases every engine (and closes the cache when it was opened from a path)."""

    def __init__(self, backend: GeneratorBackend, gen: Any, cache: RequestCache | str | Path):
        self.backend = backend
        self.gen = gen
        self._owns_cache = not isinstance(cache, RequestCache)
        self.cache = RequestCache(cache) if self._owns_cache else cache
        self.pool = EnginePool(backend, gen.scale_down_idle_s, gen.max_engine_failures_in_a_row)

    @classmethod
    def open(cls, backend: GeneratorBackend, gen: Any, cache: RequestCache | str | Path) -> "Generation":
        """A generation for `backend` with `gen` (a GeneratorConfig), answering into `cache` (a RequestCache,
        or the path of one to open and close here)."""
        return cls(backend, gen, cache)

    def scheduler(self, prompt_hash: str = "", pass_names: tuple[str, ...] = (),
                  content_check: ContentCheck | None = None) -> RequestScheduler:
        """A request queue on this pool: requests without an id are finalized with the backend's model and
        `prompt_hash`; `content_check(request, object)` returns "" or the reason a schema-valid answer fails."""
        return RequestScheduler(self.pool, self.cache, self.gen, self.backend.model_path, prompt_hash, pass_names,
                                content_check)

    def engine_records(self) -> list[dict]:
        """Every engine's last snapshot (for the accounting)."""
        return self.pool.engine_records()

    def close(self) -> None:
        self.pool.shutdown()
        if self._owns_cache:
            self.cache.close()

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

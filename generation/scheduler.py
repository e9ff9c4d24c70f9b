"""The request scheduler: one queue for every document's requests, whatever pass each document is in.

Documents hand it requests with a priority (their admission rank: earlier documents first, so they
finish and leave the driver early) and a callback. It answers from the request cache when it can,
joins identical requests that are already on their way, and otherwise keeps the engine pool's slots
full from the queue. Every answer is validated (validation.py: the request's JSON schema, then the
client's content check) and persisted in the cache at once; a failed attempt goes back in the queue
with the next attempt's seed, up to generator.max_attempts, then is recorded as failed with its reason.
A request whose engine died is sent again with the same attempt, only to an engine started after that
death (alone on it from its second crash), and after generator.max_engine_crashes_per_request resends
it is recorded as failed with reason `engine_crash` and the engine's last error. Statistics are kept
per pass name.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from typing import Callable

from ctxforge.generation.cache import RequestCache
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.pool import EnginePool
from ctxforge.generation.requests import Request, request_row
from ctxforge.generation.stats import PassStats
from ctxforge.generation.validation import ContentCheck, reason_class, validate

log = logging.getLogger(__name__)

# Answer callback: (request, validated object or None when it failed for good)
OnAnswer = Callable[[Request, "dict | None"], None]


class RequestScheduler:
    """The queue of one client's requests on an engine pool (see the module's docstring); not thread-safe."""

    def __init__(self, pool: EnginePool, cache: RequestCache, gen: GeneratorConfig, model: str, prompt_hash: str = "",
                 pass_names: tuple[str, ...] = (), content_check: ContentCheck | None = None):
        self.pool = pool
        self.content_check = content_check
        self.cache = cache
        self.gen = gen
        self.model = model
        self.prompt_hash = prompt_hash
        self.stats: dict[str, PassStats] = {p: PassStats() for p in pass_names}
        self.first_ask: dict[str, float] = {}
        self.last_answer: dict[str, float] = {}
        self._queue: list = []                          # (priority, seq, request_id)
        self._seq = itertools.count()
        self._waiters: dict[str, list[tuple[Request, OnAnswer]]] = {}
        self._requests: dict[str, Request] = {}
        self._attempt: dict[str, int] = {}
        self._priority: dict[str, int] = {}
        self._answered: deque = deque()                 # callbacks to run (never run re-entrantly)
        self._crashes: dict[str, int] = {}              # request id -> engine deaths it was in flight for
        self._fresh_from: dict[str, int] = {}           # request id -> lowest engine serial it may go to
        self.lost_resent = 0

    # -- asking ---------------------------------------------------------------------------------
    def ask(self, requests: list[Request], priority: int, on_answer: OnAnswer) -> None:
        """Queue requests; every one gets exactly one on_answer call, possibly later. A request without an id
        is finalized here with this scheduler's model and prompt hash (a client that versions its requests
        otherwise finalizes them itself)."""
        gen = self.gen
        for req in requests:
            if not req.request_id:
                req.finalize(self.model, gen.temperature, gen.top_p, self.prompt_hash, gen.repetition_penalty)
        fresh = [r for r in requests if r.request_id not in self._waiters]
        done = self.cache.finished(list(dict.fromkeys(r.request_id for r in fresh)),
                                   include_failed=not gen.retry_failed) if fresh else {}
        now = time.time()
        for req in requests:
            stats = self._stat(req.pass_name)
            stats.requests += 1
            self.first_ask.setdefault(req.pass_name, now)
            rid = req.request_id
            if rid in self._waiters:            # the same content is already on its way: wait for it
                self._waiters[rid].append((req, on_answer))
                continue
            if rid in done:
                stats.cache_hits += 1
                entry = done[rid]
                obj = entry["output"] if entry["status"] == "ok" else None
                self._answered.append((on_answer, req, obj))
                self.last_answer[req.pass_name] = now
                continue
            self._waiters[rid] = [(req, on_answer)]
            self._requests[rid] = req
            self._attempt[rid] = 1
            self._priority[rid] = priority
            heapq.heappush(self._queue, (priority, next(self._seq), rid))

    def _stat(self, pass_name: str) -> PassStats:
        if pass_name not in self.stats:
            self.stats[pass_name] = PassStats()
        return self.stats[pass_name]

    # -- running --------------------------------------------------------------------------------
    def queued(self) -> int:
        return len(self._queue)

    def outstanding(self) -> int:
        """Requests queued or with an engine (not counting answers waiting for their callbacks)."""
        return len(self._queue) + self.pool.in_flight()

    def busy(self) -> bool:
        return bool(self._queue or self.pool.in_flight() or self._answered)

    def deliver(self) -> int:
        """Run the callbacks of answered requests (they may ask more); returns how many ran."""
        n = 0
        while self._answered:
            on_answer, req, obj = self._answered.popleft()
            on_answer(req, obj)
            n += 1
        return n

    def step(self, timeout: float = 0.5) -> None:
        """Fill free engine slots from the queue, wait up to `timeout` s for answers, and process them."""
        self.deliver()
        waiting_fresh = [self._fresh_from[rid] for _, _, rid in self._queue if rid in self._fresh_from]
        self.pool.autoscale(self.outstanding(), max(waiting_fresh) if waiting_fresh else None)
        self._dispatch()
        answered, lost = self.pool.poll(timeout if not self._answered else 0.0)
        for job in lost:
            self._lost(job.job, job.reason)
        for rid, result in answered:
            self._result(rid, result)
        if answered or lost:
            self.cache.commit()  # persisted as they come back: a kill loses at most this poll's answers
        self._dispatch()

    def _lost(self, rid: str, reason: str) -> None:
        """A request whose engine died: sent again to a fresh engine, or failed after too many deaths."""
        req = self._requests[rid]
        stats = self._stat(req.pass_name)
        self._crashes[rid] = self._crashes.get(rid, 0) + 1
        if self._crashes[rid] > self.gen.max_engine_crashes_per_request:
            stats.attempt_errors["engine_crash"] += 1
            self._finish(rid, None, f"engine_crash: {reason}", {})
            return
        self.lost_resent += 1
        stats.lost_resent += 1
        self._fresh_from[rid] = self.pool.fresh_mark()
        heapq.heappush(self._queue, (self._priority[rid], next(self._seq), rid))

    def _dispatch(self) -> None:
        gen = self.gen
        held = []   # requests waiting for a fresh engine: the rest of the queue goes on meanwhile
        while self._queue:
            priority, seq, rid = self._queue[0]
            req = self._requests[rid]
            row = request_row(req, self._attempt[rid], gen.temperature, gen.top_p, gen.repetition_penalty)
            crashes = self._crashes.get(rid, 0)
            if not self.pool.submit(row, rid, self._fresh_from.get(rid, 0), alone=crashes >= 2):
                if not crashes:
                    break
                held.append(heapq.heappop(self._queue))
                continue
            heapq.heappop(self._queue)
            self._stat(req.pass_name).sent += 1
        for item in held:
            heapq.heappush(self._queue, item)

    def _result(self, rid: str, result: dict) -> None:
        req = self._requests[rid]
        stats = self._stat(req.pass_name)
        attempt = self._attempt[rid]
        stats.prompt_tokens += int(result.get("prompt_tokens") or 0)
        stats.completion_tokens += int(result.get("completion_tokens") or 0)
        stats.request_s += float(result.get("duration_s") or 0.0)
        if result.get("error"):
            obj, reason = None, f"backend:{result['error']}"
        else:
            obj, reason = validate(req, result.get("output_text") or "", self.content_check)
        if obj is None:
            stats.attempt_errors[reason_class(reason)] += 1
            if attempt < self.gen.max_attempts:
                self._attempt[rid] = attempt + 1     # the next attempt samples with a new seed
                heapq.heappush(self._queue, (self._priority[rid], next(self._seq), rid))
                return
        self._finish(rid, obj, reason, result)

    def _finish(self, rid: str, obj: dict | None, reason: str, result: dict) -> None:
        """Record a request's final outcome (ok, or failed with `reason`) and queue its callbacks."""
        req = self._requests[rid]
        stats = self._stat(req.pass_name)
        if obj is None:
            stats.failed += 1
            stats.failures[reason_class(reason)] += 1
            status = "failed"
        else:
            stats.ok += 1
            status = "ok"
        self.cache.put(rid, req.pass_name, req.doc_id, req.key, status, obj, "" if obj is not None else reason,
                       self._attempt[rid], int(result.get("prompt_tokens") or 0), int(result.get("completion_tokens") or 0))
        now = time.time()
        for waiting_req, on_answer in self._waiters.pop(rid):
            self.last_answer[waiting_req.pass_name] = now
            self._answered.append((on_answer, waiting_req, obj))
        for table in (self._requests, self._attempt, self._priority, self._crashes, self._fresh_from):
            table.pop(rid, None)

    def run(self) -> None:
        """Step until every request asked so far (and every request their callbacks ask) is answered."""
        while self.busy():
            self.step()

    def finish(self) -> dict[str, PassStats]:
        """Per-pass statistics, with each pass's wall time from its first request to its last answer."""
        for name, stats in self.stats.items():
            if name in self.first_ask:
                stats.wall_s = self.last_answer.get(name, self.first_ask[name]) - self.first_ask[name]
        return self.stats

"""The request scheduler: one queue for every document's requests, whatever pass each document is in.

Documents hand it requests with a priority (their admission rank: earlier documents first, so they
finish and leave the driver early) and a callback. It answers from the request cache when it can,
joins identical requests that are already on their way, and otherwise keeps the engine pool's slots
full from the queue. Every answer is persisted in the cache as the backend gave it, at once, and
judged by today's rules (verdicts.py, over the cached attempts too); a failed attempt goes back in the
queue with the next attempt's seed, up to generator.max_attempts, then the request is failed with its
reason. A request whose engine was lost is sent again with the same attempt. Statistics are kept per
pass, as in the pass runner, and count every request decided in this run, from the cache or not.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from typing import Callable

from ctxforge.generation.cache import Attempt, RequestCache
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.pool import EnginePool
from ctxforge.generation.validation import PassStats
from ctxforge.generation.requests import Request, request_row
from ctxforge.generation.verdicts import Verdict, decide

log = logging.getLogger(__name__)

# Answer callback: (request, validated object or None when it failed for good)
OnAnswer = Callable[[Request, "dict | None"], None]


class RequestScheduler:
    def __init__(self, pool: EnginePool, cache: RequestCache, gen: GeneratorConfig, model: str, prompt_hash: str,
                 pass_names: tuple[str, ...]):
        self.pool = pool
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
        self._known: dict[str, dict[int, Attempt]] = {}   # attempts of the queued requests, cached or new
        self._counted: set[str] = set()                  # requests decided in this run (counted once each)
        self._priority: dict[str, int] = {}
        self._answered: deque = deque()                 # callbacks to run (never run re-entrantly)
        self.lost_resent = 0

    # -- asking ---------------------------------------------------------------------------------
    def ask(self, requests: list[Request], priority: int, on_answer: OnAnswer) -> None:
        """Queue requests (finalized here); every one gets exactly one on_answer call, possibly later."""
        gen = self.gen
        for req in requests:
            req.finalize(self.model, gen.temperature, gen.top_p, self.prompt_hash, gen.repetition_penalty)
        fresh = list(dict.fromkeys(r.request_id for r in requests if r.request_id not in self._waiters))
        known = self.cache.attempts(fresh) if fresh else {}
        now = time.time()
        for req in requests:
            stats = self._stat(req.pass_name)
            stats.requests += 1
            self.first_ask.setdefault(req.pass_name, now)
            rid = req.request_id
            if rid in self._waiters:            # the same content is already on its way: wait for it
                self._waiters[rid].append((req, on_answer))
                continue
            verdict = decide(req, known.get(rid, {}), gen.max_attempts, gen.retry_failed)
            if verdict.decided:                 # the cached attempts decide it under today's rules
                self._count(stats, rid, verdict)
                stats.cache_hits += 1
                self._answered.append((on_answer, req, verdict.obj))
                self.last_answer[req.pass_name] = now
                continue
            self._waiters[rid] = [(req, on_answer)]
            self._requests[rid] = req
            self._known[rid] = known.get(rid, {})
            self._attempt[rid] = verdict.next_attempt
            self._priority[rid] = priority
            heapq.heappush(self._queue, (priority, next(self._seq), rid))

    def _count(self, stats: PassStats, rid: str, verdict: Verdict) -> None:
        if rid not in self._counted:
            self._counted.add(rid)
            stats.count(verdict)

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
        self.pool.autoscale(self.outstanding())
        self._dispatch()
        answered, lost = self.pool.poll(timeout if not self._answered else 0.0)
        for job in lost:
            rid = job.job
            self.lost_resent += 1
            self._stat(self._requests[rid].pass_name).lost_resent += 1
            heapq.heappush(self._queue, (self._priority[rid], next(self._seq), rid))
        for rid, result in answered:
            self._result(rid, result)
        if answered:
            self.cache.commit()  # persisted as they come back: a kill loses at most this poll's answers
        self._dispatch()

    def _dispatch(self) -> None:
        gen = self.gen
        while self._queue:
            priority, seq, rid = self._queue[0]
            req = self._requests[rid]
            row = request_row(req, self._attempt[rid], gen.temperature, gen.top_p, gen.repetition_penalty)
            if not self.pool.submit(row, rid):
                return
            heapq.heappop(self._queue)
            self._stat(req.pass_name).sent += 1

    def _result(self, rid: str, result: dict) -> None:
        req = self._requests[rid]
        stats = self._stat(req.pass_name)
        attempt = self._attempt[rid]
        answer = Attempt(str(result.get("output_text") or ""), str(result.get("error") or ""),
                         int(result.get("prompt_tokens") or 0), int(result.get("completion_tokens") or 0), fresh=True)
        stats.prompt_tokens += answer.prompt_tokens
        stats.completion_tokens += answer.completion_tokens
        stats.request_s += float(result.get("duration_s") or 0.0)
        self.cache.put(rid, attempt, req.pass_name, req.doc_id, req.key, answer)
        self._known[rid][attempt] = answer
        verdict = decide(req, self._known[rid], self.gen.max_attempts, self.gen.retry_failed)
        if not verdict.decided:
            self._attempt[rid] = verdict.next_attempt     # the next attempt samples with a new seed
            heapq.heappush(self._queue, (self._priority[rid], next(self._seq), rid))
            return
        self._count(stats, rid, verdict)
        now = time.time()
        for waiting_req, on_answer in self._waiters.pop(rid):
            self.last_answer[waiting_req.pass_name] = now
            self._answered.append((on_answer, waiting_req, verdict.obj))
        for table in (self._requests, self._attempt, self._priority, self._known):
            del table[rid]

    def finish(self) -> dict[str, PassStats]:
        """Per-pass statistics, with each pass's wall time from its first request to its last answer."""
        for name, stats in self.stats.items():
            if name in self.first_ask:
                stats.wall_s = self.last_answer.get(name, self.first_ask[name]) - self.first_ask[name]
        return self.stats

"""The engine pool: long-lived generator actors that load their engine once and serve the whole run.

Why actors we own rather than a `ray.serve.llm` deployment started by the run: one mechanism serves
every backend (hf and the fake engine have no Serve app; http needs no GPU), the driver talks to the
engines directly (no HTTP hop, no JSON round trip), it knows which engine answered what (load, busy and
idle seconds per engine, for GPU-hours), it resends exactly the requests a lost engine held, and the
whole of it runs in CPU CI (`ray.serve.llm` cannot even be imported without vLLM). The engine inside
a vLLM actor is still `ray.data.llm`'s engine wrapper (backends/vllm.py).

Growth and shrinkage follow the work, not the pass structure: the pool starts `min` engines when
the first request arrives (a rerun answered from the cache loads none), adds
engines (up to `max`) while ready requests wait for a free slot, and releases an engine above `min`
that has had nothing to do for `generator.scale_down_idle_s`. An engine that asks for GPUs no node has
stays pending; on a cluster the Ray autoscaler launches a node for it (spot GPU workers). While no engine
has loaded, the pool tells the two waits apart after PENDING_WARNING_S: an engine Ray has not placed gets a
warning naming what it asks for, one placed and still loading its model an info line.

Preemption and crashes: when an engine's actor or node dies (or the engine raises EngineCrashed), every
request it held comes back from `poll()` as lost, with the engine's serial number and its last error, to be sent again (same attempt,
same seed: nothing is counted twice). The scheduler sends it only to an engine started after that death
(`submit(..., fresh_from=)`, see `autoscale`), alone on that engine from its second crash on (so that a
poisoned request cannot take innocent ones down with it twice), and records it as failed with reason
`engine_crash` after generator.max_engine_crashes_per_request resends. Engines that fail, loading or
running, generator.max_engine_failures_in_a_row times with no request completed in between stop the
run with one EngineFailureError naming the last error and the engine's arguments: a broken engine
configuration costs a bounded number of loads, never an endless restart loop. Every load, failed load,
death and replacement is counted (`counts()`, in the manifest's accounting).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray

from ctxforge.config import PreflightError
from ctxforge.generation.backends.base import EngineCrashed, EngineFactory, EngineMeter, GeneratorBackend, error_result

log = logging.getLogger(__name__)

# After this long with no engine loaded, say why: engines Ray has not placed get a warning (no node has the
# resources they ask for, or an autoscaler is starting one); engines placed and still loading an info line.
PENDING_WARNING_S = 120.0


class EngineActor:
    """Placed first, loaded second: the constructor only notes where Ray put the actor, so that the actor's
    creation completes once Ray has placed it; `load()` then builds the engine once (the model load), and
    the actor answers requests until the pool releases it."""

    def __init__(self, factory: EngineFactory):
        import os

        self.factory = factory
        self.meter = EngineMeter()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        self.engine = None
        self.pool = None

    async def placed(self) -> str:
        """The node Ray placed this actor on; answers as soon as the actor exists, before and during its load."""
        return self.node_id

    async def load(self) -> dict[str, Any]:
        """Build the engine; returns its snapshot (ready()). Raises what the engine's constructor raises."""
        # In a thread: the actor's event loop stays free during a load of minutes, and the engine is built with
        # no running event loop, as in an actor's constructor (vLLM starts its output handler on first use).
        self.engine = await asyncio.to_thread(self.factory.build)
        self.meter.loaded()
        if not self.engine.is_async:
            self.pool = ThreadPoolExecutor(max(1, self.engine.slots), thread_name_prefix="engine")
        return await self.ready()

    async def ready(self) -> dict[str, Any]:
        return {**self.meter.snapshot(), "node_id": self.node_id}

    async def generate(self, row: dict[str, Any]) -> dict[str, Any]:
        began = self.meter.begin()
        try:
            if self.engine.is_async:
                out = await self.engine.agenerate(row)
            else:
                out = await asyncio.get_running_loop().run_in_executor(self.pool, self.engine.generate, row)
        except EngineCrashed:
            raise             # the engine is broken: the pool sees the task fail with it and replaces the engine
        except Exception as exc:  # engines should not raise for one request; if one does, that row failed
            out = error_result(f"{type(exc).__name__}: {exc}")
        duration = self.meter.end(began)
        return {**out, "duration_s": duration, "engine": self.meter.snapshot()}

    async def stats(self) -> dict[str, Any]:
        return {**self.meter.snapshot(), "node_id": self.node_id}

    async def close(self) -> dict[str, Any]:
        snap = await self.stats()
        self.engine.close()
        return snap


_ENGINE_ACTOR = None


def _remote_engine_actor():
    global _ENGINE_ACTOR
    if _ENGINE_ACTOR is None:
        _ENGINE_ACTOR = ray.remote(EngineActor)
    return _ENGINE_ACTOR


@dataclass
class _Engine:
    actor: Any
    ready_ref: Any                                  # load(): the engine's snapshot once loaded
    placed_ref: Any                                 # placed(): answered once Ray has placed the actor on a node
    serial: int                                     # start order: engines with a higher serial started later
    placement_group: Any = None
    ready: bool = False
    told_loading: bool = False                      # the "still loading" info line was logged for this engine
    alone: bool = False                             # holds a request that must be the only one on it
    draining: bool = False                          # reserved for such a request: takes no other work
    created: float = field(default_factory=time.monotonic)
    idle_since: float = field(default_factory=time.monotonic)
    in_flight: dict = field(default_factory=dict)   # ObjectRef -> job
    last: dict = field(default_factory=dict)        # last stats snapshot the engine sent


@dataclass
class Lost:
    """A job whose engine died before answering: `reason` is the engine's last error, `serial` its start order
    (the job is sent again only to an engine with a higher serial)."""

    job: Any
    reason: str
    serial: int = -1


class EngineFailureError(PreflightError):
    """Engines failed (could not load, or died) generator.max_engine_failures_in_a_row times with no request
    completed in between: a bad model path, too little memory, an engine argument the engine rejects. A
    one-line error, like preflight's; nothing finished is lost and the same command resumes once the cause
    is fixed."""


def _last_line(exc: BaseException) -> str:
    """`Type: message` of what ended an engine: the original exception where Ray's error carries it in its last
    line (an actor that died in its constructor), else Ray's own error type and last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1][:300] if lines else ""
    return last if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Crashed)\b: ", last) else f"{type(exc).__name__}: {last}"


class EnginePool:
    """Driver-side handle on the engine actors. Not thread-safe: the scheduler's loop owns it."""

    def __init__(self, backend: GeneratorBackend, scale_down_idle_s: float = 60.0, max_failures_in_a_row: int = 4):
        self.backend = backend
        self.max_failures_in_a_row = max_failures_in_a_row
        self.factory = backend.engine_factory()
        self.min, self.max = backend.engine_range()
        self.slots = backend.slots_per_engine()
        self.gpus = backend.gpus_per_engine()
        self.scale_down_idle_s = scale_down_idle_s
        self.engines: dict[str, _Engine] = {}
        self.records: list[dict] = []          # final snapshots of released or lost engines
        self.started = 0                 # engine loads begun (every actor started)
        self.load_failures = 0           # engines whose load raised or whose actor died while loading
        self.lost_engines = 0            # loaded engines that died (crash, preemption)
        self.replacements = 0            # engines started after a death or failed load, in its place
        self._unreplaced = 0
        self.failures_in_a_row = 0       # load failures and deaths since the last completed request
        self.last_error = ""
        self.ever_ready = False
        self._warned_pending = False
        self._next_id = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def _start_one(self) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts = dict(self.backend.actor_options())
        pg = None
        bundles = self.backend.placement_bundles()
        if bundles:
            pg = ray.util.placement_group(bundles, strategy="PACK")
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
        # max_restarts=0: a lost engine is the pool's to replace, so that its requests are resent once and
        # every load is counted. max_concurrency: the slots plus room for placed()/load()/ready()/stats() calls.
        actor = _remote_engine_actor().options(max_restarts=0, max_concurrency=self.slots + 4, **opts).remote(self.factory)
        key = f"e{self._next_id}"
        # Two calls, answered in this order: placed() once Ray has placed the actor (its constructor holds no
        # load), load() once the engine is built; the pool tells "waiting for resources" from "loading" by the
        # first. (Ray's actor state cannot: it reads PENDING_CREATION both while no node has the resources and
        # while a constructor runs, and ray.util.state needs the dashboard, which a local run does not start.)
        self.engines[key] = _Engine(actor, actor.load.remote(), actor.placed.remote(), self._next_id, pg)
        self._next_id += 1
        self.started += 1
        if self._unreplaced:
            self._unreplaced -= 1
            self.replacements += 1

    def start(self) -> None:
        for _ in range(self.min):
            self._start_one()

    def _release(self, key: str, snapshot: dict | None, lost: bool = False) -> None:
        eng = self.engines.pop(key)
        if snapshot:
            self.records.append({**snapshot, "lost": lost})
        elif eng.last:
            self.records.append({**eng.last, "lost": lost})
        try:
            ray.kill(eng.actor, no_restart=True)
        except Exception:  # already dead
            pass
        if eng.placement_group is not None:
            try:
                ray.util.remove_placement_group(eng.placement_group)
            except Exception:
                pass

    def shutdown(self) -> None:
        """Release every engine; their final snapshots go to the accounting."""
        refs = {key: e.actor.close.remote() for key, e in self.engines.items() if e.ready}
        for key in list(self.engines):
            snap = None
            if key in refs:
                try:
                    snap = ray.get(refs[key], timeout=60)
                except Exception:
                    snap = None
            self._release(key, snap)

    # -- work -----------------------------------------------------------------------------------
    def capacity(self) -> int:
        """Requests the pool can hold at once when it is as large as it may grow."""
        return self.max * self.slots

    def in_flight(self) -> int:
        return sum(len(e.in_flight) for e in self.engines.values())

    def free_slots(self) -> int:
        return sum(self.slots - len(e.in_flight) for e in self.engines.values() if e.ready)

    def fresh_mark(self) -> int:
        """The serial the next engine will get: `submit(..., fresh_from=fresh_mark())` waits for an engine
        started from now on."""
        return self._next_id

    def submit(self, row: dict[str, Any], job: Any, fresh_from: int = 0, alone: bool = False) -> bool:
        """Send one request row to a ready engine; False when none can take it now.

        Normal jobs go to the engine with the most free slots. `fresh_from`: only engines with that serial
        or higher (started after the death that lost this job). `alone`: only an engine with nothing in flight,
        which then takes nothing else until this job is answered; until one is empty, the freshest eligible
        engine is reserved (takes no new work) so that it drains."""
        eligible = [e for e in self.engines.values() if e.ready and e.serial >= fresh_from and not e.alone]
        if alone:
            empty = [e for e in eligible if not e.in_flight]
            if not empty:
                if eligible and not any(e.draining for e in eligible):
                    max(eligible, key=lambda e: e.serial).draining = True
                return False
            best = max(empty, key=lambda e: e.serial)
            for eng in self.engines.values():   # the reservation is used: every engine takes work again
                eng.draining = False
            best.alone = True
        else:
            best, best_free = None, 0
            for eng in eligible:
                free = self.slots - len(eng.in_flight) if not eng.draining else 0
                if free > best_free:
                    best, best_free = eng, free
            if best is None:
                return False
        best.in_flight[best.actor.generate.remote(row)] = job
        return True

    def poll(self, timeout: float) -> tuple[list[tuple[Any, dict]], list[Lost]]:
        """Wait up to `timeout` s for answers; returns (job, result) pairs and jobs lost with their engine.

        Raises EngineFailureError when this poll's failed loads or deaths make generator.max_engine_failures_in_a_row
        in a row with no request completed (the pool is shut down first)."""
        waiting = {}
        for key, eng in self.engines.items():
            if not eng.ready:
                waiting[eng.ready_ref] = (key, None)
            for ref in eng.in_flight:
                waiting[ref] = (key, ref)
        if not waiting:
            if timeout:
                time.sleep(min(timeout, 0.05))
            return [], []
        refs = list(waiting)
        done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if done:
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        answered: list[tuple[Any, dict]] = []
        lost: list[Lost] = []
        dead: dict[str, str] = {}
        try:
            values = dict(zip(done, ray.get(done)))   # one call for the lot; per ref only when one failed
        except Exception:
            values = {}
        for ref in done:
            key, job_ref = waiting[ref]
            eng = self.engines.get(key)
            if eng is None or key in dead:
                continue
            try:
                value = values[ref] if ref in values else ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
                dead[key] = _last_line(exc)
                continue
            except ray.exceptions.RayTaskError as exc:
                # the engine's constructor raised (it could not load), or the engine reported itself broken
                if job_ref is None or isinstance(exc.cause, EngineCrashed):
                    dead[key] = _last_line(exc.cause if exc.cause is not None else exc)
                    continue
                answered.append((eng.in_flight.pop(ref), error_result(f"{type(exc.cause).__name__}: {exc.cause}")))
                continue
            if job_ref is None:
                eng.ready, eng.last, eng.idle_since = True, value, time.monotonic()
                self.ever_ready = True
                log.info("engine %s loaded in %.1f s on node %s", value["engine_id"], value["load_s"], value["node_id"][:8])
                continue
            job = eng.in_flight.pop(ref)
            eng.last = value.pop("engine")
            eng.alone = False
            self.failures_in_a_row = 0   # an engine completed a request: the engines can work
            if not eng.in_flight:
                eng.idle_since = time.monotonic()
            answered.append((job, value))
        for key, reason in dead.items():
            eng = self.engines.get(key)
            if eng is None:
                continue
            if eng.ready:
                self.lost_engines += 1
                log.warning("engine %s lost (%s) with %d requests in flight: they are sent again to a fresh engine",
                            eng.last.get("engine_id", key), reason, len(eng.in_flight))
            else:
                self.load_failures += 1
                log.warning("engine failed to load: %s", reason)
            lost.extend(Lost(job, reason, eng.serial) for job in eng.in_flight.values())
            eng.in_flight.clear()
            self._release(key, None, lost=eng.ready)
            self._unreplaced += 1
            self._failed(reason)
        return answered, lost

    def _failed(self, reason: str) -> None:
        """Count one engine failure (load or death); raises EngineFailureError at max_failures_in_a_row."""
        self.failures_in_a_row += 1
        self.last_error = reason
        if self.failures_in_a_row >= self.max_failures_in_a_row:
            self.shutdown()
            raise EngineFailureError(
                f"generator.backend={self.backend.name}: {self.failures_in_a_row} engines in a row failed to load or "
                f"died with no request completed; last error: {reason}; engine arguments: {self.factory.kwargs}")

    def counts(self) -> dict[str, int]:
        """The manifest's engine counts: loads begun, failed loads, deaths of loaded engines, replacements."""
        return {"loads": self.started, "load_failures": self.load_failures, "deaths": self.lost_engines,
                "replacements": self.replacements}

    def autoscale(self, backlog: int, fresh_from: int | None = None) -> None:
        """Grow while requests wait for slots; release engines idle for scale_down_idle_s (never below min).

        `fresh_from`: a lost request waits for an engine with this serial or higher; one is started (a
        replacement) when none is running or loading, first releasing the longest-idle older engine when
        the pool is at its maximum."""
        now = time.monotonic()
        if backlog == 0 and self.started == 0:
            return  # engines start with the first request: a rerun answered from the cache loads nothing
        if fresh_from is not None and not any(e.serial >= fresh_from for e in self.engines.values()):
            if len(self.engines) >= self.max:
                idle = sorted((e.idle_since, k) for k, e in self.engines.items() if e.ready and not e.in_flight)
                if idle:
                    self._release(idle[0][1], None)
            if len(self.engines) < self.max:
                self._start_one()
        want = min(self.max, max(self.min, math.ceil(backlog / max(1, self.slots))))
        if len(self.engines) < want:
            for _ in range(want - len(self.engines)):
                self._start_one()
        elif len(self.engines) > max(self.min, want):
            idle = [(e.idle_since, k) for k, e in self.engines.items()
                    if e.ready and not e.in_flight and now - e.idle_since >= self.scale_down_idle_s]
            for _, key in sorted(idle)[: len(self.engines) - max(self.min, want)]:
                log.info("releasing idle engine %s", self.engines[key].last.get("engine_id", key))
                try:
                    snap = ray.get(self.engines[key].actor.close.remote(), timeout=60)
                except Exception:
                    snap = None
                self._release(key, snap)
        if not self.ever_ready:
            self._report_unready(now)

    def _report_unready(self, now: float) -> None:
        """While no engine has loaded, say why once an engine has waited PENDING_WARNING_S: a warning (once)
        when Ray has not placed it (no node has its resources: the run waits for an autoscaler to add one, or
        forever), an info line (once per engine) when it is placed and still loading (minutes on a busy CPU)."""
        due = [e for e in self.engines.values()
               if not e.ready and not e.told_loading and now - e.created >= PENDING_WARNING_S]
        if not due:
            return
        placed = set(ray.wait([e.placed_ref for e in due], num_returns=len(due), timeout=0)[0])
        for eng in due:
            if eng.placed_ref in placed:
                eng.told_loading = True
                log.info("generator engine %d placed and still loading after %.0f s", eng.serial, now - eng.created)
        unplaced = [e for e in due if e.placed_ref not in placed]
        if unplaced and not self._warned_pending:
            self._warned_pending = True
            log.warning("no generator engine has loaded after %.0f s: %d cannot be placed, each asks for %s%s. The "
                        "cluster has %s. On an autoscaling cluster a node is being started; otherwise no node can "
                        "hold an engine.", max(now - e.created for e in unplaced), len(unplaced),
                        self.backend.actor_options(),
                        f" in a placement group {self.backend.placement_bundles()}" if self.backend.placement_bundles() else "",
                        ray.cluster_resources())

    # -- accounting -----------------------------------------------------------------------------
    def engine_records(self) -> list[dict]:
        """Every engine's last snapshot (released, lost, and still running)."""
        return self.records + [{**e.last, "lost": False} for e in self.engines.values() if e.last]

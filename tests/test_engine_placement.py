"""The engine pool tells an engine Ray cannot place (no node has its resources: a warning, the run cannot go
on unless an autoscaler adds a node) from one placed and still loading (an info line with its seconds: a
vLLM load takes minutes on a busy CPU). The threshold is made small; which message appears is checked,
never how long anything took."""

from __future__ import annotations

import logging

import pytest

from ctxforge.generation import pool as pool_module
from ctxforge.generation.backends import make_backend
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.pool import EnginePool

pytestmark = pytest.mark.slow

LOADING = "placed and still loading after"
UNPLACED = "cannot be placed"


def wait_for_report(monkeypatch, caplog, placed_first: bool, **gen_kwargs) -> list[logging.LogRecord]:
    """One engine started; once it is placed (`placed_first`: Ray starting its worker process takes longer than
    the test's threshold) or at once, the threshold drops to 0.2 s and the pool's loop runs (poll + autoscale)
    until it has said something about the engine; returns the pool's records."""
    import ray

    caplog.set_level(logging.INFO, logger=pool_module.log.name)
    gen = GeneratorConfig(backend="fake", model="fake", concurrency=1, num_cpus=0.25, **gen_kwargs)
    pool = EnginePool(make_backend(gen, "fake"))
    pool.start()
    try:
        if placed_first:
            ray.get([e.placed_ref for e in pool.engines.values()], timeout=300)
        monkeypatch.setattr(pool_module, "PENDING_WARNING_S", 0.2)
        for _ in range(600):       # a bound on the loop, not on the time: placing an actor takes seconds here
            pool.poll(0.1)
            pool.autoscale(backlog=1)
            if any(LOADING in r.getMessage() or UNPLACED in r.getMessage() for r in caplog.records):
                break
        assert not pool.ever_ready
    finally:
        pool.shutdown()
    return [r for r in caplog.records if r.name == pool_module.log.name]


def test_an_engine_placed_and_loading_gets_an_info_line_not_the_warning(ray_local, monkeypatch, caplog):
    records = wait_for_report(monkeypatch, caplog, True, engine_kwargs={"load_s": 600})
    loading = [r for r in records if LOADING in r.getMessage()]
    assert len(loading) == 1 and loading[0].levelno == logging.INFO, [r.getMessage() for r in records]
    assert "generator engine 0 placed and still loading after " in loading[0].getMessage()
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]


def test_an_engine_no_node_can_hold_gets_the_warning(ray_local, monkeypatch, caplog):
    records = wait_for_report(monkeypatch, caplog, False, resources={"ctxforge_test_no_such_node": 1})
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and UNPLACED in warnings[0].getMessage(), [r.getMessage() for r in records]
    assert "ctxforge_test_no_such_node" in warnings[0].getMessage()   # what the engine asks for is named
    assert not [r for r in records if LOADING in r.getMessage()]

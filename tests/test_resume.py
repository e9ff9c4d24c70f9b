"""kill -9 in the middle of `ctxforge synth`, run the same command again: nothing finished is redone,
nothing is duplicated, and the output equals an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fake_openai_server import FakeOpenAIServer

pytestmark = pytest.mark.slow

ARGS = [
    "input.limit=2", "qa.hierarchical_per_document=4", "qa.diverse_per_document=2",
    "concat.stages=[{name: 2K, target_tokens: 2048, documents_per_sample: 1, samples: 2},"
    " {name: 4K, target_tokens: 4096, documents_per_sample: 2, samples: 2}]",
    "runtime.progress=false", "generator.backend=http", "generator.model=fake", "generator.concurrency=1",
    "generator.api_key_env=null",
]


def synth_cmd(out: Path, base_url: str) -> list[str]:
    return [sys.executable, "-m", "ctxforge", "synth", "--config", "tiny", f"output.dir={out}",
            f"generator.base_url={base_url}", *ARGS]


def cache_rows(out: Path) -> list[tuple]:
    db_path = out / "work" / "requests.sqlite"
    if not db_path.exists():
        return []
    try:
        db = sqlite3.connect(db_path, timeout=1)
        rows = db.execute("SELECT request_id, attempt, output_text, error FROM attempts "
                          "ORDER BY request_id, attempt").fetchall()
        db.close()
        return rows
    except sqlite3.OperationalError:  # the schema is not created yet
        return []


def outputs(out: Path) -> dict:
    result = {"qa": pq.read_table(out / "qa" / "qa.parquet").to_pylist()}
    for stage in ("2K", "4K"):
        result[stage] = [row for f in sorted((out / "samples" / stage).glob("*.parquet"))
                         for row in pq.read_table(f).to_pylist()]
    return result


def wait_until_quiet(server, quiet_s: float = 3.0, limit_s: float = 120.0) -> int:
    seen, since, start = server.stats.snapshot()["requests"], time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - start < limit_s:
        time.sleep(0.2)
        now = server.stats.snapshot()["requests"]
        if now != seen:
            seen, since = now, time.monotonic()
    return seen


def test_killed_run_resumes_without_redoing_or_duplicating(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with FakeOpenAIServer(latency_s=0.25) as server:
        # 1. the interrupted run: SIGKILL its whole process group (driver and its local Ray) mid-generation
        out = tmp_path / "resumed"
        proc = subprocess.Popen(synth_cmd(out, server.base_url), env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while len(cache_rows(out)) < 5:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no request finished in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done_before_kill = cache_rows(out)
        assert not (out / "manifest.json").exists()
        # Ray's worker processes live outside the driver's process group: the generator actor may send a
        # request or two until Ray reaps it after the driver's death. Count from when the server is quiet.
        requests_before_rerun = wait_until_quiet(server)

        # 2. the same command again, to the end
        server.configure(latency_s=0.0)
        subprocess.run(synth_cmd(out, server.base_url), env=env, check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        resumed_requests = server.stats.snapshot()["requests"] - requests_before_rerun

        # 3. an uninterrupted run with its own cache
        clean = tmp_path / "clean"
        subprocess.run(synth_cmd(clean, server.base_url), env=env, check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        clean_requests = server.stats.snapshot()["requests"] - requests_before_rerun - resumed_requests

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["requests"]["cache_hits"] >= len(done_before_kill) >= 5
    # nothing finished before the kill was asked again, and every cache entry is unique
    assert resumed_requests == clean_requests - len(done_before_kill)
    final = cache_rows(out)
    assert len(final) == len({r[:2] for r in final}) == len(cache_rows(clean))
    assert set(done_before_kill) <= set(final)  # finished answers were kept as they were
    assert final == cache_rows(clean)
    assert outputs(out) == outputs(clean)

"""Throughput of the http generator backend against a fake server with a fixed latency.

    .venv/bin/python bench/bench_http_throughput.py [--latency 0.2] [--rounds 10] [--concurrency 1 8 32]

With every request taking `latency` seconds, the ideal rate at `c` requests in flight is c / latency.
For each concurrency it runs rounds*c requests and prints achieved/ideal for:
  udf direct      HTTPGeneratorUDF called in-process on all rows at once (the thread pool alone)
  ray e2e         HTTPBackend.apply(...).take_all() wall time, including Ray Data planning and actor start-up
  ray steady      the same run measured at the server, first request arrival to last response
                  (how full the pipe is once the actor runs: batch boundaries show up here)
and the same Ray runs with one batch in flight per actor (BATCHES_IN_FLIGHT=1) for comparison, and
the fixed costs of the default run: start-up (apply() to the first request: planning, actor start,
imports) and drain (last response to take_all() returning).
Target: ray steady >= 0.9 at concurrency 32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_openai_server import FakeOpenAIServer  # noqa: E402

import ray  # noqa: E402

from ctxforge.pipeline.config import GeneratorConfig  # noqa: E402
from ctxforge.pipeline.generators import http as http_backend  # noqa: E402
from ctxforge.pipeline.generators.base import rows_batch  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string", "maxLength": 400}, "answer": {"type": "string", "maxLength": 1200},
                   "evidence_quote": {"type": "string", "maxLength": 300}},
    "required": ["question", "answer", "evidence_quote"],
    "additionalProperties": False,
}


def make_rows(n: int) -> list[dict]:
    text = "And God said, Let there be light: and there was light. And God saw the light, that it was good."
    return [{
        "request_id": f"req-{i:05d}",
        "messages": json.dumps([{"role": "user", "content": f"Document {i}: {text}"}]),
        "schema": json.dumps(SCHEMA), "schema_name": "qa", "max_tokens": 256,
        "temperature": 0.7, "top_p": 0.95, "seed": i,
    } for i in range(n)]


def server_window(server: FakeOpenAIServer) -> tuple[float, float]:
    s = server.stats.snapshot()
    return s["first_request_at"], s["last_response_at"]


def run_udf(server, rows, c) -> float:
    udf = http_backend.HTTPGeneratorUDF(server.base_url, "fake", "BENCH_NO_KEY", c, 30.0, 0, 0.01)
    t = time.perf_counter()
    out = udf(rows_batch(rows))
    elapsed = time.perf_counter() - t
    assert all(e == "" for e in out["error"]), set(out["error"])
    return elapsed


def run_ray(server, rows, c, batches_in_flight) -> tuple[float, float, float, float]:
    """(end-to-end s, steady s, start-up s before the first request, drain s after the last response)"""
    http_backend.BATCHES_IN_FLIGHT = batches_in_flight
    cfg = GeneratorConfig(backend="http", base_url=server.base_url, model="fake", api_key_env="BENCH_NO_KEY",
                          concurrency=c, max_retries=0, timeout_s=30.0)
    server.stats.reset()
    t = time.monotonic()  # the server's clock too
    out = http_backend.HTTPBackend(cfg, "fake").apply(ray.data.from_items(rows)).take_all()
    done = time.monotonic()
    assert len(out) == len(rows) and all(r["error"] == "" for r in out)
    first, last = server_window(server)
    return done - t, last - first, first - t, done - last


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    default_bif = http_backend.BATCHES_IN_FLIGHT
    print(f"latency {args.latency:.3f} s, {args.rounds} rounds per concurrency; ratio = achieved / (c / latency)")
    print(f"{'c':>4} {'n':>5} {'ideal/s':>8} | {'udf direct':>10} | {'ray e2e':>8} {'ray steady':>10} "
          f"| {'1 batch e2e':>11} {'1 batch steady':>14} | {'start-up s':>10} {'drain s':>7}")
    with FakeOpenAIServer(latency_s=args.latency) as server:
        run_ray(server, make_rows(4), 4, default_bif)  # warm-up: worker processes, imports
        for c in args.concurrency:
            n = c * args.rounds
            rows = make_rows(n)
            ideal = c / args.latency
            ratio = lambda s: n / s / ideal  # noqa: E731
            udf_s = run_udf(server, rows, c)
            e2e, steady, startup, drain = run_ray(server, rows, c, default_bif)
            e2e1, steady1, _, _ = run_ray(server, rows, c, 1)
            print(f"{c:>4} {n:>5} {ideal:>8.1f} | {ratio(udf_s):>10.3f} | {ratio(e2e):>8.3f} {ratio(steady):>10.3f} "
                  f"| {ratio(e2e1):>11.3f} {ratio(steady1):>14.3f} | {startup:>10.2f} {drain:>7.2f}", flush=True)
    http_backend.BATCHES_IN_FLIGHT = default_bif
    ray.shutdown()


if __name__ == "__main__":
    main()

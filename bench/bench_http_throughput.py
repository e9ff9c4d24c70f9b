"""End-to-end throughput of the http generator against a fake endpoint with a fixed latency, side by side with
ray.data.llm's own HTTP request processor (same requests, concurrency and latency), with and without 5% 500s.

    .venv/bin/python bench/bench_http_throughput.py [--latency 0.2] [--rounds 10] [--concurrency 32] [--p500 0.05] [--smoke]

With every request taking `latency` seconds, the ideal rate at `c` requests in flight is c / latency. Each
path sends rounds * c requests and must end with a completion for every one of them; ratio = achieved / ideal:
  ours, cold          the engine pool as synthesis runs it: one HTTP engine actor started, then every request
                      through the scheduler (cache, validation), wall time from pool start to the last answer
  ours, warm          the next rounds * c requests on the same engines (every later pass of a run: no start-up)
  ours, steady        the warm run measured at the server, first arrival to last response
  ray.data.llm        HttpRequestProcessorConfig + build_processor, c/4 actors of 4 concurrent batches (its async
                      stage runs at most 4 batches per actor, each batch one request after another), batch_size =
                      rounds; rows that come back with an error (it retries 408/429/502/503/504, not 500) are sent
                      again in a new job until every request has its completion, as a user would have to
The last column is ours (cold) / ray.data.llm. Targets: ours >= 0.9 end to end, ahead of ray.data.llm with 500s too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_openai_server import FakeOpenAIServer  # noqa: E402
from smoke_sizes import parse_args  # noqa: E402

import ray  # noqa: E402

from ctxforge.generation.cache import RequestCache  # noqa: E402
from ctxforge.generation.config import GeneratorConfig  # noqa: E402
from ctxforge.generation.pool import EnginePool  # noqa: E402
from ctxforge.generation.backends.http import HTTPBackend  # noqa: E402
from ctxforge.generation.requests import Request  # noqa: E402
from ctxforge.generation.scheduler import RequestScheduler  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string", "maxLength": 400}, "answer": {"type": "string", "maxLength": 1200},
                   "evidence_quote": {"type": "string", "maxLength": 300}},
    "required": ["question", "answer", "evidence_quote"],
    "additionalProperties": False,
}
TEXT = "And God said, Let there be light: and there was light. And God saw the light, that it was good."


def make_requests(n: int, tag: str) -> list[Request]:
    return [Request("qa", f"doc{i % 7}", f"{tag}{i:05d}", [{"role": "user", "content": f"Document {tag} {i}: {TEXT}"}],
                    "qa", SCHEMA, 256) for i in range(n)]


def gen_config(server: FakeOpenAIServer, c: int) -> GeneratorConfig:
    return GeneratorConfig(backend="http", base_url=server.base_url, model="fake", api_key_env=None, concurrency=c,
                           max_retries=8, retry_base_s=0.2, timeout_s=30.0, temperature=0.7, top_p=0.95)


def run_ours(server, c: int, n: int, workdir: Path) -> tuple[float, float, float]:
    """(cold e2e s, warm e2e s, warm steady s): a pool started, n requests, then n more on the same engine."""
    gen = gen_config(server, c)
    pool = EnginePool(HTTPBackend(gen, "fake"))
    cache = RequestCache(workdir / f"cache-{time.monotonic_ns()}.sqlite")
    sched = RequestScheduler(pool, cache, gen, "fake", "bench", ("qa",))
    times = []
    try:
        for round_tag in ("cold", "warm"):
            reqs = make_requests(n, round_tag)
            answers = []
            server.stats.reset()
            t = time.monotonic()
            if round_tag == "cold":
                pool.start()
            sched.ask(reqs, 0, lambda req, obj: answers.append(obj))
            while sched.busy():
                sched.step(0.05)
            times.append(time.monotonic() - t)
            assert len(answers) == n and all(a is not None for a in answers), "a request failed"
        s = server.stats.snapshot()
        steady = s["last_response_at"] - s["first_request_at"]
    finally:
        pool.shutdown()
        cache.close()
    return times[0], times[1], steady


def run_ray_data_llm(server, c: int, n: int, rounds: int) -> tuple[float, int]:
    """(e2e s until every request has a completion, jobs it took)."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(
        url=server.base_url + "/chat/completions", headers={"Content-Type": "application/json"},
        batch_size=rounds, concurrency=max(1, c // 4), max_retries=8, base_retry_wait_time_in_s=0.2,
        http_request_stage={"num_cpus": 0.05})
    processor = build_processor(
        config,
        preprocess=lambda row: {"key": row["key"], "payload": {
            "model": "fake", "messages": [{"role": "user", "content": row["content"]}], "max_tokens": 256,
            "temperature": 0.7, "top_p": 0.95,
            "response_format": {"type": "json_schema", "json_schema": {"name": "qa", "schema": SCHEMA, "strict": True}}}},
        # Arrow merges the columns of good and error responses: an error row has choices = None
        postprocess=lambda row: {"key": row["key"], "ok": bool((row.get("http_response") or {}).get("choices"))},
        preprocess_map_kwargs={"num_cpus": 0.05}, postprocess_map_kwargs={"num_cpus": 0.05},
    )
    todo = [{"key": r.key, "content": r.messages[0]["content"]} for r in make_requests(n, "rdl")]
    t = time.monotonic()
    jobs = 0
    while todo:
        jobs += 1
        out = processor(ray.data.from_items(todo)).take_all()
        failed = {r["key"] for r in out if not r["ok"]}
        todo = [r for r in todo if r["key"] in failed]
    return time.monotonic() - t, jobs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32])
    ap.add_argument("--p500", type=float, default=0.05)
    args = parse_args(ap, {"latency": 0.05, "rounds": 2, "concurrency": [4]})

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"latency {args.latency:.3f} s, {args.rounds} rounds; ratio = achieved / (c / latency); machine: "
          f"{ray.cluster_resources().get('CPU')} CPUs")
    print(f"{'500s':>5} {'c':>4} {'n':>5} {'ideal/s':>8} | {'ours cold':>9} {'ours warm':>9} {'ours steady':>11} "
          f"| {'ray.data.llm':>12} {'(jobs)':>6} | {'ours/ray.data.llm':>17}")
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAIServer(latency_s=args.latency) as server:
        run_ours(server, 4, 8, Path(tmp) / "warm-up")   # warm-up: worker processes, imports
        for p500 in (0.0, args.p500):
            server.configure(p_500=p500, seed=1)
            for c in args.concurrency:
                n = c * args.rounds
                ideal = c / args.latency
                ratio = lambda s: n / s / ideal  # noqa: E731
                cold, warm, steady = run_ours(server, c, n, Path(tmp))
                rdl, jobs = run_ray_data_llm(server, c, n, args.rounds)
                print(f"{p500:>5.0%} {c:>4} {n:>5} {ideal:>8.1f} | {ratio(cold):>9.3f} {ratio(warm):>9.3f} "
                      f"{ratio(steady):>11.3f} | {ratio(rdl):>12.3f} {jobs:>6} | "
                      f"{rdl / cold:>17.2f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()

"""Serving benchmarks on the tiny model (CPU): prints ratios from one run, asserts nothing.

1. Endpoint overhead: median latency of a chat completion through Ray Serve (HTTP proxy -> FastAPI
   ingress -> replica) relative to calling the same engine in-process, for a short and a long prompt.
   Both sides decode the same greedy tokens with one torch thread (what a fractional-CPU Ray replica
   gets), so the ratio isolates the serving path.
2. Evaluation throughput: the eval client sending the same RULER-shaped requests at concurrency 1 vs 16
   (requests per second, and the ratio).
3. Decoding features in-process, per generated token relative to plain greedy decoding: a JSON-schema
   grammar (xgrammar mask every step), logprobs with 5 alternatives, and prompt logprobs (full-prompt
   logits instead of the last position's).

    .venv/bin/python bench/bench_serve.py [--requests 12] [--max-tokens 8] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from smoke_sizes import parse_args  # noqa: E402
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompt(words: int) -> str:
    from ctxforge.serve.ruler_data import essay_words, take_words
    return "Read this and answer. " + " ".join(take_words(essay_words("builtin:kjv"), words))


def in_process_latencies(model_path: str, prompts: dict[str, str], n: int, max_tokens: int) -> dict[str, list[float]]:
    import torch

    from ctxforge.serve.served_model import HFServedModel, SamplingParams

    torch.set_num_threads(1)
    engine = HFServedModel(model_path, "tiny", 32768, device="cpu")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(text: str) -> float:
        t0 = time.perf_counter()
        ids = engine.encode_chat([{"role": "user", "content": text}], True, False)
        async for _ in engine.generate(ids, params):
            pass
        return time.perf_counter() - t0

    out = {}
    for name, text in prompts.items():
        asyncio.run(one(text))  # warm-up
        out[name] = [asyncio.run(one(text)) for _ in range(n)]
    return out


def feature_costs(model_path: str, n: int, max_tokens: int) -> dict[str, float]:
    """Seconds per generated token (median of n) for plain greedy decoding and with each feature on."""
    import torch

    from ctxforge.serve.served_model import HFServedModel, SamplingParams

    torch.set_num_threads(1)
    engine = HFServedModel(model_path, "tiny", 32768, device="cpu")
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"]}
    ids = engine.encode_chat([{"role": "user", "content": _prompt(300)}], True, False)
    variants = {"plain": {}, "json_schema": {"grammar": engine.compile_constraint("json_schema", schema)},
                "logprobs=5": {"logprobs": 5}, "prompt_logprobs=5": {"prompt_logprobs": 5}}

    async def one(params: SamplingParams) -> float:
        t0 = time.perf_counter()
        tokens = 0
        async for step in engine.generate(ids, params):
            tokens = step.completion_tokens or tokens
        return (time.perf_counter() - t0) / max(tokens, 1)

    out = {}
    for name, extra in variants.items():
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1, **extra)
        asyncio.run(one(params))  # warm-up (compiles nothing new: grammars are cached)
        out[name] = statistics.median(asyncio.run(one(params)) for _ in range(n))
    return out


def served_latencies(base_url: str, prompts: dict[str, str], n: int, max_tokens: int) -> dict[str, list[float]]:
    import httpx

    out = {}
    with httpx.Client(timeout=600) as http:
        for name, text in prompts.items():
            body = {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                    "temperature": 0}
            http.post(f"{base_url}/chat/completions", json=body).raise_for_status()  # warm-up
            lat = []
            for _ in range(n):
                t0 = time.perf_counter()
                http.post(f"{base_url}/chat/completions", json=body).raise_for_status()
                lat.append(time.perf_counter() - t0)
            out[name] = lat
    return out


def eval_throughput(base_url: str, concurrency: int, n: int, max_tokens: int) -> float:
    from ctxforge.serve.client import EvalClient, EvalItem
    from ctxforge.serve.eval_config import ClientConfig

    items = [EvalItem({"messages": [{"role": "user", "content": f"{_prompt(200)} #{i}"}], "max_tokens": max_tokens,
                       "temperature": 0}, {"i": i}, lambda pred: 0.0) for i in range(n)]
    client = EvalClient(base_url, "tiny", f"bench-c{concurrency}", ClientConfig(concurrency=concurrency))
    t0 = time.perf_counter()
    recs = asyncio.run(client.run(items))
    wall = time.perf_counter() - t0
    assert all(r.error is None for r in recs), [r.error for r in recs if r.error][:1]
    return n / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12, help="requests per measurement")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--throughput-requests", type=int, default=32)
    args = parse_args(ap, {"requests": 2, "max_tokens": 2, "throughput_requests": 4})

    import ray
    from ray import serve

    from ctxforge.models import resolve_model_path
    from ctxforge.serve.app import run_app
    from ctxforge.serve.config import ServeConfig

    model_path = resolve_model_path("ctxforge:tiny")
    prompts = {"short (~30 tok)": _prompt(10), "long (~4K tok)": _prompt(3000)}
    local = in_process_latencies(model_path, prompts, args.requests, args.max_tokens)
    costs = feature_costs(model_path, max(3, args.requests // 3), 32)
    print("\nDecoding features (tiny model, CPU, one thread, 32 tokens after a ~400-token prompt):")
    print(f"  {'feature':<18} {'s/token':>9} {'vs plain':>9}")
    for name, sec in costs.items():
        print(f"  {name:<18} {sec:>9.4f} {sec / costs['plain']:>8.2f}x")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        base_url = run_app(ServeConfig(model=model_path, served_model_name="tiny", port=_free_port(), max_model_len=32768,
                                       max_ongoing_requests=32, app_name="bench-serve"))
        remote = served_latencies(base_url, prompts, args.requests, args.max_tokens)
        print(f"\nEndpoint overhead (tiny model, CPU, {args.max_tokens} new tokens, median of {args.requests}):")
        print(f"  {'prompt':<18} {'in-process (s)':>15} {'Ray Serve (s)':>14} {'ratio':>7}")
        for name in prompts:
            a, b = statistics.median(local[name]), statistics.median(remote[name])
            print(f"  {name:<18} {a:>15.4f} {b:>14.4f} {b / a:>7.2f}x")
        tp1 = eval_throughput(base_url, 1, args.throughput_requests, args.max_tokens)
        tp16 = eval_throughput(base_url, 16, args.throughput_requests, args.max_tokens)
        print(f"\nEval client throughput ({args.throughput_requests} requests of ~300 tokens, {args.max_tokens} new tokens):")
        print(f"  concurrency 1:  {tp1:.2f} req/s")
        print(f"  concurrency 16: {tp16:.2f} req/s   ratio {tp16 / tp1:.2f}x")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

"""hf (transformers) and vLLM side by side on SmolLM2: the same synthesis, then the same evaluation requests.

    .venv/bin/python bench/bench_backends.py [--books 2] [--eval-requests 8] [--prefill-tokens 4096]
                                             [--prefill-prompts 2] [--kv-cache-gib 1] [--smoke] [--out DIR]

Synthesis: `ctxforge synth --config smollm2` (the demo's synthesis: the first --books KJV books under 1,700
tokens) once with generator.backend=hf and once with generator.backend=vllm (device cpu here), each into a
fresh output folder (no request cache), measured from each run's manifest:
  load s            the engines' load seconds (summed over engines; hf runs two engines, vLLM one)
  requests/s        requests answered / generation phase seconds (the phase includes the load)
  completion tok/s  completion tokens / generation phase seconds
  busy share        the engines' generating seconds / their alive seconds (as the engines measure them)
Evaluation: the same chat requests sent in-process to the engine each backend serves with (ctxforge's
HFServedModel, what `ctxforge serve backend=hf` runs; vLLM's AsyncLLM, what `ray.serve.llm` runs), without the
HTTP endpoint: requests/s with 1 and with 8 requests in flight (--eval-requests requests of exactly 64 tokens,
greedy, end-of-sequence ignored),
and prefill tokens/s on --prefill-tokens-token prompts (one completion token each, one at a time).
Ratios are vllm / hf. Only one vLLM engine is alive at a time, each with a --kv-cache-gib KV cache.

--smoke: one book with one hierarchical and one diverse question, 2 evaluation requests, 512-token prefill,
and hf only (a vLLM load alone takes 40 s to minutes on a small CPU); it checks that the benchmark runs
(tests/test_bench_backends_smoke.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

RNG_TEXT = ("And the word of the LORD came unto Jonah the son of Amittai, saying, Arise, go to Nineveh, that great "
            "city, and cry against it; for their wickedness is come up before me. ")


def synth_run(backend: str, out: Path, books: int, kv_gib: float, extra: list[str] = ()) -> dict:
    """One `ctxforge synth --config smollm2` run on `backend`; figures from its manifest."""
    from ctxforge.config import load_config
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import synthesize

    overrides = [f"output.dir={out}", f"input.limit={books}", "runtime.progress=false", f"generator.backend={backend}"]
    if backend == "vllm":
        overrides += ["generator.device=cpu", "generator.concurrency=1", f"generator.kv_cache_gib={kv_gib}"]
    cfg = load_config(SynthConfig, "smollm2", [*overrides, *extra])
    t = time.monotonic()
    synthesize(cfg)
    wall = time.monotonic() - t
    m = json.loads((out / "manifest.json").read_text())
    e, total = m["accounting"]["engines"], m["requests"]["total"]
    gen_s = m["timings_s"]["generate_s"]
    return {"wall_s": wall, "generate_s": gen_s, "engines": e["engines"], "load_s": e["load_s"],
            "busy": e["busy_fraction"], "requests": total["requests"], "ok": total["ok"], "failed": total["failed"],
            "sent": total["sent"], "req_per_s": total["sent"] / gen_s if gen_s else 0.0,
            "completion_tok_per_s": total["completion_tokens"] / gen_s if gen_s else 0.0}


def eval_prompts(tokenizer, n: int, prefill_tokens: int) -> tuple[list[list[int]], list[list[int]]]:
    """n short chat prompts (token ids) and two prompts of about prefill_tokens tokens."""
    short = [tokenizer.apply_chat_template([{"role": "user", "content": f"Question {i}: who was sent to Nineveh, "
                                                                          f"and why? {RNG_TEXT}"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
             for i in range(n)]
    unit = tokenizer(RNG_TEXT, add_special_tokens=False)["input_ids"]
    long = [list(unit) * (prefill_tokens // len(unit)) for _ in range(2)]
    for i, ids in enumerate(long):
        ids[0] = unit[(i + 1) % len(unit)]   # distinct prompts: no prefix-cache hit between them
    return [list(s) for s in short], long


async def _hf_one(engine, ids, max_tokens):
    from ctxforge.serve.sampling import SamplingParams

    n = 0
    async for step in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                      ignore_eos=True)):
        n += len(step.token_ids)
    return n


async def _vllm_one(engine, ids, max_tokens, key):
    from vllm import SamplingParams, TokensPrompt

    final = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=ids),
                                     SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), key):
        final = out
    return len(final.outputs[0].token_ids)


async def _measure(one, short, long, concurrency_levels=(1, 8), max_tokens=64) -> dict:
    await one(short[0], 4)   # warm-up
    res = {}
    for c in concurrency_levels:
        sem = asyncio.Semaphore(c)

        async def bounded(ids):
            async with sem:
                return await one(ids, max_tokens)
        t = time.perf_counter()
        await asyncio.gather(*(bounded(ids) for ids in short))
        res[f"req_per_s_c{c}"] = len(short) / (time.perf_counter() - t)
    t = time.perf_counter()
    for ids in long:
        await one(ids, 1)
    res["prefill_tok_per_s"] = sum(len(ids) for ids in long) / (time.perf_counter() - t)
    return res


def eval_hf(model_path: str, short, long, max_model_len: int) -> dict:
    from ctxforge.serve.served_model import HFServedModel

    t = time.perf_counter()
    engine = HFServedModel(model_path, "smollm2", max_model_len, device="cpu")
    load = time.perf_counter() - t
    res = asyncio.run(_measure(lambda ids, n: _hf_one(engine, ids, n), short, long))
    return {"load_s": load, **res}


def eval_vllm(model_path: str, short, long, max_model_len: int, kv_gib: float) -> dict:
    from vllm import AsyncEngineArgs, AsyncLLMEngine

    t = time.perf_counter()
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=model_path, max_model_len=max_model_len, enforce_eager=True, enable_chunked_prefill=False,
        kv_cache_memory_bytes=int(kv_gib * (1 << 30)), enable_prefix_caching=False, seed=0))
    load = time.perf_counter() - t
    counter = iter(range(10 ** 9))
    try:
        res = asyncio.run(_measure(lambda ids, n: _vllm_one(engine, ids, n, f"r{next(counter)}"), short, long))
    finally:
        engine.shutdown()
    return {"load_s": load, **res}


def ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--books", type=int, default=2, help="KJV books synthesized (the demo: 2)")
    ap.add_argument("--eval-requests", type=int, default=8, help="evaluation requests per concurrency level")
    ap.add_argument("--prefill-tokens", type=int, default=4096, help="prompt length of the prefill measurement")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache per engine (GiB)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, hf only: checks that the benchmark runs")
    ap.add_argument("--out", default=None, help="keep the synthesis outputs here (default: a temporary folder)")
    args = ap.parse_args()
    # smoke: one book and one question of each kind, so the run checks the code path, not the model's speed
    smoke_synth = ["qa.hierarchical_per_document=1", "qa.diverse_per_document=1", "qa.followup_ratio=0"]
    if args.smoke:
        args.books, args.eval_requests, args.prefill_tokens = 1, 2, 512
    backends = ["hf"] if args.smoke else ["hf", "vllm"]

    from ctxforge.models import load_tokenizer, resolve_model_path
    from ctxforge.pipeline.run import cache_dir

    model = resolve_model_path("ctxforge:smollm2", cache_dir())
    tmp = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-backends-"))
    synth = {}
    for b in backends:
        shutil.rmtree(tmp / b, ignore_errors=True)
        synth[b] = synth_run(b, tmp / b, args.books, args.kv_cache_gib, smoke_synth if args.smoke else [])
    import ray
    ray.shutdown()   # the synthesis engines are gone; the evaluation engines run in this process

    short, long = eval_prompts(load_tokenizer(model), args.eval_requests, args.prefill_tokens)
    window = args.prefill_tokens + 256
    evals = {"hf": eval_hf(model, short, long, window)}
    if "vllm" in backends:
        evals["vllm"] = eval_vllm(model, short, long, window, args.kv_cache_gib)
    if not args.out:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"SmolLM2-135M-Instruct; synthesis = the demo's (configs/smollm2.yaml, {args.books} book(s)); "
          f"evaluation: {args.eval_requests} requests x 64 tokens, prefill on {len(long[0])}-token prompts")
    cols = ["wall s", "load s", "requests", "ok/failed", "req/s", "compl tok/s", "busy share"]
    print("synthesis  " + "".join(f"{c:>13}" for c in cols))
    for b, r in synth.items():
        vals = [f"{r['wall_s']:.1f}", f"{r['load_s']:.1f}", f"{r['sent']}", f"{r['ok']}/{r['failed']}",
                f"{r['req_per_s']:.3f}", f"{r['completion_tok_per_s']:.1f}", f"{r['busy']:.0%}"]
        print(f"{b:<11}" + "".join(f"{v:>13}" for v in vals))
    cols = ["load s", "req/s c=1", "req/s c=8", "prefill tok/s"]
    print("evaluation " + "".join(f"{c:>15}" for c in cols))
    for b, r in evals.items():
        vals = [f"{r['load_s']:.1f}", f"{r['req_per_s_c1']:.2f}", f"{r['req_per_s_c8']:.2f}", f"{r['prefill_tok_per_s']:.0f}"]
        print(f"{b:<11}" + "".join(f"{v:>15}" for v in vals))
    if "vllm" in backends:
        s, e = synth, evals
        print("vllm / hf: synthesis load " + ratio(s["vllm"]["load_s"], s["hf"]["load_s"])
              + ", req/s " + ratio(s["vllm"]["req_per_s"], s["hf"]["req_per_s"])
              + ", completion tok/s " + ratio(s["vllm"]["completion_tok_per_s"], s["hf"]["completion_tok_per_s"])
              + ", busy share " + ratio(s["vllm"]["busy"], s["hf"]["busy"])
              + "; evaluation req/s c=1 " + ratio(e["vllm"]["req_per_s_c1"], e["hf"]["req_per_s_c1"])
              + ", c=8 " + ratio(e["vllm"]["req_per_s_c8"], e["hf"]["req_per_s_c8"])
              + ", prefill tok/s " + ratio(e["vllm"]["prefill_tok_per_s"], e["hf"]["prefill_tok_per_s"]))


if __name__ == "__main__":
    main()

"""The engine pool's busy share during synthesis, at several engine counts and documents-in-flight sizes, with a fake engine.

    .venv/bin/python bench/bench_synth_engines.py [--documents 200] [--engines 1 2] [--in-flight 1 8 64]
                                                  [--slots 4] [--load-s 3] [--latency-s 0.1] [--smoke]

The fake engine (generator.backend=fake) loads for `load_s`, then answers `slots` requests at once, each in
`latency_s`. Every run reads the same corpus (slices of the King James Bible, documents of 300 to 1,500
tokens) with the same config and seed into a fresh output folder; one run per (generator.concurrency,
runtime.documents_in_flight) pair. With one document in flight its few ready requests leave slots idle;
with more, documents advance pass by pass on their own answers and their requests share the engines' slots.
Printed per run: engine loads, busy / alive (the pool's generating seconds over its engines' alive seconds,
as the engines measure them; goal >= 0.9 at the largest in-flight size) and the generation and run wall
times; then, per engine count, largest / smallest in-flight size. Outputs of all runs are checked equal
(a document's requests depend only on its own answers, not on what else is in flight).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray

from ctxforge.config import load_config
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.read import materialize_kjv
from ctxforge.pipeline.run import cache_dir, synthesize
from smoke_sizes import parse_args


def corpus(path: Path, n: int) -> Path:
    """n documents cut from the KJV text, 1,200 to 6,000 characters (about 300 to 1,500 tokens)."""
    books = [json.loads(line)["text"] for line in open(materialize_kjv(cache_dir()), encoding="utf-8")]
    text = "\n\n".join(books)
    with open(path, "w", encoding="utf-8") as f:
        pos = 0
        for i in range(n):
            size = 1200 + (i * 2654435761) % 4800
            if pos + size > len(text):
                pos = 0
            f.write(json.dumps({"id": f"doc-{i:05d}", "title": f"Part {i}", "text": text[pos:pos + size]}) + "\n")
            pos += size
    return path


def run(out: Path, data: Path, args, *extra: str) -> dict:
    cfg = load_config(SynthConfig, "tiny", [
        f"output.dir={out}", f"input.path={data}", "input.limit=0", "input.max_document_tokens=0",
        "generator.backend=fake", "generator.model=fake",
        f"generator.engine_kwargs={{load_s: {args.load_s}, latency_s: {args.latency_s}, slots: {args.slots}}}",
        "runtime.progress=false",
        "concat.stages=[{name: 4K, target_tokens: 4096, documents_per_sample: 1, samples: 4}]", *extra])
    t = time.monotonic()
    synthesize(cfg)
    wall = time.monotonic() - t
    m = json.loads((out / "manifest.json").read_text())
    e = m["accounting"]["engines"]
    return {"loads": e["loads"], "busy": e["busy_fraction"], "alive_s": e["alive_s"], "generate_s": m["timings_s"]["generate_s"],
            "wall_s": wall, "requests": m["requests"]["total"]["requests"], "documents": m["input"]["documents"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--documents", type=int, default=200)
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2], help="generator.concurrency values")
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 8, 64], help="runtime.documents_in_flight values")
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--load-s", type=float, default=3.0)
    ap.add_argument("--latency-s", type=float, default=0.1)
    args = parse_args(ap, {"documents": 6, "engines": [2], "in_flight": [1, 6], "load_s": 0.1, "latency_s": 0.01})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict[tuple[int, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = corpus(tmp / "corpus.jsonl", args.documents)
        for engines in args.engines:
            for in_flight in args.in_flight:
                out = tmp / f"e{engines}-f{in_flight}"
                results[engines, in_flight] = run(out, data, args, f"generator.concurrency={engines}",
                                                  f"runtime.documents_in_flight={in_flight}")
        first = tmp / "e{}-f{}".format(*next(iter(results)))
        same = all((tmp / f"e{e}-f{f}" / "samples/4K/part-00000.parquet").read_bytes()
                   == (first / "samples/4K/part-00000.parquet").read_bytes()
                   and pq.read_table(tmp / f"e{e}-f{f}" / "qa" / "qa.parquet").equals(pq.read_table(first / "qa" / "qa.parquet"))
                   for e, f in results)
    ray.shutdown()
    r = next(iter(results.values()))
    print(f"fake engine: load {args.load_s} s, {args.latency_s} s per request, {args.slots} slots; "
          f"{r['documents']} documents, {r['requests']} requests; machine: 2-CPU local Ray")
    print(f"{'engines':>7} {'in flight':>9} {'loads':>6} {'busy/alive':>11} {'engine alive s':>15} {'generation s':>13} {'run wall s':>11}")
    for (engines, in_flight), r in results.items():
        print(f"{engines:>7} {in_flight:>9} {r['loads']:>6} {r['busy']:>11.3f} {r['alive_s']:>15.1f} "
              f"{r['generate_s']:>13.1f} {r['wall_s']:>11.1f}")
    lo, hi = min(args.in_flight), max(args.in_flight)
    for engines in args.engines:
        a, b = results[engines, lo], results[engines, hi]
        print(f"{engines} engines, {hi} / {lo} in flight: busy/alive x{b['busy'] / a['busy']:.2f}, "
              f"generation time x{b['generate_s'] / a['generate_s']:.2f}, run wall time x{b['wall_s'] / a['wall_s']:.2f}")
    print(f"same samples and QA table in every run: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()

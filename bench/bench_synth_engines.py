"""Engine utilisation of synthesis with many documents in flight versus one at a time, with a fake engine.

    .venv/bin/python bench/bench_synth_engines.py [--documents 200] [--engines 2] [--slots 4] [--load-s 3]
                                                  [--latency-s 0.1] [--wave 64]

The fake engine (generator.backend=fake) loads for `load_s`, then answers `slots` requests at once, each in
`latency_s`. Both runs read the same corpus (slices of the King James Bible, 200+ documents of 300 to 1,500
tokens), with the same config and seed, into fresh output folders:
  serial     runtime.documents_in_flight=1: one document at a time, whose few ready requests leave slots idle
  streaming  runtime.documents_in_flight=`wave`: documents advance pass by pass on their own answers, their
             requests sharing the engines' slots
Printed per run: engine loads, busy / alive (the engines' generating seconds over their alive seconds, as
the engines measure them; goal >= 0.9 streaming) and the generation wall time; then the ratios. Outputs of
the two runs are checked equal (a document's requests depend only on its own answers).
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
        "generator.backend=fake", "generator.model=fake", f"generator.concurrency={args.engines}",
        f"generator.engine_kwargs={{load_s: {args.load_s}, latency_s: {args.latency_s}, slots: {args.slots}}}",
        f"generator.batch_size={args.slots}", "runtime.progress=false",
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
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--load-s", type=float, default=3.0)
    ap.add_argument("--latency-s", type=float, default=0.1)
    ap.add_argument("--wave", type=int, default=64)
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = corpus(tmp / "corpus.jsonl", args.documents)
        results = {
            "serial": run(tmp / "serial", data, args, "runtime.documents_in_flight=1"),
            "streaming": run(tmp / "streaming", data, args, f"runtime.documents_in_flight={args.wave}"),
        }
        same = all((tmp / "serial" / p).read_bytes() == (tmp / "streaming" / p).read_bytes()
                   for p in ["samples/4K/part-00000.parquet"])
        same_qa = pq.read_table(tmp / "serial" / "qa" / "qa.parquet").equals(
            pq.read_table(tmp / "streaming" / "qa" / "qa.parquet"))
    ray.shutdown()
    r = results["streaming"]
    print(f"fake engine: load {args.load_s} s, {args.latency_s} s per request, {args.slots} slots; {args.engines} engines; "
          f"{r['documents']} documents, {r['requests']} requests; machine: 2-CPU local Ray")
    print(f"{'run':<10} {'loads':>6} {'busy/alive':>11} {'engine alive s':>15} {'generation s':>13} {'run wall s':>11}")
    for name, r in results.items():
        print(f"{name:<10} {r['loads']:>6} {r['busy']:>11.3f} {r['alive_s']:>15.1f} {r['generate_s']:>13.1f} {r['wall_s']:>11.1f}")
    a, b = results["serial"], results["streaming"]
    print(f"streaming / serial: busy/alive x{b['busy'] / a['busy']:.2f}, generation time x{b['generate_s'] / a['generate_s']:.2f}, "
          f"run wall time x{b['wall_s'] / a['wall_s']:.2f}, engine loads {a['loads']} -> {b['loads']}; "
          f"same samples: {same}, same QA table: {same_qa}")
    sys.exit(0 if same and same_qa else 1)


if __name__ == "__main__":
    main()

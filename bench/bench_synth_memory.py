"""Peak memory of the synthesis driver for N versus 10N documents (goal: at most 1.2x).

    .venv/bin/python bench/bench_synth_memory.py [--documents 40] [--factor 10] [--in-flight 64 512] [--smoke]

Each run is a fresh process (its own local Ray; the engines, Ray Data and render workers are other
processes) synthesizing a corpus of documents of about 8,000 tokens, cut from the King James Bible, with the
fake engine (no latency). A thread samples the driver's /proc/self/status every 50 ms: peak RssAnon (the
driver's own heap: texts, states, QA, Python objects) and the kernel's VmHWM (peak resident set, including
shared libraries and Ray's shared-memory pages). Runs for N and 10N documents: runtime.documents_in_flight
64 (the bounded window) and, for reference, 512 (every document of both sizes admitted at once), which
holds every document's state in the driver until it finishes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from smoke_sizes import parse_args


def corpus(path: Path, n: int) -> Path:
    from ctxforge.pipeline.read import materialize_kjv
    from ctxforge.pipeline.run import cache_dir

    books = [json.loads(line)["text"] for line in open(materialize_kjv(cache_dir()), encoding="utf-8")]
    text = "\n\n".join(books)
    size = 32_000
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            pos = (i * 7919 * 13) % (len(text) - size)
            f.write(json.dumps({"id": f"doc-{i:05d}", "title": f"Part {i}", "text": text[pos:pos + size]}) + "\n")
    return path


def _status() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child(n: int, in_flight: str, workdir: Path) -> None:
    import ray

    from ctxforge.config import load_config
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import synthesize

    peak = {"RssAnon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["RssAnon"] = max(peak["RssAnon"], _status()["RssAnon"])
            time.sleep(0.05)

    data = corpus(workdir / "corpus.jsonl", n)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    cfg = load_config(SynthConfig, "tiny", [
        f"output.dir={workdir / 'out'}", f"input.path={data}", "input.limit=0", "input.max_document_tokens=0",
        "chunking.small_tokens=1024", "generator.max_model_len=8192", "generator.backend=fake", "generator.model=fake",
        "generator.concurrency=2", "generator.engine_kwargs={slots: 16}",
        f"runtime.documents_in_flight={in_flight}", "runtime.progress=false",
        "concat.stages=[{name: 16K, target_tokens: 16384, documents_per_sample: 1, samples: 4}]"])
    t = time.monotonic()
    synthesize(cfg)
    wall = time.monotonic() - t
    stop.set()
    thread.join()
    manifest = json.loads((workdir / "out" / "manifest.json").read_text())
    print(json.dumps({"rss_anon": peak["RssAnon"], "vm_hwm": _status()["VmHWM"], "wall_s": wall,
                      "documents": manifest["input"]["documents"], "requests": manifest["requests"]["total"]["requests"]}))
    ray.shutdown()


def measure(n: int, in_flight: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), in_flight, tmp], check=True,
                             capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--documents", type=int, default=40)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--in-flight", nargs="+", default=["64", "512"], help="runtime.documents_in_flight values")
    ap.add_argument("--child", nargs=3)
    args = parse_args(ap, {"documents": 2, "factor": 2, "in_flight": ["4"]})
    if args.child:
        child(int(args.child[0]), args.child[1], Path(args.child[2]))
        return
    n, big = args.documents, args.documents * args.factor
    mib = 1 << 20
    print("driver peak memory, documents of ~8,000 tokens, fake engine; machine: 2-CPU shared, local Ray")
    print(f"{'in flight':<10} {'documents':>9} {'requests':>8} {'peak RssAnon MiB':>16} {'VmHWM MiB':>9} {'wall s':>7}")
    rows = {}
    for in_flight in args.in_flight:
        for docs in (n, big):
            r = measure(docs, in_flight)
            rows[(in_flight, docs)] = r
            print(f"{in_flight:<10} {r['documents']:>9} {r['requests']:>8} {r['rss_anon'] / mib:>16.1f} "
                  f"{r['vm_hwm'] / mib:>9.1f} {r['wall_s']:>7.1f}", flush=True)
    for in_flight in args.in_flight:
        a, b = rows[(in_flight, n)], rows[(in_flight, big)]
        print(f"documents_in_flight {in_flight}: {args.factor}x documents -> peak RssAnon x{b['rss_anon'] / a['rss_anon']:.2f}, "
              f"VmHWM x{b['vm_hwm'] / a['vm_hwm']:.2f}")


if __name__ == "__main__":
    main()

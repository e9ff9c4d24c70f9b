"""Algorithm 2 throughput (rendered tokens per second) in the driver, with 1 and with 2 render workers.

    .venv/bin/python bench/bench_concat_parallel.py [--samples 16] [--target 65536] [--documents 32] [--smoke]

Documents of about 16,000 tokens cut from the King James Bible, each with 20 hierarchical and 20 diverse QA
taken from its own sentences, sit in a documents table and a QA table on disk as synthesis leaves them. One
stage (`samples` x `target` tokens, 4 documents per sample) is planned once, then rendered and tokenized
(tiny model's Qwen tokenizer) by: the driver alone, 1 worker, 2 workers. Workers are started and have
loaded the tokenizer before the clock starts (as for every stage after the first). The shards of the three
runs are checked byte-identical.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ctxforge.config import load_config
from ctxforge.models import load_tokenizer, resolve_model_path, tokenizer_hash
from ctxforge.pipeline.concat import PoolDocument, plan_stage_samples
from ctxforge.pipeline.config import StageConfig, SynthConfig
from ctxforge.pipeline.docstore import DocumentStore, QAWriter
from ctxforge.pipeline.read import materialize_kjv
from ctxforge.pipeline.records import DocumentQA, QARecord
from ctxforge.pipeline.run import cache_dir
from ctxforge.pipeline.write import RenderPool
from smoke_sizes import parse_args


def documents(n: int, tok) -> list[DocumentQA]:
    books = [json.loads(line)["text"] for line in open(materialize_kjv(cache_dir()), encoding="utf-8")]
    text = "\n\n".join(books)
    size = 64_000
    docs = []
    for i in range(n):
        pos = (i * 104729) % (len(text) - size)
        body = text[pos:pos + size]
        sentences = [s.strip() for s in re.split(r"(?<=[.;:])\s+", body) if len(s.strip()) > 30]
        doc_id = f"doc{i:04d}"

        def qa(kind: str, j: int) -> QARecord:
            s = sentences[(j * 7 + (kind == "diverse") * 3) % len(sentences)]
            return QARecord(f"{doc_id}:{kind[0]}{j:03d}", doc_id, kind, "chunk" if kind == "hierarchical" else "local_specific",
                            j, f"What does the text say after '{s[:40]}'?", s, [f"{doc_id}:s{j:05d}"], s[:60], True, 100.0)

        docs.append(DocumentQA(doc_id, f"Part {i}", body, len(tok(body, add_special_tokens=False)["input_ids"]),
                               [qa("hierarchical", j) for j in range(20)], [qa("diverse", j) for j in range(20)]))
    return docs


def tables(folder: Path, docs: list[DocumentQA]):
    """The documents table and the QA table as synthesis leaves them; (locations, QA index)."""
    (folder / "documents").mkdir(parents=True)
    rows = [{"doc_id": d.doc_id, "title": d.title, "text": d.text, "source": "kjv", "line": i, "skip_reason": "",
             "n_tokens": d.n_tokens, "chunks": "[]", "sections": "[]"} for i, d in enumerate(docs)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "documents" / "part-0.parquet", row_group_size=8)
    writer = QAWriter(folder / "qa.parquet")
    for rank, d in enumerate(docs):
        writer.add(rank, d.doc_id, [*d.hierarchical, *d.diverse])
    return DocumentStore.index(folder / "documents").locations, writer.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--target", type=int, default=65536)
    ap.add_argument("--documents", type=int, default=32)
    args = parse_args(ap, {"samples": 1, "documents": 4})
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    path = resolve_model_path("ctxforge:tiny")
    tok = load_tokenizer(path)
    cfg = load_config(SynthConfig, "tiny", ["output.rows_per_shard=4"])
    stage = StageConfig(name="bench", target_tokens=args.target, documents_per_sample=4, samples=args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = documents(args.documents, tok)
        locations, qa = tables(tmp, docs)
        plan = plan_stage_samples(stage, [PoolDocument.of(d) for d in docs], cfg.concat)
        results = {}
        for workers in (0, 1, 2):
            pool = RenderPool(workers, path, locations, qa, tok if workers == 0 else None)
            if workers:   # started, tokenizer loaded: a one-sample stage first
                warm = StageConfig(name="warm", target_tokens=args.target, documents_per_sample=1, samples=1)
                pool.write_stage(tmp / f"warm{workers}", warm, plan_stage_samples(warm, [PoolDocument.of(docs[0])], cfg.concat),
                                 cfg, tokenizer_hash(tok))
            t = time.perf_counter()
            stats = pool.write_stage(tmp / f"w{workers}", stage, plan, cfg, tokenizer_hash(tok))
            elapsed = time.perf_counter() - t
            pool.close()
            files = sorted((tmp / f"w{workers}").glob("*.parquet"))
            tokens = sum(sum(pq.read_table(f, columns=["num_tokens"]).column(0).to_pylist()) for f in files)
            results[workers] = (tokens, elapsed, [f.read_bytes() for f in files], stats["samples_built"])
    ray.shutdown()
    print(f"Algorithm 2: {args.samples} samples x {args.target:,} tokens, 4 documents each (tiny model's tokenizer); "
          f"machine: 2-CPU shared, local Ray")
    print(f"{'workers':<12} {'samples':>7} {'tokens':>10} {'seconds':>8} {'tokens/s':>10}")
    for workers, (tokens, elapsed, _, built) in results.items():
        label = "driver" if workers == 0 else str(workers)
        print(f"{label:<12} {built:>7} {tokens:>10,} {elapsed:>8.1f} {tokens / elapsed:>10,.0f}")
    same = results[0][2] == results[1][2] == results[2][2]
    print(f"2 workers / 1 worker: x{results[1][1] / results[2][1]:.2f} tokens/s; 1 worker / driver: "
          f"x{results[0][1] / results[1][1]:.2f}; shards byte-identical: {same}")


if __name__ == "__main__":
    main()

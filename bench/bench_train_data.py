"""Peak memory of one training worker's data path for a stage of N vs 4N tokens (goal: flat).

Writes two synthetic stages in the sample contract (random token ids, answer tokens at the end of each
sample, `--rows-per-shard` rows per Parquet shard and row group, as `ctxforge synth` writes them): N and
4N tokens, same sample lengths. Each trial is a fresh process (the kernel's peak-RSS mark only grows),
which measures the growth of its peak RSS over its value after imports while it:
- streamed: does what a worker of DP rank 0 of `--dp` does (data.index_stage from metadata, the
  batching plan, then for every step reads and collates only its own micro-batches), or
- whole:    reads the stage whole into memory first (what the trainer did before: every worker held
  every sample of its stage).
The ratio 4N / N is ~1 for the streamed path (one row group and one step's samples at a time) and ~4
for reading whole.

    .venv/bin/python bench/bench_train_data.py [--tokens 4000000] [--sample-tokens 40000] [--dp 2] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from smoke_sizes import parse_args


def write_stage(root: Path, tokens: int, sample_tokens: int, rows_per_shard: int, tok_hash: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctxforge.schema import SAMPLE_SCHEMA

    rng = np.random.default_rng(0)
    folder = root / "samples" / "S"
    folder.mkdir(parents=True)
    n_samples = tokens // sample_tokens
    for shard, start in enumerate(range(0, n_samples, rows_per_shard)):
        rows = []
        for i in range(start, min(start + rows_per_shard, n_samples)):
            n = int(sample_tokens * rng.uniform(0.5, 1.0))
            mask = np.zeros(n, dtype=np.int8)
            mask[-n // 20:] = 1
            rows.append({"sample_id": f"s{i}", "stage": "S", "target_tokens": sample_tokens, "num_tokens": n,
                         "num_loss_tokens": int(mask.sum()), "input_ids": rng.integers(10, 150000, n, dtype=np.int32),
                         "loss_mask": mask, "messages": [], "documents": [], "chunks": [], "qa_ids": [],
                         "num_questions": 1, "ungrounded_questions": 0, "tokenizer_hash": tok_hash})
        table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
        pq.write_table(table, folder / f"part-{shard:05d}.parquet", row_group_size=rows_per_shard)


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def trial(root: str, mode: str, max_seq_len: int, dp: int) -> dict:
    """In this (fresh) process: the data path of DP rank 0, peak RSS growth in bytes."""
    from ctxforge.train.batching import collate, plan_microbatches
    from ctxforge.train.data import StageSource, index_stage, read_stage
    from ctxforge.train.step_batches import DataPosition, StepBatches

    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak mark (Linux >= 4.0)
        fh.write("5")
    base = _status_bytes("VmRSS")
    if mode == "whole":
        samples, _ = read_stage(root, "S", max_seq_len, "h")
        held = sum(len(s) for s in samples)
        steps = 0
    else:
        source = StageSource(index_stage(root, "S", max_seq_len, "h"), [])
        lengths = source.lengths
        schedule = StepBatches(lambda e: plan_microbatches(lengths, "pack", max_seq_len, 1, 0, e), dp, 1)
        held = steps = 0
        for step in schedule.steps(DataPosition()):
            mb = collate(source.read(step.microbatches[0]), "pack", "sample", None)  # DP rank 0's micro-batch
            held = max(held, mb.real_tokens)
            steps += 1
    return {"peak": _status_bytes("VmHWM") - base, "steps": steps, "held_tokens": held}


def main() -> None:
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed buffers go back to the OS, not to arenas
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")  # Arrow's buffers through that malloc too
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4_000_000, help="N: tokens of the smaller stage")
    ap.add_argument("--sample-tokens", type=int, default=40_000)
    ap.add_argument("--rows-per-shard", type=int, default=16)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--trial", nargs=4, help=argparse.SUPPRESS)
    args = parse_args(ap, {"tokens": 40_000, "sample_tokens": 4_000, "rows_per_shard": 4})
    if args.trial:
        root, mode, max_len, dp = args.trial
        print(json.dumps(trial(root, mode, int(max_len), int(dp))))
        return
    mib = 1024 ** 2
    with tempfile.TemporaryDirectory() as tmp:
        roots = {}
        for mult in (1, 4):
            roots[mult] = Path(tmp) / f"x{mult}"
            write_stage(roots[mult], args.tokens * mult, args.sample_tokens, args.rows_per_shard, "h")
        peaks = {}
        print(f"{'mode':<9} {'N MiB':>8} {'4N MiB':>8} {'4N/N':>6}   (N = {args.tokens:,} tokens, samples "
              f"<= {args.sample_tokens:,} tokens, {args.rows_per_shard} rows per row group, dp {args.dp})")
        for mode in ("streamed", "whole"):
            for mult in (1, 4):
                out = subprocess.run([sys.executable, __file__, "--trial", str(roots[mult]), mode,
                                      str(args.sample_tokens), str(args.dp)],
                                     check=True, capture_output=True, text=True).stdout
                peaks[mode, mult] = json.loads(out.strip().splitlines()[-1])
            a, b = peaks[mode, 1]["peak"], peaks[mode, 4]["peak"]
            print(f"{mode:<9} {a / mib:8.1f} {b / mib:8.1f} {b / max(a, 1):6.2f}")


if __name__ == "__main__":
    main()

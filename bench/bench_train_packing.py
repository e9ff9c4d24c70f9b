"""Packing vs sorted batching vs naive padding, on the synthesized length distribution (LongAlign §3.3).

1. Share of real tokens per step: the real tokens over the tokens each plan computes (padded rows count
   rows x longest; packs count the tokens they hold, as varlen kernels do). Lengths are the synthesis
   output's samples, resampled with replacement to --samples so that batches form.
2. Training tokens/s of packing relative to naive batching: the tiny model, one process, AdamW, the same
   samples, real (unpadded) tokens per second, best of --repeats. The CPU attention core runs causal sdpa
   per document (varlen semantics, like flash-attn varlen on GPU), so a pack costs what its documents cost;
   padded rows cost their padding.

    .venv/bin/python bench/bench_train_packing.py --synth runs/tiny/synth [--samples 512] [--batch-size 4] [--smoke]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ctxforge.models import load_tokenizer, resolve_model_path, tokenizer_hash
from ctxforge.train.batching import collate, plan_microbatches, real_token_share
from ctxforge.train.data import read_stage
from ctxforge.train.loss import step_scale
from ctxforge.train.model import load_stage_model, weighted_loss_sum
from ctxforge.train.rope import RopeConfig
from ctxforge.train.sequence_parallel import DOC_SDPA
from smoke_sizes import parse_args


def synth_samples(synth_dir: str, stages: list[str], max_len: int, tok_hash: str):
    samples = []
    for stage in stages:
        samples += read_stage(synth_dir, stage, max_len, tok_hash)[0]
    return samples


def write_synthetic_stage(root: Path, stage: str, n: int, max_len: int, tok_hash: str) -> None:
    """`n` samples of random token ids (lengths uniform in [max_len / 8, max_len]), the last 5% of each an
    answer, as one Parquet shard in the sample contract: the --smoke input when no synthesis output is at hand."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ctxforge.schema import SAMPLE_SCHEMA

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        length = int(rng.integers(max_len // 8, max_len + 1))
        mask = np.zeros(length, dtype=np.int8)
        mask[-max(1, length // 20):] = 1
        rows.append({"sample_id": f"s{i}", "stage": stage, "target_tokens": max_len, "num_tokens": length,
                     "num_loss_tokens": int(mask.sum()), "input_ids": rng.integers(10, 1000, length, dtype=np.int32),
                     "loss_mask": mask, "messages": [], "documents": [], "chunks": [], "qa_ids": [],
                     "num_questions": 1, "ungrounded_questions": 0, "tokenizer_hash": tok_hash})
    folder = root / "samples" / stage
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), folder / "part-00000.parquet")


def token_shares(lengths: list[int], max_tokens: int, batch_size: int) -> dict[str, float]:
    return {mode: real_token_share(lengths, plan_microbatches(lengths, mode, max_tokens, batch_size, 0, 0),
                                   mode, max_tokens, batch_size)
            for mode in ("naive", "sort", "pack")}


def train_tokens_per_s(model, samples, mode: str, max_tokens: int, batch_size: int, pad_id: int,
                       steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    lengths = [len(s) for s in samples]
    plan = plan_microbatches(lengths, mode, max_tokens, batch_size, seed=0, epoch=0)[:steps]
    real, start = 0, time.perf_counter()
    for mb_ids in plan:
        mb = collate([samples[i] for i in mb_ids], mode, "sample", pad_id, rows=1 if mode == "pack" else batch_size)
        t = dict(mb.tensors)
        t["weights"] = t["weights"] * step_scale("sample", 1, mb.num_samples, mb.num_targets)
        loss = weighted_loss_sum(model, t, chunk_tokens=2048)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        real += mb.real_tokens
    return real / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth", default="runs/tiny/synth", help="synthesis output dir (ctxforge synth --config tiny)")
    ap.add_argument("--stages", default="4K,8K")
    ap.add_argument("--max-tokens", type=int, default=8192, help="pack capacity = the stage's max_seq_len")
    ap.add_argument("--samples", type=int, default=512, help="samples drawn from the length distribution")
    ap.add_argument("--batch-size", type=int, default=4, help="rows per naive/sorted batch")
    ap.add_argument("--train-samples", type=int, default=16, help="samples per timed training run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--synthetic", type=int, default=0,
                    help="write this many random-token samples of stage --stages to a temporary --synth instead")
    args = parse_args(ap, {"synthetic": 24, "stages": "S", "max_tokens": 512, "samples": 32, "train_samples": 4,
                           "repeats": 1})

    path = resolve_model_path("ctxforge:tiny")
    tok = load_tokenizer(path)
    if args.synthetic:
        args.synth = tempfile.mkdtemp(prefix="bench-packing-")
        for stage in args.stages.split(","):
            write_synthetic_stage(Path(args.synth), stage, args.synthetic, args.max_tokens, tokenizer_hash(tok))
    base = synth_samples(args.synth, args.stages.split(","), args.max_tokens, tokenizer_hash(tok))
    rng = random.Random(0)
    drawn = [base[rng.randrange(len(base))] for _ in range(args.samples)]
    lengths = [len(s) for s in drawn]
    print(f"length distribution: {len(base)} synthesized samples ({len(set(len(s) for s in base))} distinct lengths; "
          f"stages {args.stages}), lengths "
          f"min {min(lengths)} median {int(statistics.median(lengths))} max {max(lengths)}; drawn {len(drawn)}")
    shares = token_shares(lengths, args.max_tokens, args.batch_size)
    print(f"real-token share per step (batch {args.batch_size}, pack capacity {args.max_tokens}):")
    for mode, share in shares.items():
        print(f"  {mode:<6} {share:6.3f}   ({share / shares['naive']:.2f}x naive)")

    torch.set_num_threads(2)
    model = load_stage_model(path, RopeConfig(), args.max_tokens, DOC_SDPA, dtype="float32")
    subset = drawn[:args.train_samples]
    pack_capacity = max(len(s) for s in subset) * 2
    rates = {}
    for mode in ("naive", "sort", "pack"):
        cap = pack_capacity if mode == "pack" else args.max_tokens
        rates[mode] = max(train_tokens_per_s(model, subset, mode, cap, args.batch_size, tok.pad_token_id,
                                             steps=10**6) for _ in range(args.repeats))
    print(f"training real tokens/s on CPU (tiny model, {len(subset)} samples, best of {args.repeats}; packs of up to "
          f"{pack_capacity} tokens):")
    for mode, rate in rates.items():
        print(f"  {mode:<6} {rate:9.0f} tok/s   ({rate / rates['naive']:.2f}x naive)")


if __name__ == "__main__":
    main()

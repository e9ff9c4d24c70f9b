"""Peak memory per rank with Ulysses SP degree 2 vs 1, and the longest sequence each trains in a budget.

Each (sp, length) trial is a fresh set of processes (mp.spawn, gloo on CPU / NCCL on GPU) that builds the
tiny model, runs one forward + backward of one packed sequence of `length` tokens (documents of 1-4K
tokens, answer tokens throughout), and reports its peak: CUDA max allocated on GPU; on CPU the growth of
the process's max RSS over its value after the model is built (RSS only grows, hence one trial per
process). The per-rank peak is the max over the SP ranks.

What does not shrink with SP: the model (each rank holds it whole here; ZeRO-3 shards it in training)
and the loss tile ([tile, vocab] fp32), so the ratio approaches 1/2 only as activations dominate.

    .venv/bin/python bench/bench_train_sp.py [--lengths 16384,32768,65536,131072] [--budget-mib 512] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile

import torch
import torch.multiprocessing as mp
from smoke_sizes import parse_args


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(length: int, vocab: int, target_share: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids, pos, doc_start = torch.randint(10, vocab - 10, (length,), generator=g), torch.empty(length, dtype=torch.long), 0
    while doc_start < length:
        n = min(int(torch.randint(1024, 4096, (1,), generator=g)), length - doc_start)
        pos[doc_start:doc_start + n] = torch.arange(n)
        doc_start += n
    targets = torch.roll(ids, -1)
    answer = torch.rand(length, generator=g) < target_share  # answers are a small share of a long sample
    targets[(pos == 0) | ~answer] = -100
    weights = (targets != -100).double() / max(int((targets != -100).sum()), 1)
    return {"input_ids": ids[None], "position_ids": pos[None], "target_ids": targets[None], "weights": weights[None]}


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_cpu_peak() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM; `echo 5 > clear_refs`, Linux >= 4.0) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_bytes("VmRSS")


def _trial(rank: int, world: int, port: int, length: int, model_path: str, out: str, target_share: float,
           chunk_tokens: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, 2 // world))
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import deepspeed

    from ctxforge.train.model import load_stage_model, resolve_attention, weighted_loss_sum
    from ctxforge.train.rope import RopeConfig
    from ctxforge.train.sequence_parallel import enable_ulysses, shard_sequence

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    attention = resolve_attention("auto", device)
    model = load_stage_model(model_path, RopeConfig(), length, attention, "bfloat16" if cuda else "float32",
                             gradient_checkpointing=True).to(device)
    model.train()
    enable_ulysses(model, world, attention)
    batch = shard_sequence(_batch(length, model.config.vocab_size, target_share), rank, world)
    batch = {k: v.to(device) for k, v in batch.items()}
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_cpu_peak()
    weighted_loss_sum(model, batch, chunk_tokens=chunk_tokens).backward()
    peak = (torch.cuda.max_memory_allocated(device) if cuda else _status_bytes("VmHWM")) - base
    with open(os.path.join(out, f"{rank}.json"), "w") as fh:
        json.dump({"peak": peak}, fh)


def peak_per_rank(sp: int, length: int, model_path: str, target_share: float, chunk_tokens: int) -> int:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_trial, args=(sp, _port(), length, model_path, out, target_share, chunk_tokens), nprocs=sp, join=True)
        return max(json.load(open(os.path.join(out, f"{r}.json")))["peak"] for r in range(sp))


def main() -> None:
    # glibc otherwise serves tensors below its (growing) mmap threshold from heap arenas that stay
    # resident after a free, so RSS would measure fragmentation history rather than live tensors.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16384,32768,65536,131072")
    ap.add_argument("--budget-mib", type=float, default=512.0, help="memory budget per rank for the longest-fit search")
    ap.add_argument("--target-share", type=float, default=0.01, help="share of tokens that are answer targets")
    ap.add_argument("--chunk-tokens", type=int, default=32, help="tiled-loss tile (tokens)")
    args = parse_args(ap, {"lengths": "512", "budget_mib": 64.0})
    from ctxforge.models import resolve_model_path

    path = resolve_model_path("ctxforge:tiny")
    lengths = [int(x) for x in args.lengths.split(",")]
    mib = 1024 ** 2
    peaks = {sp: {} for sp in (1, 2)}
    print(f"{'length':>7} {'sp1 MiB':>9} {'sp2 MiB':>9} {'sp2/sp1':>8}")
    for n in lengths:
        for sp in (1, 2):
            peaks[sp][n] = peak_per_rank(sp, n, path, args.target_share, args.chunk_tokens)
        print(f"{n:>7} {peaks[1][n] / mib:9.1f} {peaks[2][n] / mib:9.1f} {peaks[2][n] / max(peaks[1][n], 1):8.2f}")
    longest = {sp: max([n for n in lengths if peaks[sp][n] <= args.budget_mib * mib], default=0) for sp in (1, 2)}
    ratio = f"{longest[2] / longest[1]:.1f}x" if longest[1] else "n/a"
    print(f"longest of {lengths} within {args.budget_mib:g} MiB per rank: sp1 {longest[1]}, sp2 {longest[2]} ({ratio})")


if __name__ == "__main__":
    main()

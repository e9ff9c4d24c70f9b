"""Micro-batches from samples: packing, sorted batching, naive batching.

Packing and sorted batching are LongAlign's (Bai et al. 2024, "LongAlign: A Recipe for Long Context Alignment
of Large Language Models", arXiv 2401.18058, §3.3; reference code: THUDM/LongAlign's `sort_and_group.py`).

- pack:  samples are placed first-fit (in shuffled order) into sequences of at most `max_tokens`; one
         sequence per micro-batch, documents kept apart by per-document position ids (the attention
         core turns them into a block-diagonal mask: flash-attn varlen on GPU, doc-masked sdpa on CPU).
- sort:  samples sorted by length, cut into groups of `batch_size`, groups shuffled; each group is
         padded to its longest sample.
- naive: shuffled, groups of `batch_size`, padded to the longest.

The plan depends only on the lengths, the seed and the epoch, so every rank computes the same plan and a
resumed run finds its place by step number alone. Weights here are per-sample base weights (1/N_i for
`sample` weighting, 1 for `token`); the step's K/M factor is applied in the loop (see loss.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .data import Sample
from .loss import IGNORE, sample_base_weights, shift_targets
from .sequence_parallel import padding_id

MODES = ("pack", "sort", "naive")


@dataclass
class MicroBatch:
    tensors: dict[str, torch.Tensor]  # input_ids, position_ids, target_ids, weights: [rows, s]
    num_samples: int
    num_targets: int
    real_tokens: int

    @property
    def padded_tokens(self) -> int:
        return int(self.tensors["input_ids"].numel())


def plan_microbatches(lengths: list[int], mode: str, max_tokens: int, batch_size: int, seed: int,
                      epoch: int) -> list[list[int]]:
    """Sample indices per micro-batch for one epoch (`lengths`: tokens per sample).

    pack: first-fit into `max_tokens` (LongAlign §3.3 packs greedily in data order, closing a pack at the first
    sample that does not fit; first-fit over a shuffled order wastes less room); sort: LongAlign §3.3's sorted
    batching (sort by length, cut into groups of `batch_size`, shuffle the groups); naive: shuffled groups.

    Raises ValueError when a sample is longer than `max_tokens` (pack) or `mode` is not one of MODES.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if mode == "pack":
        packs: list[list[int]] = []
        room: list[int] = []
        for i in order:
            n = lengths[i]
            if n > max_tokens:
                raise ValueError(f"sample {i} has {n} tokens > max_tokens {max_tokens}; data.read_stage drops these")
            for k, free in enumerate(room):
                if n <= free:
                    packs[k].append(i)
                    room[k] -= n
                    break
            else:
                packs.append([i])
                room.append(max_tokens - n)
        return packs
    if mode == "sort":
        order.sort(key=lambda i: lengths[i])
        groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        rng.shuffle(groups)
        return groups
    if mode == "naive":
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    raise ValueError(f"batching mode {mode!r}: expected one of {', '.join(MODES)}")


def _sample_tensors(sample: Sample, weighting: str) -> tuple[dict[str, torch.Tensor], int]:
    ids = torch.from_numpy(sample.input_ids)
    targets = shift_targets(ids, torch.from_numpy(sample.loss_mask))
    base, n = sample_base_weights(targets)
    if weighting == "token":
        base = (targets != IGNORE).to(torch.float64)
    return {"input_ids": ids, "position_ids": torch.arange(len(ids)), "target_ids": targets, "weights": base}, n


def collate(samples: list[Sample], mode: str, weighting: str, pad_id: int | None, rows: int = 1) -> MicroBatch:
    """One micro-batch. pack: [1, sum of lengths]; sort/naive: [rows, longest] with right padding (missing
    rows are all padding, so every micro-batch has the same number of rows). `pad_id` None (a tokenizer
    without a pad token) pads with `padding_id(None)`; padding never has a target or a weight.
    `num_samples` counts the samples with at least one target (LongAlign's M: a sample without one has no
    N_i to divide by)."""
    parts = [_sample_tensors(s, weighting) for s in samples]
    num_targets = sum(n for _, n in parts)
    counted = sum(1 for _, n in parts if n > 0)
    real = sum(len(s) for s in samples)
    keys = ("input_ids", "position_ids", "target_ids", "weights")
    if mode == "pack":
        tensors = {k: torch.cat([p[k] for p, _ in parts])[None] for k in keys}
        return MicroBatch(tensors, counted, num_targets, real)
    width = max(len(s) for s in samples)
    fill = {"input_ids": padding_id(pad_id), "target_ids": IGNORE, "weights": 0.0}
    out = {}
    for k in keys:
        dtype = parts[0][0][k].dtype
        if k == "position_ids":
            t = torch.arange(width).repeat(rows, 1)
        else:
            t = torch.full((rows, width), fill[k], dtype=dtype)
        for r, (p, _) in enumerate(parts):
            t[r, :len(p[k])] = p[k]
        out[k] = t
    return MicroBatch(out, counted, num_targets, real)


def real_token_share(lengths: list[int], plan: list[list[int]], mode: str, max_tokens: int,
                     batch_size: int) -> float:
    """Real tokens / tokens computed for a plan. Packs count at the length they fill (varlen kernels
    never compute past it); padded batches count rows x their longest sample."""
    real = sum(lengths)
    if mode == "pack":
        computed = sum(sum(lengths[i] for i in mb) for mb in plan)
    else:
        computed = sum(batch_size * max(lengths[i] for i in mb) for mb in plan)
    return real / max(computed, 1)

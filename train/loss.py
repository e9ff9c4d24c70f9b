"""Loss: answer-only targets, LongAlign sample weighting, tiled cross-entropy.

LongAlign (Bai et al. 2024, "LongAlign: A Recipe for Long Context Alignment of Large Language Models", arXiv
2401.18058, §3.3, Eq. 2-4 and Appendix B): with M samples spread over K packs (micro-batches) in one optimizer
step, sample i's summed token loss L_i over its N_i target tokens is weighted K / (N_i * M) and summed
within each pack; the mean over the K packs (what averaging gradients over ranks does) is then
(1/M) * sum_i L_i / N_i, whatever the lengths and the packing. K and M are counted per step across
ranks (`step_counts`), never stored in the data, so a different GPU count needs no re-preprocessing
(LongAlign issue #8). `token` weighting (a plain token mean over the step) is the alternative.

The cross-entropy is tiled along the sequence: logits of one chunk of `chunk_tokens` tokens exist at a
time, recomputed in backward (activation checkpoint per chunk), so 1M-token logits (V*4 bytes per
token fp32) are never materialized. Under SP each rank computes the weighted sum over its shard (a
shard may hold no target at all); sums, never per-shard means, are combined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def shift_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-sample [s] -> [s]: position t predicts token t+1 when that token is a loss (answer) token,
    else IGNORE. Shifted before packing/sharding, so the last position never predicts across a boundary."""
    targets = torch.full_like(input_ids, IGNORE, dtype=torch.long)
    nxt = loss_mask[1:].bool()
    targets[:-1][nxt] = input_ids[1:][nxt].long()
    return targets


def sample_base_weights(targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[s] targets of one sample -> ([s] weights 1/N_i on target positions, N_i) (LongAlign Appendix B: the
    per-token weight 1/N_i of `sort_and_group.py`). The step's K/M factor is applied later (`step_scale`),
    because it depends on how the step is laid out across ranks."""
    valid = targets != IGNORE
    n = int(valid.sum())
    weights = torch.zeros(targets.shape, dtype=torch.float64)
    if n:
        weights[valid] = 1.0 / n
    return weights, n


def step_scale(weighting: str, num_packs: int, num_samples: int, num_target_tokens: int) -> float:
    """Factor applied to the base weights of every token in the step.

    sample: base weights are 1/N_i -> K/(N_i*M) needs K/M (LongAlign §3.3, Eq. 4).
    token:  base weights are 1 -> K/T gives a token mean over all T targets (ProLong's token-averaged loss:
            Gao et al. 2024, "How to Train Long-Context Language Models (Effectively)", arXiv 2410.02660).

    Raises ValueError naming `weighting` when it is neither 'sample' nor 'token'.
    """
    if weighting == "sample":
        return num_packs / max(num_samples, 1)
    if weighting == "token":
        return num_packs / max(num_target_tokens, 1)
    raise ValueError(f"loss weighting {weighting!r}: expected 'sample' or 'token'")


def step_counts(local_packs: int, local_samples: int, local_targets: int, sp_degree: int,
                device: torch.device | None = None, extra: int = 0) -> tuple[int, int, int, int]:
    """(K, M, T, extra) for the step: packs, samples, target tokens (and any extra count, e.g. real tokens)
    summed over every rank. Every rank of an SP group holds the same packs, so the world sum is divided by
    sp_degree."""
    import torch.distributed as dist

    counts = torch.tensor([local_packs, local_samples, local_targets, extra], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)  # [4] per rank -> [4] world sum
        counts //= sp_degree
    k, m, t, x = (int(v) for v in counts.tolist())
    return k, m, t, x


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for the softmax; fp32/fp64 unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _chunk_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """[n, h] hidden, [n] targets/weights -> [] sum_t w_t * CE_t (fp32 logits for this chunk only).
    lm_head is called as a module (not F.linear on its weight) so ZeRO-3's gather hooks fire."""
    logits = _upcast(lm_head(hidden))
    ce = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")
    return (ce * weights.to(ce.dtype) * (targets != IGNORE)).sum()


def _num_tiles(local_targets: int, chunk_tokens: int, device: torch.device) -> int:
    """Tiles this step's lm_head runs on every rank: the max over ranks. Under ZeRO-3 each lm_head call
    all-gathers its weight, so ranks calling it a different number of times (a shard with fewer targets,
    or none) would mismatch collectives; empty tiles keep the count equal."""
    import torch.distributed as dist

    tiles = -(-local_targets // chunk_tokens)
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([tiles], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # [1] per rank -> [1] max over the world
        tiles = int(t.item())
    return max(tiles, 1)


def tiled_weighted_ce(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor,
                      weights: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """[b, s, h] hidden, [b, s] targets and weights -> [] sum of w_t * CE_t over this rank's tokens.

    Only positions with a non-zero weight are projected to the vocabulary (prompt tokens cost nothing),
    `chunk_tokens` at a time under activation checkpointing. With torch.distributed up, every rank runs
    the same number of tiles (see `_num_tiles`); call it on every rank.
    """
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_t, flat_w = targets.reshape(-1), weights.reshape(-1)
    keep = (flat_t != IGNORE) & (flat_w != 0)
    idx = keep.nonzero(as_tuple=True)[0]
    total = flat_h.new_zeros((), dtype=_upcast(flat_h).dtype) + 0.0 * flat_h.sum()  # keeps the graph when no target here
    for tile in range(_num_tiles(idx.numel(), chunk_tokens, hidden.device)):
        sel = idx[tile * chunk_tokens:(tile + 1) * chunk_tokens]
        h, t, w = flat_h[sel], flat_t[sel], flat_w[sel]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, h, lm_head, t, w, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, lm_head, t, w)
    return total


def per_token_ce(hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """[b, s, h] -> [b, s] CE per position (0 where no target); for checks and per-sample losses."""
    logits = _upcast(lm_head(hidden))
    ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return ce * (targets != IGNORE)


def longalign_reference(sample_losses: list[float], sample_targets: list[int]) -> float:
    """(1/M) * sum_i L_i / N_i over samples with N_i > 0 (LongAlign §3.3, Eq. 2): what the weighted step loss
    must equal."""
    pairs = [(loss, n) for loss, n in zip(sample_losses, sample_targets) if n > 0]
    return sum(loss / n for loss, n in pairs) / max(len(pairs), 1)


def naive_pack_loss(pack_sums: list[float], pack_targets: list[int]) -> float:
    """(1/K) * sum_k (sum_{i in k} L_i) / (sum_{i in k} N_i) (LongAlign §3.3, Eq. 3): the biased loss LongAlign
    corrects."""
    return sum(s / max(n, 1) for s, n in zip(pack_sums, pack_targets)) / max(len(pack_sums), 1)

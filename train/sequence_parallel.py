"""Ulysses sequence parallelism for Hugging Face models, on DeepSpeed's `UlyssesSPAttentionHF`.

Layout: the world is a DP x SP grid; SP groups are consecutive ranks (DeepSpeed's
`parallel_state_sp`: ranks [g*sp, (g+1)*sp) form SP group g), so `dp_rank = rank // sp` and
`sp_rank = rank % sp`. Each SP rank holds a contiguous slice s/P of every sequence; before attention
DeepSpeed's all-to-all turns `[b, s/P, h, d] -> [b, s, h/P, d]` (KV heads replicated first when
P > kv heads), the core attention runs on the full sequence for h/P heads, and a second all-to-all
turns `[b, s, h/P, d] -> [b, s/P, h, d]`.

Why a core attention of our own: DeepSpeed's wrapper drops `attention_mask` for every backend
except flex (`deepspeed/runtime/sequence_parallel/ulysses_sp.py`, `UlyssesSPAttentionHF`), so with plain sdpa packed documents attend
across their boundaries. It does all-gather the global `position_ids` and pass them on, so
`doc_masked_sdpa` (registered as "ctxforge_doc_sdpa") rebuilds the block-diagonal causal mask from
them, the rule of transformers' `find_packed_sequence_indices`, and runs causal sdpa per document. On GPU the core is
"flash_attention_2", which reads the same position_ids and switches to varlen. Everything else
(sharding, collectives, loss) is the same code on CPU and GPU.

This module does not know about data files, optimizers or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DOC_SDPA = "ctxforge_doc_sdpa"
FLASH_VARLEN = "flash_attention_2"


class SequenceParallelError(ValueError):
    """An SP layout that the model's heads or the world size cannot carry; the message has the arithmetic."""


# ---------------------------------------------------------------------------------------------------
# Document-masked attention (the CPU core; the GPU core is flash-attn varlen)


def document_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """[s] position ids of one row -> [(start, end)) of each document, in order."""
    starts = (torch.nonzero(position_ids[1:] != position_ids[:-1] + 1).flatten() + 1).tolist()
    bounds = [0, *starts, int(position_ids.shape[0])]
    return list(zip(bounds[:-1], bounds[1:]))


def doc_masked_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """HF attention interface: query [b, h, s, d], key/value [b, h_kv, s, d] -> ([b, s, h, d], None).

    Causal attention inside each document only, one sdpa call per document: the varlen semantics of
    flash-attn on CPU (cost sum n_i^2, no [s, s] mask). Documents come from `position_ids` (global ones
    under SP: DeepSpeed all-gathers them), never from `attention_mask`, which the Ulysses wrapper drops.

    Raises ValueError when a forward call passes no position_ids.
    """
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError(f"{DOC_SDPA} needs position_ids in every forward call (they mark document boundaries)")
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # GQA: [b, h_kv, s, d] -> [b, h, s, d]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    rows = []
    for b in range(query.shape[0]):
        docs = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                               dropout_p=dropout, scale=scaling, is_causal=True)
                for s, e in document_spans(position_ids[b])]
        rows.append(torch.cat(docs, dim=2))  # n_docs x [1, h, n_i, d] -> [1, h, s, d]
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register_doc_sdpa() -> None:
    """Make "ctxforge_doc_sdpa" a valid `attn_implementation` (idempotent). No mask function is registered
    for it, so transformers builds no [s, s] mask of its own."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ALL_ATTENTION_FUNCTIONS.get(DOC_SDPA) is None:
        AttentionInterface.register(DOC_SDPA, doc_masked_sdpa)


# ---------------------------------------------------------------------------------------------------
# Layout checks


def valid_sp_degrees(num_q_heads: int, num_kv_heads: int, limit: int | None = None) -> list[int]:
    """SP degrees Ulysses can run: q heads % sp == 0 and (kv % sp == 0 or sp % kv == 0, KV replicated)."""
    limit = limit or num_q_heads
    return [sp for sp in range(1, limit + 1)
            if num_q_heads % sp == 0 and (num_kv_heads % sp == 0 or sp % num_kv_heads == 0)]


def check_sp_degree(sp_degree: int, num_q_heads: int, num_kv_heads: int, where: str = "") -> None:
    """Raise with the arithmetic when the model's heads cannot be split sp_degree ways.

    Raises SequenceParallelError stating the arithmetic.
    """
    prefix = f"{where}: " if where else ""
    valid = ", ".join(map(str, valid_sp_degrees(num_q_heads, num_kv_heads)))
    if num_q_heads % sp_degree:
        raise SequenceParallelError(
            f"{prefix}sp_degree {sp_degree} does not divide the {num_q_heads} query heads "
            f"({num_q_heads} % {sp_degree} = {num_q_heads % sp_degree}); valid SP degrees for this model: {valid}")
    if num_kv_heads % sp_degree and sp_degree % num_kv_heads:
        raise SequenceParallelError(
            f"{prefix}sp_degree {sp_degree} and the {num_kv_heads} KV heads divide neither way "
            f"({num_kv_heads} % {sp_degree} = {num_kv_heads % sp_degree}, {sp_degree} % {num_kv_heads} = "
            f"{sp_degree % num_kv_heads}), so KV heads can be neither split nor replicated; valid SP degrees: {valid}")


@dataclass(frozen=True)
class ParallelLayout:
    """Where this rank sits in the DP x SP grid (SP groups are consecutive ranks)."""

    world_size: int
    rank: int
    sp_degree: int

    @property
    def dp_degree(self) -> int:
        return self.world_size // self.sp_degree

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_degree

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_degree

    @classmethod
    def build(cls, world_size: int, rank: int, sp_degree: int) -> "ParallelLayout":
        """The layout of `rank` among `world_size` workers in SP groups of `sp_degree`. Raises
        SequenceParallelError stating the arithmetic when sp_degree does not divide world_size."""
        if sp_degree < 1 or world_size % sp_degree:
            raise SequenceParallelError(
                f"sp_degree {sp_degree} does not divide the {world_size} workers ({world_size} % {sp_degree} = "
                f"{world_size % sp_degree if sp_degree else 'n/a'}); workers = dp_degree x sp_degree")
        return cls(world_size=world_size, rank=rank, sp_degree=sp_degree)


_ULYSSES: dict = {}  # this process's registration: {"key": (...), "mpu": ...}


def enable_ulysses(model, sp_degree: int, core_attn: str, micro_batch_size: int = 1):
    """Register DeepSpeed's Ulysses attention over `core_attn` for this process and return its mpu
    (None for sp_degree 1). The model must have been built with `attn_implementation=core_attn`;
    torch.distributed (via deepspeed.init_distributed) must be up.

    Idempotent for the same layout and architecture: DeepSpeed's registration wraps whatever function
    is registered under `core_attn` and creates the SP process groups once per process, so a second
    registration would wrap the wrapper (two all-to-alls) or fail. A different layout in the same
    process is refused.

    Raises SequenceParallelError when this process already registered Ulysses for another layout or architecture.
    """
    if sp_degree == 1:
        return None
    cfg = model.config.get_text_config()
    check_sp_degree(sp_degree, cfg.num_attention_heads, cfg.num_key_value_heads)
    key = (sp_degree, core_attn, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers,
           getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads, micro_batch_size)
    if _ULYSSES:
        if _ULYSSES["key"] != key:
            raise SequenceParallelError(f"this process already registered Ulysses for (sp, attention, heads, kv heads, "
                                        f"layers, head dim, rows) = {_ULYSSES['key']}; cannot switch to {key}")
        return _ULYSSES["mpu"]
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=core_attn, sequence_parallel_size=sp_degree,
        micro_batch_size=micro_batch_size, seq_length_is_variable=True)
    _ULYSSES.update(key=key, mpu=mpu)
    return mpu


# ---------------------------------------------------------------------------------------------------
# Sharding a batch along the sequence


PAD_FALLBACK_ID = 0


def padding_id(pad_token_id: int | None) -> int:
    """The input id written into padding: the tokenizer's pad token, or id 0 when it has none (Llama-3.1's
    tokenizer has no pad token). Any id is right: padding is its own document (attention never mixes it
    with real tokens), carries no target and no weight, so its value cannot reach the loss."""
    return PAD_FALLBACK_ID if pad_token_id is None else int(pad_token_id)


def pad_to_multiple(batch: dict[str, torch.Tensor], multiple: int, pad_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad every [b, s] tensor so that s % multiple == 0. Padding is its own document (positions
    0, 1, ... so it never joins the last real one), carries no target and no weight. `pad_id` may be None
    (a tokenizer without a pad token): see `padding_id`."""
    s = batch["input_ids"].shape[1]
    pad = (-s) % multiple
    if pad == 0:
        return batch
    b = batch["input_ids"].shape[0]
    fill = {"input_ids": padding_id(pad_id), "target_ids": -100, "weights": 0.0, "sample_index": -1}
    out = {}
    for key, value in batch.items():
        if key == "position_ids":
            extra = torch.arange(pad, dtype=value.dtype).expand(b, pad)
        else:
            extra = torch.full((b, pad), fill[key], dtype=value.dtype)
        out[key] = torch.cat([value, extra], dim=1)
    return out


def shard_sequence(batch: dict[str, torch.Tensor], sp_rank: int, sp_degree: int) -> dict[str, torch.Tensor]:
    """Contiguous slice of every [b, s] tensor for one SP rank: [b, s] -> [b, s/P]. Targets were shifted
    on the full sequence and position ids stay global, so nothing at a shard edge is lost.

    Raises SequenceParallelError when the sequence length is not a multiple of sp_degree (pad first:
    pad_to_multiple).
    """
    s = batch["input_ids"].shape[1]
    if s % sp_degree:
        raise SequenceParallelError(f"sequence length {s} is not a multiple of sp_degree {sp_degree} "
                                    f"({s} % {sp_degree} = {s % sp_degree}); pad it first (pad_to_multiple)")
    local = s // sp_degree
    return {k: v[:, sp_rank * local:(sp_rank + 1) * local].contiguous() for k, v in batch.items()}


"""ALST's two activation-memory savers, applied to a Hugging Face model: tiled MLP and checkpoint offload.

Arctic Long Sequence Training (Bekman et al. 2025, arXiv 2506.13996) trains Llama-8B on 500K tokens on one
H100 and 3.7M tokens on one 8xH100 node with, among others, these two (its recipes'
`tiled_mlp_compute: true` and `activation_checkpoint_cpu_offload: true`):

- **Tiled MLP** (DeepSpeed's `TiledMLP`, `deepspeed.runtime.sequence_parallel.ulysses_sp`): the gated MLP
  (gate/up/down projections) runs on slices of the sequence, so its [s, ffn] intermediates (8*ffn bytes per
  token saved for backward in bf16, 12*ffn at the peak of its backward) exist for one slice at a time. The
  backward recomputes each slice, so the MLP forward runs twice (three times with activation checkpointing).
  The MLP acts on each token independently, so the result is the untiled one (weight gradients are summed
  over slices: equal up to the order of the additions).
- **Checkpoint offload** (DeepSpeed's `CheckpointHiddenStatesOffload`,
  `deepspeed.runtime.activation_checkpointing.offload_activations`): the input of every checkpointed decoder
  layer (2*hidden bytes per token per layer in bf16: L*2*h per token, 256 KiB for Llama-8B) goes to pinned CPU
  memory on a side stream during the forward and comes back one layer at a time in the backward. On CPU
  tensors it offloads nothing (they already are in host memory); the wiring is the same.

Both change where memory is spent, never the numbers: the tests compare loss and gradients with and without.
"""

from __future__ import annotations

import contextlib
import math
from types import MethodType

import torch

GATED_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


class TiledMLPError(ValueError):
    """The model has no gated MLP that TiledMLP can tile; the message names the model type."""


def mlp_shards(tokens: int, hidden_size: int) -> int:
    """Slices for `tokens` rows: ceil(tokens / hidden_size), DeepSpeed's rule (a slice of about `hidden_size`
    tokens keeps its [slice, ffn] intermediates near the size of one [hidden, ffn] weight)."""
    return max(1, math.ceil(tokens / hidden_size))


def _agreed(shards: int, device: torch.device) -> int:
    """The max of `shards` over every rank. Under ZeRO-3 every MLP call gathers the projections' weights
    (a collective), so every rank must call them the same number of times even when its micro-batch is
    shorter (DP ranks hold packs of different lengths)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return shards
    t = torch.tensor([shards], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # [1] per rank -> [1] max over the world
    return int(t.item())


def _exact_chunks(rows: int, shards: int) -> int:
    """Rows to add so that torch.chunk(rows, shards) yields exactly `shards` slices. TiledMLP slices with
    torch.chunk, which yields fewer slices when ceil(rows / ceil(rows / shards)) < shards (e.g. 6 rows in 4
    gives 3); its backward then never marks the weights' gradients ready (it does so at slice `shards`), and
    ranks would disagree on the number of weight gathers."""
    if rows >= shards and math.ceil(rows / math.ceil(rows / shards)) == shards:
        return 0
    return shards * math.ceil(rows / shards) - rows


def tiled_mlp_forward(module: torch.nn.Module, x: torch.Tensor, shards: int | None = None) -> torch.Tensor:
    """[..., s, h] -> [..., s, h]: `type(module).forward` computed by DeepSpeed's TiledMLP in `shards`
    slices of the flattened tokens (default: `mlp_shards`, agreed across ranks). Rows added to make the
    slices exact are zeros and are cut from the output (they get no gradient)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shape = x.shape
    flat = x.reshape(-1, shape[-1])  # [b*s, h]: slices of tokens, whatever the batch layout
    if shards is None:
        shards = _agreed(mlp_shards(flat.shape[0], shape[-1]), x.device)
    pad = _exact_chunks(flat.shape[0], shards)
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad, shape[-1])])
    compute_params = [getattr(module, name).weight for name in GATED_MLP_PARTS]
    out = TiledMLP.apply(type(module).forward, module, flat, shards, compute_params)
    if pad:
        out = out[:-pad]
    return out.reshape(*shape[:-1], out.shape[-1])


def gated_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every gated MLP block (gate_proj, up_proj, down_proj, act_fn: Llama, Qwen2/3, Mistral, ...)."""
    return [m for m in model.modules() if all(isinstance(getattr(m, p, None), torch.nn.Linear)
                                             for p in GATED_MLP_PARTS) and hasattr(m, "act_fn")]


def enable_tiled_mlp(model: torch.nn.Module) -> int:
    """Route every gated MLP of `model` through `tiled_mlp_forward` (this model's instances only; the class is
    untouched). Returns the number of MLPs patched; raises TiledMLPError when there is none."""
    mlps = gated_mlps(model)
    if not mlps:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise TiledMLPError(f"runtime.tiled_mlp: model type {model_type!r} has no gated MLP ({', '.join(GATED_MLP_PARTS)} "
                            f"+ act_fn) to tile; set runtime.tiled_mlp=false")
    for mlp in mlps:
        mlp.forward = MethodType(tiled_mlp_forward, mlp)
    return len(mlps)


def checkpoint_offload(enabled: bool):
    """Context for one micro-batch's forward AND backward: with `enabled`, the input of every checkpointed
    decoder layer is kept in pinned CPU memory between its forward and its backward (DeepSpeed's
    CheckpointHiddenStatesOffload: non-reentrant checkpointing, the transformers default; the newest layer
    input stays on the GPU because the backward needs it first). Without, a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        get_checkpoint_hidden_states_offloading_ctx_manager,
    )

    return get_checkpoint_hidden_states_offloading_ctx_manager()

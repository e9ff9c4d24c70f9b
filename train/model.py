"""Build a stage's model and compute its loss on one (sharded) micro-batch.

The same two functions run on a laptop and on an H100 node: `load_stage_model` differs only by the
attention core it asks for (doc-masked sdpa on CPU, flash-attn varlen on GPU) and the dtype;
`weighted_loss_sum` is the forward every path (single process, SP, Ray Train) uses.
"""

from __future__ import annotations

import contextlib

import torch

from .loss import tiled_weighted_ce
from .memory_savers import enable_tiled_mlp
from .rope import RopeConfig, stage_config, verify_rotary
from .sequence_parallel import DOC_SDPA, FLASH_VARLEN, register_doc_sdpa

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class AttentionUnavailableError(RuntimeError):
    """The attention core the config asks for cannot run in this worker's environment."""


def resolve_attention(attention: str, device: torch.device) -> str:
    """`auto` -> flash-attn varlen on CUDA, document-masked sdpa elsewhere. Raises AttentionUnavailableError
    when the choice is flash_attention_2 and flash-attn is not installed (no silent fallback: the
    document-masked sdpa core is exact on CUDA too, but runs one sdpa call per document, so it is an
    explicit choice: runtime.attention=ctxforge_doc_sdpa)."""
    chosen = (FLASH_VARLEN if device.type == "cuda" else DOC_SDPA) if attention == "auto" else attention
    if chosen == FLASH_VARLEN:
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise AttentionUnavailableError(
                f"runtime.attention={attention} needs flash_attention_2 on {device.type}, but the flash-attn package "
                f"is not installed on this worker: install the GPU extra (pip install --no-build-isolation "
                f"'ctxforge[gpu]', which pins flash-attn; cluster/Dockerfile does it), or set "
                f"runtime.attention={DOC_SDPA} (exact document masking with torch sdpa, slower)")
    return chosen


def load_stage_model(model_path: str, rope: RopeConfig, max_seq_len: int, attention: str,
                     dtype: str = "float32", gradient_checkpointing: bool = False, tiled_mlp: bool = False,
                     zero3_config: dict | None = None):
    """The model at `model_path` rebuilt with the stage's RoPE (config first, then weights, then a check
    that the rotary buffers took the new setting).

    `zero3_config` (a DeepSpeed config with ZeRO stage 3): the model is built under `deepspeed.zero.Init`
    (transformers' ZeRO-3 loading, through `HfDeepSpeedConfig`), so each parameter is partitioned as it is
    created and filled one at a time from the checkpoint: no rank ever holds the whole model, only its
    1/world share (torch.distributed must be up). `tiled_mlp`: DeepSpeed's TiledMLP on every gated MLP
    (train/memory_savers.py)."""
    from transformers import AutoModelForCausalLM

    register_doc_sdpa()
    config = stage_config(model_path, rope, max_seq_len)
    with _zero3_init(zero3_config):
        model = AutoModelForCausalLM.from_pretrained(model_path, config=config, attn_implementation=attention,
                                                     dtype=DTYPES[dtype])
    verify_rotary(model)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tiled_mlp:
        enable_tiled_mlp(model)
    return model


@contextlib.contextmanager
def _zero3_init(zero3_config: dict | None):
    """While loading: transformers sees ZeRO-3 (its loader then builds under deepspeed.zero.Init and fills the
    partitions); unset afterwards, so later loads in this process are unaffected."""
    if not zero3_config:
        yield
        return
    if zero3_config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError(f"zero3_config: ZeRO stage {zero3_config.get('zero_optimization', {}).get('stage')}, not 3")
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(zero3_config)  # transformers holds a weak reference: keep it alive while loading
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_ds


def weighted_loss_sum(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 4096) -> torch.Tensor:
    """[] sum over this rank's positions of w_t * CE_t, for a batch of [b, s_local] tensors
    (input_ids, position_ids with global values, target_ids, weights)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    weights = batch["weights"].to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    return tiled_weighted_ce(hidden, model.get_output_embeddings(), batch["target_ids"], weights, chunk_tokens)

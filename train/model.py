"""Build a stage's model and compute its loss on one (sharded) micro-batch.

The same two functions run on a laptop and on an H100 node: `load_stage_model` differs only by the
attention core it asks for (doc-masked sdpa on CPU, flash-attn varlen on GPU) and the dtype;
`weighted_loss_sum` is the forward every path (single process, SP, Ray Train) uses.
"""

from __future__ import annotations

import torch

from .loss import tiled_weighted_ce
from .rope import RopeConfig, stage_config, verify_rotary
from .sequence_parallel import DOC_SDPA, FLASH_VARLEN, register_doc_sdpa

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_attention(attention: str, device: torch.device) -> str:
    """`auto` -> flash-attn varlen on CUDA, document-masked sdpa elsewhere."""
    if attention == "auto":
        return FLASH_VARLEN if device.type == "cuda" else DOC_SDPA
    return attention


def load_stage_model(model_path: str, rope: RopeConfig, max_seq_len: int, attention: str,
                     dtype: str = "float32", gradient_checkpointing: bool = False):
    """The model at `model_path` rebuilt with the stage's RoPE (config first, then weights, then a check
    that the rotary buffers took the new setting)."""
    from transformers import AutoModelForCausalLM

    register_doc_sdpa()
    config = stage_config(model_path, rope, max_seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_path, config=config, attn_implementation=attention,
                                                 dtype=DTYPES[dtype])
    verify_rotary(model)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def weighted_loss_sum(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 4096) -> torch.Tensor:
    """[] sum over this rank's positions of w_t * CE_t, for a batch of [b, s_local] tensors
    (input_ids, position_ids with global values, target_ids, weights)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    weights = batch["weights"].to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    return tiled_weighted_ce(hidden, model.get_output_embeddings(), batch["target_ids"], weights, chunk_tokens)

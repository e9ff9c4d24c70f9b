"""Setting up DeepSpeed for one stage: ZeRO config, the engine with its optimizer and lr schedule, the flat-world
check, the loss scale under SP, HF export, the worker's device and peak memory.

The same engine runs on CPU (gloo, fp32, torch AdamW) and GPU (NCCL, bf16, optional CPU offload).

Gradient scale. DeepSpeed is given a flat data-parallel world of all W = dp x sp ranks: no SP mpu and no
`sequence_parallel_size`. Told about SP, DeepSpeed 0.19.8 reduces inconsistently: the ZeRO-0/1/2 paths
and ZeRO-3's contiguous all-reduce divide the sum over the dp x sp group by dp only (a sum over SP
ranks), while ZeRO-3's reduce-scatter divides by dp x sp. Without SP in its view every path (plain
all-reduce, ZeRO-1/2 reduce/average_tensor, ZeRO-3 reduce-scatter or all-reduce) is the plain-DP average
over the W ranks, and `check_flat_world` refuses an engine that sees anything else. ZeRO partitions over
the same W ranks either way. With that average, the step's gradient is

    (1/W) * sum_ranks (1/grad_accum) * sum_micro grad(sp * local_loss) = (1/K) * sum_packs grad(pack_loss)

(DeepSpeed divides each micro-batch's loss by grad_accum; K = dp x grad_accum packs, whose per-token
weights already carry K/(N_i*M)); the factor sp (`backward_scale`) is there because an SP group's ranks
each hold a part of one pack's loss. The Ulysses all-to-all runs on its own SP group, outside DeepSpeed's
engine.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from .config import RuntimeConfig, StageConfig
from .model import weighted_loss_sum

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


class StageLossModel(torch.nn.Module):
    """Wraps the HF model so DeepSpeed's engine forward returns the weighted loss sum (no full logits)."""

    def __init__(self, lm, chunk_tokens: int):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids, position_ids, target_ids, weights):
        batch = {"input_ids": input_ids, "position_ids": position_ids, "target_ids": target_ids, "weights": weights}
        return weighted_loss_sum(self.lm, batch, self.chunk_tokens)


def lr_lambda(stage: StageConfig, total_steps: int):
    """Multiplier of the peak lr at optimizer step `n` (0-based): linear warmup, then constant, linear or cosine
    decay to `min_lr_ratio` (the cosine half-period of Loshchilov & Hutter 2017, "SGDR", Eq. 5, without restarts; as in
    transformers' get_cosine_schedule_with_warmup)."""
    warm = stage.warmup_steps

    def fn(n: int) -> float:
        if warm and n < warm:
            return (n + 1) / warm
        if stage.schedule == "constant" or total_steps <= warm + 1:
            return 1.0
        progress = min(1.0, (n - warm) / max(1, total_steps - warm - 1))
        if stage.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return stage.min_lr_ratio + (1.0 - stage.min_lr_ratio) * decay

    return fn


def ds_config(stage: StageConfig, runtime: RuntimeConfig, device: torch.device, rows: int) -> dict:
    zero: dict = {"stage": runtime.zero_stage}
    if runtime.offload_optimizer and runtime.zero_stage:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if runtime.offload_params and runtime.zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if runtime.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": rows,
        "gradient_accumulation_steps": stage.grad_accum,
        "gradient_clipping": stage.max_grad_norm,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": stage.lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": stage.weight_decay,
                                                  # torch's AdamW on CPU (DeepSpeed's fused Adam needs CUDA)
                                                  "torch_adam": device.type != "cuda"}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # No "sequence_parallel_size" here, on purpose: see the module docstring (gradient scale). Gradients are
    # reduced in the training dtype (DeepSpeed's default for a world without SP).
    if runtime.dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def build_engine(lm, stage: StageConfig, runtime: RuntimeConfig, device: torch.device, rows: int, total_steps: int,
                 extra_config: dict | None = None):
    """DeepSpeed engine over the flat world of every rank (see the module docstring) and its LambdaLR.
    `extra_config` is merged into the DeepSpeed config (e.g. {"checkpoint": {"load_universal": True}})."""
    import deepspeed

    wrapped = StageLossModel(lm, runtime.loss_chunk_tokens)
    config = {**ds_config(stage, runtime, device, rows), **(extra_config or {})}
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapped, model_parameters=[p for p in wrapped.parameters() if p.requires_grad], config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage, total_steps)))
    check_flat_world(engine)
    return engine, scheduler


def check_flat_world(engine) -> None:
    """Raise unless DeepSpeed averages gradients over every rank as plain data parallelism (W ranks, no SP):
    the premise of `backward_scale`. Guards against an SP mpu or `sequence_parallel_size` slipping in.

    Raises RuntimeError stating what DeepSpeed sees otherwise.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    sp_seen = int(getattr(engine, "sequence_parallel_size", 1))
    group = engine.seq_data_parallel_group
    dp_seen = dist.get_world_size(group) if dist.is_initialized() else 1
    if sp_seen != 1 or dp_seen != world:
        raise RuntimeError(f"DeepSpeed sees sequence_parallel_size {sp_seen} and a gradient group of {dp_seen} of "
                           f"{world} ranks; ctxforge's gradient scale needs the flat world (no SP in DeepSpeed's view)")


def backward_scale(sp_degree: int) -> float:
    """Factor on each rank's local loss before `engine.backward` (see the module docstring): sp_degree."""
    return float(sp_degree)


def _full_state_dict(engine) -> dict | None:
    """The HF model's full state dict on rank 0 (ZeRO-3: gathered; a collective, every rank calls it)."""
    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if engine.global_rank == 0 else None
    if sd is None:
        return None
    return {k[len("lm."):]: v.detach().cpu() for k, v in sd.items() if k.startswith("lm.")}


def export_hf(engine, lm, out_dir: Path, tokenizer_dir: str) -> None:
    """Write the model in HF format (safetensors, config.json with the stage's RoPE) plus the tokenizer."""
    sd = _full_state_dict(engine)
    if engine.global_rank != 0:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file() and not (out_dir / name).exists():
            shutil.copy2(src, out_dir / name)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this rank: CUDA max allocated, else the process's max RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def worker_device(runtime: RuntimeConfig) -> torch.device:
    """This Ray Train worker's device (Ray assigns the GPU)."""
    if runtime.device == "cpu" or (runtime.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()

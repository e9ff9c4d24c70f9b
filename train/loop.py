"""The Ray Train worker loop of one curriculum stage.

Every worker: joins the process group DeepSpeed attaches to, builds the stage model (the previous
stage's weights, this stage's RoPE), registers Ulysses when sp_degree > 1, reads the stage's samples,
derives the same batching plan as every other rank (seed, epoch, lengths), and runs optimizer steps.
Step `n` always uses the same micro-batches, so the data position in a checkpoint is just the step;
a resumed worker restores weights, optimizer and scheduler from DeepSpeed's checkpoint and continues
the same loss curve.

Each step: K (packs), M (samples), T (targets), R (real tokens) are summed over ranks; every token's
base weight is scaled by K/M (sample weighting) or K/T (token weighting); the sequence is padded to a
multiple of sp_degree and sharded contiguously; DeepSpeed averages the gradients.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from .batching import collate, plan_microbatches
from .config import TrainConfig
from .data import DataError, read_short_mix, read_stage, short_count
from .engine import (backward_scale, build_engine, ds_config, load_checkpoint, peak_memory_bytes, save_checkpoint,
                     worker_device)
from .loss import step_counts, step_scale
from .memory import checkpoint_offload
from .model import load_stage_model, resolve_attention
from .sequence_parallel import ParallelLayout, enable_ulysses, pad_to_multiple, shard_sequence


class ResumeError(ValueError):
    """A checkpoint that belongs to another config; the message names it."""


def load_samples(cfg: TrainConfig, index: int, tokenizer_hash: str, tokenizer=None):
    stage = cfg.stages[index]
    data = read_stage(cfg.input.dir, stage.data_stage or stage.name, stage.max_seq_len, tokenizer_hash,
                      cfg.input.strict)
    samples = list(data.samples)
    n_short = short_count(len(samples), stage.short_ratio)
    if n_short:
        samples += read_short_mix(cfg.input.short_data, tokenizer, n_short, stage.max_seq_len, cfg.runtime.seed)
    data.stats["short"] = n_short
    return samples, data.stats


def steps_layout(num_microbatches: int, stage) -> int:
    per_step = stage.dp_degree * stage.grad_accum
    steps = num_microbatches // per_step
    if steps == 0:
        raise DataError(f"stage {stage.name}: {num_microbatches} micro-batches per epoch, fewer than one step needs "
                        f"(dp_degree {stage.dp_degree} x grad_accum {stage.grad_accum} = {per_step})")
    return steps


def train_stage_worker(payload: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist
    from tqdm import tqdm

    cfg = TrainConfig.model_validate(payload["config"])
    index, rt = payload["stage_index"], cfg.runtime
    stage = cfg.stages[index]
    ctx = ray.train.get_context()
    layout = ParallelLayout.build(ctx.get_world_size(), ctx.get_world_rank(), stage.sp_degree)
    device = worker_device(rt)
    deepspeed.init_distributed(dist_backend=payload["backend"])
    torch.manual_seed(rt.seed)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(rt.cpus_per_worker)))

    attention = resolve_attention(rt.attention, device)
    rows = 1 if stage.batching == "pack" else stage.batch_size
    lm = load_stage_model(payload["init_model"], stage.rope, stage.max_seq_len, attention, rt.dtype,
                          rt.gradient_checkpointing, tiled_mlp=rt.tiled_mlp,
                          zero3_config=ds_config(stage, rt, device, rows) if rt.zero_stage == 3 else None)
    mpu = enable_ulysses(lm, stage.sp_degree, attention, micro_batch_size=rows)

    tokenizer = None
    if stage.short_ratio > 0:
        from ctxforge.models import load_tokenizer
        tokenizer = load_tokenizer(payload["tokenizer_dir"])
    samples, stats = load_samples(cfg, index, payload["tokenizer_hash"], tokenizer)
    lengths = [len(s) for s in samples]
    plans: dict[int, list[list[int]]] = {}

    def plan(epoch: int) -> list[list[int]]:
        if epoch not in plans:
            plans[epoch] = plan_microbatches(lengths, stage.batching, stage.max_seq_len, stage.batch_size,
                                             rt.seed, epoch)
        return plans[epoch]

    steps_per_epoch = steps_layout(len(plan(0)), stage)
    total_steps = stage.max_steps or steps_per_epoch * stage.epochs
    engine, scheduler = build_engine(lm.to(device), stage, rt, device, rows, total_steps, mpu)

    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(engine, Path(d))
        if state["fingerprint"] != payload["fingerprint"]:
            raise ResumeError(f"{payload['storage']}: checkpoint of stage {state['stage']} was written by a different "
                              f"config (fingerprint {state['fingerprint']}, this config {payload['fingerprint']}); "
                              f"use another output.dir / output.name to start over")
        start = state["step"]

    metrics_path = Path(payload["metrics_path"])
    if layout.rank == 0:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        unused = len(plan(0)) - steps_per_epoch * stage.dp_degree * stage.grad_accum
        print(f"[{stage.name}] {len(samples)} samples ({stats}), {len(plan(0))} micro-batches/epoch "
              f"({unused} left over: not a multiple of dp {stage.dp_degree} x grad_accum {stage.grad_accum}), "
              f"{total_steps} steps, dp {stage.dp_degree} x sp {stage.sp_degree}, attention {attention}, "
              f"{'resuming at step ' + str(start) if start else 'from ' + payload['init_model']}", flush=True)
    bar = tqdm(total=total_steps, initial=start, desc=f"stage {stage.name}", disable=layout.rank != 0 or not rt.progress)
    pad_id, sp = payload["pad_id"], stage.sp_degree
    comm = device if payload["backend"] == "nccl" else torch.device("cpu")  # where collective buffers live
    engine.train()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        ids = [plan(epoch)[(within * stage.grad_accum + j) * stage.dp_degree + layout.dp_rank]
               for j in range(stage.grad_accum)]
        batches = [collate([samples[i] for i in mb], stage.batching, stage.loss_weighting, pad_id, rows) for mb in ids]
        k, m, t, r = step_counts(len(batches), sum(b.num_samples for b in batches),
                                 sum(b.num_targets for b in batches), stage.sp_degree, device=comm,
                                 extra=sum(b.real_tokens for b in batches))
        scale = step_scale(stage.loss_weighting, k, m, t)
        lr = scheduler.get_last_lr()[0]  # the lr this step's update uses (engine.step advances the schedule)
        loss_sum = torch.zeros((), dtype=torch.float64, device=comm)
        for n, mb in enumerate(batches):
            tensors = pad_to_multiple(mb.tensors, sp, pad_id)
            tensors["weights"] = tensors["weights"] * scale
            local = {key: v.to(device) for key, v in shard_sequence(tensors, layout.sp_rank, sp).items()}
            with checkpoint_offload(rt.offload_checkpoints):  # spans forward and backward
                loss = engine(**local)
                engine.backward(loss * backward_scale(sp))
            loss_sum += loss.detach().double().to(comm)
            if n < len(batches) - 1:
                engine.step()  # accumulates; DeepSpeed steps the optimizer at the last micro-batch
        dist.all_reduce(loss_sum)  # [] per rank -> [] sum over every rank = sum over the step's K packs
        # Only a fresh run dies, and once per stage: a restart gets past it even when Ray had not yet
        # registered the checkpoint reported just before the crash (the restart then starts from scratch).
        if rt.fail_at_step == step + 1 and checkpoint is None and not _crashed_before(metrics_path):
            _crash(loss_sum.item() / k, step, metrics_path, layout.rank)
        engine.step()
        peaks = torch.tensor([peak_memory_bytes(device)], dtype=torch.int64, device=comm)
        all_peaks = [torch.zeros_like(peaks) for _ in range(layout.world_size)]
        dist.all_gather(all_peaks, peaks)  # [1] per rank -> world_size x [1]
        dt = time.perf_counter() - t0
        row = {"stage": stage.name, "step": step + 1, "epoch": epoch, "loss": loss_sum.item() / k,
               "lr": lr, "packs": k, "samples": m, "target_tokens": t, "tokens": r,
               "tokens_per_s": r / dt, "samples_per_s": m / dt, "step_s": dt,
               "peak_mem_bytes": max(int(p) for p in all_peaks),
               "peak_mem_bytes_per_rank": [int(p) for p in all_peaks]}
        last = step + 1 == total_steps
        due = last or (stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0)
        if layout.rank == 0:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
        report = {k_: v for k_, v in row.items() if k_ != "peak_mem_bytes_per_rank"}
        if due:
            state = {"stage": stage.name, "stage_index": index, "step": step + 1, "epoch": epoch,
                     "total_steps": total_steps, "fingerprint": payload["fingerprint"], "final": last,
                     "loss": row["loss"], "data_stats": stats}
            with tempfile.TemporaryDirectory(prefix="ctxforge-ckpt-") as d:
                save_checkpoint(engine, engine.module.lm, Path(d), state, payload["tokenizer_dir"])
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(report)
    bar.close()


def _crashed_before(metrics_path: Path) -> bool:
    if not metrics_path.is_file():
        return False
    return any(json.loads(line).get("crashed") for line in metrics_path.read_text().splitlines() if line.strip())


def _crash(loss: float, step: int, metrics_path: Path, rank: int) -> None:
    """Fault injection (runtime.fail_at_step): after the step's forward/backward, before its optimizer step,
    rank 0 records the step's loss and dies like a killed worker (the others then lose their group)."""
    if rank != 0:
        return
    with metrics_path.open("a") as fh:
        fh.write(json.dumps({"step": step + 1, "loss": loss, "crashed": True}) + "\n")
    os._exit(17)

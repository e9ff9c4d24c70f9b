"""The Ray Train worker loop of one curriculum stage.

Every worker: joins the process group DeepSpeed attaches to, builds the stage model (the previous
stage's weights, this stage's RoPE), registers Ulysses when sp_degree > 1, indexes the stage's samples
(metadata only), derives the same batching plan as every other rank (seed, epoch, lengths), and runs
optimizer steps, reading at each step only the samples of its own micro-batches. The data position in
a checkpoint is (epoch, next micro-batch), not tied to the layout (step_batches.py), so a resumed worker,
with the same layout or another one, restores weights, optimizer and scheduler from DeepSpeed's
checkpoint (checkpoint.py) and continues the same loss curve.

Each step: K (packs), M (samples), T (targets), R (real tokens) are summed over ranks; every token's
base weight is scaled by K/M (sample weighting) or K/T (token weighting); the sequence is padded to a
multiple of sp_degree and sharded contiguously; DeepSpeed averages the gradients over all ranks and the
local loss carries the factor sp (deepspeed_setup.py explains the scale).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .batching import collate, plan_microbatches
from .config import TrainConfig
from .data import DataError, StageSource, index_stage, read_long_output_mix, read_short_mix, short_count
from .deepspeed_setup import backward_scale, build_engine, ds_config, peak_memory_bytes, worker_device
from .loss import step_counts, step_scale
from .memory_savers import checkpoint_offload
from .model import load_stage_model, resolve_attention
from .step_batches import DataPosition, StepBatches
from .sequence_parallel import ParallelLayout, enable_ulysses, pad_to_multiple, shard_sequence
from .tracking import Tracker


class ResumeError(ValueError):
    """A checkpoint that belongs to another config; the message names it."""


def open_source(cfg: TrainConfig, index: int, tokenizer_hash: str, tokenizer=None) -> StageSource:
    """The stage's samples: long ones indexed from the shards' metadata, short ones rendered in memory."""
    stage = cfg.stages[index]
    idx = index_stage(cfg.input.path, stage.data_stage or stage.name, stage.max_seq_len, tokenizer_hash,
                      cfg.input.strict)
    n_short = short_count(len(idx), stage.short_ratio, stage.long_output_ratio)
    short = read_short_mix(cfg.input.short_data, tokenizer, n_short, stage.max_seq_len, cfg.runtime.seed) if n_short else []
    # the long-output mix (ctxforge lengthen's final set): already tokenized, so no tokenizer needed here
    n_long_output = short_count(len(idx), stage.long_output_ratio, stage.short_ratio)
    long_output = (read_long_output_mix(cfg.input.long_output, n_long_output, stage.max_seq_len, tokenizer_hash,
                                        cfg.runtime.seed) if n_long_output else [])
    return StageSource(idx, short, long_output)


def stage_step_batches(source: StageSource, stage, seed: int) -> StepBatches:
    lengths = source.lengths
    plans: dict[int, list[list[int]]] = {}

    def plan(epoch: int) -> list[list[int]]:
        if epoch not in plans:
            plans[epoch] = plan_microbatches(lengths, stage.batching, stage.max_seq_len, stage.batch_size, seed, epoch)
        return plans[epoch]

    return StepBatches(plan, stage.dp_degree * stage.grad_accum, stage.epochs, stage.max_steps)


def check_enough_data(batches: StepBatches, stage, index: int | None = None) -> None:
    """A step takes dp_degree x grad_accum micro-batches; an epoch with fewer cannot make one (DataError
    naming the keys to change). Run on the driver at preflight, and again by each worker."""
    first = len(batches.plan(0))
    if first < batches.per_step:
        key = f"stages.{index}" if index is not None else f"stage {stage.name}"
        raise DataError(f"stage {stage.name}: {first} micro-batches per epoch, fewer than one step needs "
                        f"(dp_degree {stage.dp_degree} x grad_accum {stage.grad_accum} = {batches.per_step}); "
                        f"lower {key}.workers (or raise {key}.sp_degree) or {key}.grad_accum, use "
                        f"{key}.batching=sort with a smaller batch_size, or synthesize more samples")


def _resume_state(checkpoint, payload: dict, layout: ParallelLayout) -> dict | None:
    if checkpoint is None:
        return None
    state = ckpt.read_state(checkpoint)
    if state.get("fingerprint") != payload["fingerprint"]:
        raise ResumeError(f"{payload['storage']}: checkpoint of stage {state.get('stage')} was written by a different "
                          f"config (fingerprint {state.get('fingerprint')}, this config {payload['fingerprint']}); "
                          f"use another output.dir / output.name to start over")
    if "next_microbatch" not in state:
        raise ResumeError(f"{payload['storage']}: checkpoint at step {state.get('step')} has no data position "
                          f"(written by an older ctxforge); use another output.dir / output.name to start over")
    return state


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

    tokenizer = None
    if stage.short_ratio > 0:
        from ctxforge.models import load_tokenizer
        tokenizer = load_tokenizer(payload["tokenizer_dir"])
    source = open_source(cfg, index, payload["tokenizer_hash"], tokenizer)
    batches = stage_step_batches(source, stage, rt.seed)
    check_enough_data(batches, stage)

    checkpoint = ray.train.get_checkpoint()
    state = _resume_state(checkpoint, payload, layout)
    pos = DataPosition(state["epoch"], state["next_microbatch"]) if state else DataPosition()
    done = state["step"] if state else 0
    reshard = bool(state) and state.get("workers") != layout.world_size
    total_steps = done + batches.steps_left(pos, done)

    attention = resolve_attention(rt.attention, device)
    rows = 1 if stage.batching == "pack" else stage.batch_size
    lm = load_stage_model(payload["init_model"], stage.rope, stage.max_seq_len, attention, rt.dtype,
                          rt.gradient_checkpointing, tiled_mlp=rt.tiled_mlp,
                          zero3_config=ds_config(stage, rt, device, rows) if rt.zero_stage == 3 else None)
    enable_ulysses(lm, stage.sp_degree, attention, micro_batch_size=rows)
    engine, scheduler = build_engine(lm.to(device), stage, rt, device, rows, total_steps,
                                     {"checkpoint": {"load_universal": True}} if reshard else None)
    if state:
        with tempfile.TemporaryDirectory(prefix="ctxforge-resume-") as scratch:
            local = (ckpt.prepare_universal(checkpoint, layout.rank, Path(scratch)) if reshard
                     else ckpt.fetch_own_shards(checkpoint, layout.rank, Path(scratch)))
            ckpt.load(engine, local, universal=reshard)

    metrics_path = Path(payload["metrics_path"])
    per_step = batches.per_step
    tracker = None
    if layout.rank == 0:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        # Rows an earlier attempt wrote past the restored checkpoint are recomputed now: drop them, so the
        # file and every tracker read as one history (each step once, in order).
        kept = truncate_history(metrics_path, done) if metrics_path.exists() else []
        tracker = Tracker.start(cfg, stage, payload, resumed_step=done, history=kept)
        if state:
            how = (f"resuming at step {done} (epoch {pos.epoch}, micro-batch {pos.index})"
                   + (f", resharded from {state['workers']} to {layout.world_size} workers" if reshard else "")
                   + (f"; the global batch changes from {state['microbatches_per_step']} to {per_step} micro-batches "
                      f"per step" if state["microbatches_per_step"] != per_step else ""))
        else:
            how = f"from {payload['init_model']}"
        print(f"[{stage.name}] {len(source)} samples ({source.stats}), {len(batches.plan(0))} micro-batches in epoch 0, "
              f"{total_steps} steps of {per_step} micro-batches, dp {stage.dp_degree} x sp {stage.sp_degree}, "
              f"attention {attention}, {how}", flush=True)
    bar = tqdm(total=total_steps, initial=done, desc=f"stage {stage.name}", disable=layout.rank != 0 or not rt.progress)
    pad_id, sp = payload["pad_id"], stage.sp_degree
    comm = device if payload["backend"] == "nccl" else torch.device("cpu")  # where collective buffers live
    engine.train()
    for n, step in enumerate(batches.steps(pos, done), start=done + 1):
        t0 = time.perf_counter()
        mine = [step.microbatches[j * stage.dp_degree + layout.dp_rank] for j in range(stage.grad_accum)]
        batches = [collate(source.read(mb), stage.batching, stage.loss_weighting, pad_id, rows) for mb in mine]
        k, m, t, r = step_counts(len(batches), sum(b.num_samples for b in batches),
                                 sum(b.num_targets for b in batches), stage.sp_degree, device=comm,
                                 extra=sum(b.real_tokens for b in batches))
        scale = step_scale(stage.loss_weighting, k, m, t)
        lr = scheduler.get_last_lr()[0]  # the lr this step's update uses (engine.step advances the batches)
        loss_sum = torch.zeros((), dtype=torch.float64, device=comm)
        for j, mb in enumerate(batches):
            tensors = pad_to_multiple(mb.tensors, sp, pad_id)
            tensors["weights"] = tensors["weights"] * scale
            local = {key: v.to(device) for key, v in shard_sequence(tensors, layout.sp_rank, sp).items()}
            with checkpoint_offload(rt.offload_checkpoints):  # spans forward and backward
                loss = engine(**local)
                engine.backward(loss * backward_scale(sp))
            loss_sum += loss.detach().double().to(comm)
            if j < len(batches) - 1:
                engine.step()  # accumulates; DeepSpeed steps the optimizer at the last micro-batch
        dist.all_reduce(loss_sum)  # [] per rank -> [] sum over every rank = sum over the step's K packs
        if rt.fail_at_step == n and not _crashed_before(metrics_path, n):
            _crash(loss_sum.item() / k, lr, n, metrics_path, layout.rank)
        engine.step()
        grad_norm = engine.get_global_grad_norm()
        peaks = torch.tensor([peak_memory_bytes(device)], dtype=torch.int64, device=comm)
        all_peaks = [torch.zeros_like(peaks) for _ in range(layout.world_size)]
        dist.all_gather(all_peaks, peaks)  # [1] per rank -> world_size x [1]
        dt = time.perf_counter() - t0
        row = {"stage": stage.name, "step": n, "epoch": step.epoch, "loss": loss_sum.item() / k, "lr": lr,
               "grad_norm": None if grad_norm is None else float(grad_norm), "packs": k, "samples": m,
               "target_tokens": t, "tokens": r, "tokens_per_s": r / dt, "samples_per_s": m / dt, "step_s": dt,
               "peak_mem_bytes": max(int(p) for p in all_peaks),
               "peak_mem_bytes_per_rank": [int(p) for p in all_peaks],
               "workers": layout.world_size, "sp_degree": sp}
        last = n == total_steps
        due = last or (stage.checkpoint_every and n % stage.checkpoint_every == 0)
        if layout.rank == 0:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            tracker.log(row, n)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
        report = {k_: v for k_, v in row.items() if k_ != "peak_mem_bytes_per_rank"}
        if due:
            saved = {"stage": stage.name, "stage_index": index, "step": n, "epoch": step.after.epoch,
                     "next_microbatch": step.after.index, "microbatches_per_step": per_step,
                     "workers": layout.world_size, "sp_degree": sp, "dp_degree": stage.dp_degree,
                     "grad_accum": stage.grad_accum, "total_steps": total_steps,
                     "fingerprint": payload["fingerprint"], "final": last, "loss": row["loss"],
                     "data_stats": source.stats}
            with tempfile.TemporaryDirectory(prefix="ctxforge-ckpt-") as d:
                ckpt.save(engine, engine.module.lm, Path(d), saved, payload["tokenizer_dir"], export_hf_weights=last)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(report)
    bar.close()
    if tracker:
        tracker.finish()


def read_history(metrics_path: Path) -> list[dict]:
    """The rows of a stage's metrics file: step rows ({"step": n, ...}) and event rows ({"event": ...})."""
    if not metrics_path.is_file():
        return []
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def truncate_history(metrics_path: Path, step: int) -> list[dict]:
    """Keep the step rows up to `step` (the restored checkpoint's) and the event rows, drop the step rows an
    interrupted attempt wrote after it, and append a `resumed` event naming what was dropped; the file is
    replaced atomically. Returns the kept step rows (what trackers that cannot purge replay)."""
    rows = read_history(metrics_path)
    kept = [r for r in rows if "event" in r or r.get("step", 0) <= step]
    dropped = [r["step"] for r in rows if "event" not in r and r.get("step", 0) > step]
    kept.append({"event": "resumed", "stage": metrics_path.stem, "from_step": step, "dropped_steps": dropped})
    tmp = metrics_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, metrics_path)
    return [r for r in kept if "event" not in r]


def _crashed_before(metrics_path: Path, step: int) -> bool:
    return any(r.get("event") == "killed" and r.get("at_step") == step for r in read_history(metrics_path))


def _crash(loss: float, lr: float, step: int, metrics_path: Path, rank: int) -> None:
    """Fault injection (runtime.fail_at_step): after the step's forward/backward, before its optimizer step,
    rank 0 records the step's loss (a `killed` event row) and dies like a killed worker (the others then
    lose their group). It first waits until Ray Train has registered every checkpoint reported so far, so
    the run resumes from the last one deterministically; it fires once per (stage, step)."""
    if rank != 0:
        return
    import ray.train

    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    with metrics_path.open("a") as fh:  # an event row, not a step row: the step is recomputed after the resume
        event = {"event": "killed", "stage": metrics_path.stem, "at_step": step, "loss": loss, "lr": lr}
        fh.write(json.dumps(event) + "\n")
    os._exit(17)

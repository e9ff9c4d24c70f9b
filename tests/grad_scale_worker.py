"""One optimizer step of the training loop's own step code through DeepSpeed's reduction, against one process.

Shared by tests/test_train_grad_scale.py and bench/bench_train_grad_scale.py. Each of `world` gloo
processes (mp.spawn) first computes the reference on its own: the LongAlign-weighted loss of the step's
K = 2 packs (3 samples, M = 3) on the full sequences, one process, no SP, and the 2-norm of its gradient.
Then, per ZeRO stage, a fresh model goes through `build_engine` and the step exactly as `train/loop.py`
runs it: K/M all-reduced, padding to a multiple of sp (with pad_token_id None, as for Llama-3.1), contiguous
shards, `engine.backward(loss * backward_scale(sp))`, `engine.step()` per micro-batch. The ratio
DeepSpeed's `get_global_grad_norm()` / reference must be 1.

Layouts: world 2 = dp1 x sp2 with grad_accum 2 (both packs on one SP group, one after the other);
world 4 = dp2 x sp2 with grad_accum 1 (one pack per SP group). Same K, M and reference in both.

`told_sp` (ZeRO stages) is the negative control: DeepSpeed is given the SP mpu and `sequence_parallel_size` (what
the trainer did before); its ZeRO-0/1/2 paths then sum over SP ranks instead of averaging.
"""

from __future__ import annotations

import json
import os

import torch

PACKS = [[0, 1], [2]]  # sample indices of the step's K = 2 packs


def _samples(tokenizer):
    from test_sp_equivalence import build_samples

    return build_samples(tokenizer)


def reference_norm(model_path: str, tokenizer) -> float:
    """2-norm of grad((1/K) * sum_k pack_loss_k) on full sequences in this process (no SP, no DeepSpeed)."""
    from ctxforge.train.batching import collate
    from ctxforge.train.loss import step_scale
    from ctxforge.train.model import load_stage_model, weighted_loss_sum
    from ctxforge.train.rope import RopeConfig
    from ctxforge.train.sequence_parallel import DOC_SDPA

    samples = _samples(tokenizer)
    model = load_stage_model(model_path, RopeConfig(), 4096, DOC_SDPA, dtype="float32")
    k, m = len(PACKS), sum(len(p) for p in PACKS)
    total = 0.0
    for pack in PACKS:
        mb = collate([samples[i] for i in pack], "pack", "sample", None)
        mb.tensors["weights"] = mb.tensors["weights"] * step_scale("sample", k, m, 0)
        total = total + weighted_loss_sum(model, mb.tensors, chunk_tokens=16) / k
    total.backward()
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))


def _ds_step(model_path: str, tokenizer, zero_stage: int, world: int, rank: int, sp: int, told_sp: bool) -> float:
    import deepspeed

    from ctxforge.train.batching import collate
    from ctxforge.train.config import RuntimeConfig, StageConfig
    from ctxforge.train.deepspeed_setup import backward_scale, build_engine, ds_config, lr_lambda
    from ctxforge.train.loss import step_counts, step_scale
    from ctxforge.train.model import load_stage_model
    from ctxforge.train.rope import RopeConfig
    from ctxforge.train.sequence_parallel import DOC_SDPA, ParallelLayout, enable_ulysses, pad_to_multiple, shard_sequence

    layout = ParallelLayout.build(world, rank, sp)
    grad_accum = len(PACKS) // layout.dp_degree
    stage = StageConfig(name="g", max_seq_len=4096, workers=world, sp_degree=sp, grad_accum=grad_accum,
                        max_grad_norm=1e6, lr=1e-9, schedule="constant")  # clipping never fires; norm still computed
    runtime = RuntimeConfig(device="cpu", dtype="float32", zero_stage=zero_stage)
    lm = load_stage_model(model_path, RopeConfig(), 4096, DOC_SDPA, dtype="float32")
    mpu = enable_ulysses(lm, sp, DOC_SDPA)
    if told_sp:  # the old wiring: DeepSpeed told about SP
        cfg = {**ds_config(stage, runtime, torch.device("cpu"), 1), "sequence_parallel_size": sp}
        from ctxforge.train.deepspeed_setup import StageLossModel

        wrapped = StageLossModel(lm, runtime.loss_chunk_tokens)
        engine, *_ = deepspeed.initialize(
            model=wrapped, model_parameters=list(wrapped.parameters()), config=cfg, mpu=mpu,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(stage, 1)))
    else:
        engine, _ = build_engine(lm, stage, runtime, torch.device("cpu"), 1, 1)
    samples = _samples(tokenizer)
    mine = [PACKS[(j * layout.dp_degree) + layout.dp_rank] for j in range(grad_accum)]
    batches = [collate([samples[i] for i in pack], "pack", "sample", None) for pack in mine]
    k, m, t, _ = step_counts(len(batches), sum(b.num_samples for b in batches), sum(b.num_targets for b in batches), sp)
    scale = step_scale("sample", k, m, t)
    for mb in batches:
        tensors = pad_to_multiple(mb.tensors, sp, None)
        tensors["weights"] = tensors["weights"] * scale
        loss = engine(**shard_sequence(tensors, layout.sp_rank, sp))
        engine.backward(loss * backward_scale(sp))
        engine.step()
    norm = engine.get_global_grad_norm()
    engine.destroy()
    return float(norm)


def worker(rank: int, world: int, port: int, model_path: str, out_dir: str, sp: int, zero_stages: list[int],
           told_sp: tuple[int, ...] = ()) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import deepspeed

    from ctxforge.models import load_tokenizer

    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = load_tokenizer(model_path)
    ref = reference_norm(model_path, tokenizer)
    result = {"reference": ref}
    for stage in zero_stages:
        result[f"zero{stage}"] = _ds_step(model_path, tokenizer, stage, world, rank, sp, False) / ref
    # Last: an engine given an mpu leaves it in DeepSpeed's global groups state (check_flat_world would refuse
    # every later engine of this process).
    for stage in told_sp:
        result[f"zero{stage}_told_sp"] = _ds_step(model_path, tokenizer, stage, world, rank, sp, True) / ref
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
    import torch.distributed as dist

    dist.destroy_process_group()


def run(world: int, sp: int, zero_stages: list[int], model_path: str, out_dir: str, port: int,
        told_sp: tuple[int, ...] = ()) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, port, model_path, out_dir, sp, zero_stages, told_sp), nprocs=world, join=True)
    return [json.loads(open(os.path.join(out_dir, f"rank{r}.json")).read()) for r in range(world)]

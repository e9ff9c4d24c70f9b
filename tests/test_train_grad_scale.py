"""The step's gradient through DeepSpeed's own reduction equals one process's, for every ZeRO path and layout.

See tests/grad_scale_worker.py: one optimizer step of the loop's step code (K/M all-reduce, padding with
pad_token_id None, contiguous SP shards, `backward_scale`) under `build_engine`, and DeepSpeed's
`get_global_grad_norm()` divided by the 2-norm of the same LongAlign-weighted loss's gradient computed in
one process on the full sequences. Told about SP, DeepSpeed 0.19.8 gave 2.0 under ZeRO-2 (ZeRO-3: 1.0);
the negative control below shows that wiring still fails here.
"""

from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp
from grad_scale_worker import run
from ports import free_port


def test_dp1_sp2_zero2_and_zero3_give_the_single_process_gradient(tiny_model_path, tmp_path):
    results = run(2, 2, [2, 3], tiny_model_path, str(tmp_path), free_port(), told_sp=(2,))
    for res in results:
        assert res["zero2"] == pytest.approx(1.0, abs=1e-5)
        assert res["zero3"] == pytest.approx(1.0, abs=1e-5)
        # Negative control: DeepSpeed told about SP (the earlier wiring) sums ZeRO-2 gradients over SP ranks.
        assert res["zero2_told_sp"] == pytest.approx(2.0, abs=1e-4)


@pytest.mark.slow
def test_dp2_sp2_zero2_and_zero3_give_the_single_process_gradient(tiny_model_path, tmp_path):
    results = run(4, 2, [2, 3], tiny_model_path, str(tmp_path), free_port())
    for res in results:
        assert res["zero2"] == pytest.approx(1.0, abs=1e-5)
        assert res["zero3"] == pytest.approx(1.0, abs=1e-5)


def _counts_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    from ctxforge.train.loss import step_counts

    dist.init_process_group("gloo")
    local_samples = [1, 3][rank]  # rank 0 packed 1 sample, rank 1 packed 3 (one pack each)
    k, m, t, r = step_counts(1, local_samples, 10 * local_samples, sp_degree=1, extra=100 + rank)
    with open(os.path.join(out, f"{rank}.txt"), "w") as fh:
        fh.write(f"{k} {m} {t} {r}")
    dist.destroy_process_group()


def test_step_counts_are_summed_over_ranks(tmp_path):
    """2 ranks with 1 and 3 samples: (K, M) = (2, 4) on both (the all-reduce LongAlign's weights need)."""
    mp.spawn(_counts_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        k, m, t, r = map(int, (tmp_path / f"{rank}.txt").read_text().split())
        assert (k, m, t, r) == (2, 4, 40, 201)


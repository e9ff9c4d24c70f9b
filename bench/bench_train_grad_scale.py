"""Gradient-norm ratio per ZeRO stage and layout: DeepSpeed's reduced gradient vs one process's (goal: 1.0).

One optimizer step of the training loop's own step code (tests/grad_scale_worker.py) on the tiny model,
gloo on CPU: dp1 x sp2 (2 processes, grad_accum 2) and dp2 x sp2 (4 processes). For each ZeRO stage,
`get_global_grad_norm()` / the 2-norm of the same LongAlign-weighted loss's gradient in one process on
the full sequences. Rows "ctxforge" use the trainer's wiring (DeepSpeed sees a flat world of all
ranks); rows "told SP" give DeepSpeed the SP mpu and `sequence_parallel_size` (the earlier wiring), whose
ZeRO-0/1/2 paths sum over SP ranks instead of averaging.

    .venv/bin/python bench/bench_train_grad_scale.py [--stages 0,1,2,3] [--layouts dp1xsp2,dp2xsp2] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from grad_scale_worker import run  # noqa: E402
from ports import free_port  # noqa: E402
from smoke_sizes import parse_args  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--layouts", default="dp1xsp2,dp2xsp2", help="dp1xsp2 (2 processes) and/or dp2xsp2 (4 processes)")
    args = parse_args(ap, {"stages": "2", "layouts": "dp1xsp2"})
    worlds = {"dp1xsp2": 2, "dp2xsp2": 4}
    layouts = args.layouts.split(",")
    for layout in layouts:
        if layout not in worlds:
            sys.exit(f"--layouts: {layout!r} is not one of {', '.join(worlds)}")
    from ctxforge.models import resolve_model_path

    stages = [int(s) for s in args.stages.split(",")]
    path = resolve_model_path("ctxforge:tiny")
    print(f"{'layout':<14} {'wiring':<9} " + " ".join(f"{'ZeRO-' + str(s):>8}" for s in stages))
    for layout in layouts:
        world, name = worlds[layout], layout.replace("x", " x ")
        with tempfile.TemporaryDirectory() as out:
            res = run(world, 2, stages, path, out, free_port(), told_sp=tuple(stages))
        for wiring, suffix in (("ctxforge", ""), ("told SP", "_told_sp")):
            ratios = [max(r[f"zero{s}{suffix}"] for r in res) for s in stages]
            print(f"{name:<14} {wiring:<9} " + " ".join(f"{x:8.4f}" for x in ratios))


if __name__ == "__main__":
    main()

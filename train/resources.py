"""Preflight: does the Ray cluster have what each stage's layout asks for?

Ray Train waits, without a word and without end, for a placement group the cluster cannot give. So before
the first stage the driver compares each remaining stage's need (workers x the resources of one worker) with
the cluster's totals. On an autoscaling cluster that has not yet started its GPU nodes the totals are short
at first: with `runtime.wait_for_resources_s` > 0 the driver asks the autoscaler for the largest stage's
bundles (`ray.autoscaler.sdk.request_resources`) and waits up to that long; then it fails with a line naming
the stage, its layout, what it needs and what the cluster has.

Stages run one after another, so the cluster needs the largest stage, not the sum. An SP group wider than the
largest node works but its all-to-all crosses nodes: that is a warning, not an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .config import StageConfig


class ResourceError(ValueError):
    """The cluster cannot hold a stage's layout; the message names the stage and the numbers."""


class ClusterView(Protocol):
    def totals(self) -> dict[str, float]: ...              # ray.cluster_resources()
    def node_gpus(self) -> list[float]: ...                # GPUs of each alive node
    def request(self, bundles: list[dict]) -> None: ...    # ask the autoscaler (an empty list clears the request)


class RayClusterView:
    """The live view of the connected Ray cluster."""

    def totals(self) -> dict[str, float]:
        import ray

        return dict(ray.cluster_resources())

    def node_gpus(self) -> list[float]:
        import ray

        return [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]

    def request(self, bundles: list[dict]) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)


@dataclass
class CapacityReport:
    needed: dict[str, float]                      # the largest stage's totals
    available: dict[str, float]
    waited_s: float = 0.0
    warnings: list[str] = field(default_factory=list)


def worker_resources(runtime, use_gpu: bool) -> dict[str, float]:
    """What one training worker asks Ray for: `runtime.cpus_per_worker` CPUs, one GPU on GPU, and the custom
    resources of `runtime.resources` (the training node type's, e.g. {"ctxforge_train": 1})."""
    return {"CPU": runtime.cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **runtime.resources}


def scaling_config(stage: StageConfig, per_worker: dict[str, float], use_gpu: bool):
    """Ray Train's ScalingConfig of a stage: `stage.workers` workers of `per_worker` resources each."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=stage.workers, use_gpu=use_gpu, resources_per_worker=dict(per_worker))


def stage_needs(stage: StageConfig, per_worker: dict[str, float]) -> dict[str, float]:
    return {k: v * stage.workers for k, v in per_worker.items() if v}


def _short(stage: StageConfig, per_worker: dict[str, float], totals: dict[str, float]) -> list[str]:
    return [f"{k} {need:g} (> {totals.get(k, 0.0):g})" for k, need in stage_needs(stage, per_worker).items()
            if need > totals.get(k, 0.0) + 1e-9]


def check_capacity(stages: list[StageConfig], per_worker: dict[str, float], view: ClusterView,
                   wait_s: float = 0.0, poll_s: float = 10.0, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> CapacityReport:
    """Raise ResourceError unless the cluster can place every stage of `stages` (one worker = `per_worker`
    resources, e.g. {"CPU": 8, "GPU": 1}), waiting up to `wait_s` seconds for an autoscaler."""
    if not stages:
        return CapacityReport({}, view.totals())
    largest = max(stages, key=lambda s: s.workers)
    totals = view.totals()
    start = clock()
    if any(_short(s, per_worker, totals) for s in stages) and wait_s > 0:
        view.request([dict(per_worker) for _ in range(largest.workers)])
        try:
            while any(_short(s, per_worker, totals) for s in stages) and clock() - start < wait_s:
                sleep(min(poll_s, max(0.0, wait_s - (clock() - start))))
                totals = view.totals()
        finally:
            view.request([])  # the placement group of the stage keeps the nodes from now on
    for s in stages:
        short = _short(s, per_worker, totals)
        if short:
            waited = f" after waiting {clock() - start:.0f} s for the autoscaler" if wait_s > 0 else ""
            have = ", ".join(f"{k} {totals.get(k, 0.0):g}" for k in per_worker if per_worker[k])
            custom = [k for k in per_worker if k not in ("CPU", "GPU") and per_worker[k]]
            custom_hint = (f"; the custom resource{'s' if len(custom) > 1 else ''} {', '.join(custom)} of "
                           f"runtime.resources must be provided by the training node type (cluster/aws.yaml: "
                           f"train_h100)" if any(k in short_k for k in custom for short_k in short) else "")
            raise ResourceError(
                f"stage {s.name}: workers {s.workers} (= dp {s.dp_degree} x sp {s.sp_degree}) x "
                f"{', '.join(f'{k} {v:g}' for k, v in per_worker.items() if v)} per worker needs {', '.join(short)}; "
                f"the cluster has {have}{waited}. Lower stages.N.workers (ctxforge plan --gpus N says which layout "
                f"fits), add nodes, or set runtime.wait_for_resources_s for an autoscaling cluster{custom_hint}")
    report = CapacityReport(stage_needs(largest, per_worker), totals, clock() - start)
    if per_worker.get("GPU"):
        widest = max(view.node_gpus() or [0.0])
        for s in stages:
            if s.sp_degree > widest:
                report.warnings.append(f"stage {s.name}: sp_degree {s.sp_degree} > {widest:g} GPUs on the largest node: "
                                       f"its Ulysses all-to-all crosses nodes (slower); ctxforge plan --gpus-per-node "
                                       f"{widest:g} shows layouts that stay within a node")
    return report

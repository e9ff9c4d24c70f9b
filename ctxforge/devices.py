"""Where engines run: the one answer to "is device auto cpu or cuda" for the generator and for serving, and
the preflight check that refuses cuda where no GPU can ever appear.

`resolve_device` is called by every engine that takes a `device` key resolved on the driver (generator
vllm, serve vllm); `check_gpu_reachable` by the generator's and serving's preflights (hf and vllm).
Neither imports vllm; ray and torch are imported only when `auto` or a GPU request needs them.
"""

from __future__ import annotations

from ctxforge.config import PreflightError


def resolve_device(device: str, accelerator_type: str | None = None) -> str:
    """'cpu' or 'cuda' for a config's `device` (auto / cpu / cuda), decided in this order:

    1. an explicit cpu or cuda wins;
    2. an `accelerator_type` (a GPU name Ray schedules on) means cuda;
    3. once Ray is up, Ray's cluster resources decide: the engines are Ray actors or Serve replicas, so
       only GPUs Ray offers can hold them. A GPU torch sees in this driver process but Ray does not list
       (e.g. hidden from Ray by its num_gpus=0) cannot be used; a CPU head node with GPU worker nodes
       serves on those GPUs although torch here sees none;
    4. before Ray is up (a preflight), torch: a local Ray started later lists the GPUs this machine has.
    """
    if device != "auto":
        return device
    if accelerator_type:
        return "cuda"
    import ray

    if ray.is_initialized():
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_can_appear(address: str | None = None) -> bool:
    """False only when no GPU can ever serve this run: its Ray cluster is (or will be) a local one started by
    this process, and that cluster (or, before it starts, this machine) has no GPU. A cluster this process
    connects to (`address`, RAY_ADDRESS, or one already connected) counts as able to grow one: an autoscaler
    may still start a GPU node for an engine that waits."""
    import ray

    from ctxforge import raycluster

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0 or not raycluster.started_here()
    if raycluster.cluster_address(address):
        return True
    import torch

    return torch.cuda.is_available()


def check_gpu_reachable(prefix: str, device: str, accelerator_type: str | None = None,
                        address: str | None = None, connect: str = "RAY_ADDRESS") -> None:
    """Refuse a GPU request no GPU can answer, before any engine loads.

    `prefix` is the keys' place in the config ("generator.", "serve.", "" for `ctxforge serve`); a GPU is
    requested by device=cuda, or by device=auto with an `accelerator_type`. `address` is the Ray address
    the run will use (None: RAY_ADDRESS, else a local cluster); `connect` names how a user points the run
    at a cluster. Raises PreflightError, one line naming the key, its value and what to use instead, when
    `gpu_can_appear(address)` is False.
    """
    if device == "cuda":
        setting, instead = f"{prefix}device=cuda", f"use {prefix}device=auto or cpu"
    elif device == "auto" and accelerator_type:
        setting = f"{prefix}accelerator_type={accelerator_type!r}"
        instead = f"leave {prefix}accelerator_type unset (device auto or cpu)"
    else:
        return
    if gpu_can_appear(address):
        return
    raise PreflightError(f"{setting}: no GPU can hold an engine here (the run starts its own local Ray cluster and "
                         f"this machine has no GPU); {instead}, or run on a Ray cluster with GPU nodes ({connect})")

"""Connect to Ray the same way for every stage: a cluster when one is named, else an embedded local one.

`ray job submit` sets RAY_ADDRESS for the job's driver, so the same command runs on a laptop and on a
cluster; only sizes and resources in the config change.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def cluster_address(address: str | None = None) -> str | None:
    """The address of the cluster init_ray(address) connects to: `address`, else RAY_ADDRESS; None (or
    "local") = init_ray starts an embedded local cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    return address if address and address != "local" else None


def started_here() -> bool:
    """True when Ray is up and this process started its head node (an embedded local cluster: nothing but
    this process can add a node to it); False when it connected to a cluster, or Ray is not up."""
    import ray

    # Ray has no public accessor for this; the driver's node object is a head node only when ray.init
    # started the cluster (it is a connect-only node when ray.init joined one, absent under Ray Client).
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(ray.is_initialized() and node is not None and node.is_head())


def init_ray(address: str | None = None, num_cpus: int | None = None, progress: bool = True) -> str:
    """Initialize Ray once; returns "cluster" or "local".

    When the CLI asked for a quiet console (ctxforge.console.quiet_ray), workers' output stays in Ray's
    log files instead of being streamed to this process.
    """
    import ray

    from ctxforge import console

    if not progress:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        return "existing"
    address = cluster_address(address)
    if address:
        context = ray.init(address=address, log_to_driver=not console.is_quiet())
        mode = "cluster"
    else:
        # A fresh embedded local Ray, even when a `ray start` cluster runs on this machine (a bare ray.init()
        # would attach to it and then refuse num_cpus); set runtime.address=auto or RAY_ADDRESS to use that one.
        # The dashboard is off: it costs seconds and memory on a laptop.
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                           log_to_driver=not console.is_quiet())
        mode = "local"
    if console.is_quiet():
        console.attach_driver_log(context.address_info["session_dir"])
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    log.info("Ray %s: %s", mode, ray.cluster_resources())
    return mode

"""Starting or joining Ray with a CPU budget that leaves Ray Data room to run."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster, or start a local Ray with more logical CPUs than cores.

    With exactly as many logical CPUs as cores, Train workers can take them all and Ray Data
    tasks that feed them never get scheduled (training hangs, backpressured). A local Ray
    therefore declares twice the cores by default.

    Args:
        address: Cluster address (``"auto"``, ``ray://...``); ``None`` uses ``RAY_ADDRESS`` if
            set (as under ``ray job submit``), else starts a local instance.
        num_cpus: Logical CPUs of a local instance; default ``2 * os.cpu_count()``.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = num_cpus or 2 * (os.cpu_count() or 1)
        ray.init(num_cpus=cpus, log_to_driver=True)
    quiet_data_progress()
    log.info("ray: %s", ray.cluster_resources())


def quiet_data_progress() -> None:
    """Turn off Ray Data's per-operator progress bars; medcae logs throughput and ETA itself."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False


def local_train_worker_pids(root_pid: int | None = None) -> list[int]:
    """PIDs of Ray Train worker processes (``ray::RayTrainWorker``) started under ``root_pid``.

    For operators and tests on a local Ray (the driver that called ``ray.init`` is the root of
    its raylet and workers); needs no dashboard or state API.
    """
    import psutil

    root = psutil.Process(root_pid or os.getpid())
    pids = []
    for proc in root.children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(pids)

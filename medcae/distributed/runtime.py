"""Starting or joining Ray with a CPU budget that leaves Ray Data room to run."""

from __future__ import annotations

import logging
import os
import time

import ray

from medcae.config import ConfigError

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
    res = ray.cluster_resources()
    log.info(
        "ray: %d node(s), %g CPUs, %g GPUs, object store %.1f GB",
        len(_node_resources()),
        res.get("CPU", 0),
        res.get("GPU", 0),
        res.get("object_store_memory", 0) / 1e9,
    )


def shutdown_ray(grace_s: float = 10.0) -> list[str]:
    """``ray.shutdown()``, then make sure no process of a local Ray this driver started
    outlives it: whatever of its process tree (GCS, raylet, workers, actors such as Ray
    Train's controller) is still running ``grace_s`` later is terminated, then killed.

    Connected to a cluster it did not start, the driver has no such children and nothing is
    touched. Returns the names of the processes it had to stop (logged as a warning).
    """
    import psutil

    try:
        tree = psutil.Process().children(recursive=True)
    except psutil.Error:
        tree = []
    ray.shutdown()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    names = []
    for proc in alive:
        try:
            names.append(f"{proc.pid} {proc.name()}")
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    if names:
        log.warning("stopped %d Ray process(es) left after shutdown: %s", len(names), names)
    return names


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


# --------------------------------------------------------------------------- resources

PLACEMENT_TIMEOUT_ENV = "MEDCAE_PLACEMENT_TIMEOUT_S"


class PlacementError(ConfigError):
    """A stage asks for more of a resource than the cluster's nodes offer (a user error:
    the flags ask too much)."""


def _node_resources() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def stage_threads(actors: int) -> int:
    """CPUs per backbone actor: the largest node's CPUs (at most this machine's cores)
    shared by the actors, at least one."""
    largest = max((r.get("CPU", 0.0) for r in _node_resources()), default=1.0)
    return max(1, int(min(largest, os.cpu_count() or 1)) // max(1, actors))


def require_placeable(
    request: dict[str, float], what: str, timeout_s: float | None = None, count: int = 1
) -> None:
    """Wait until ``count`` bundles of ``request`` fit the cluster's nodes, or fail clearly.

    An autoscaling cluster may add the nodes while this waits; a fixed one fails after
    ``timeout_s`` (default ``$MEDCAE_PLACEMENT_TIMEOUT_S`` or 300 s; 0 when the cluster
    cannot autoscale, i.e. a local Ray).

    Raises:
        PlacementError: Naming the resource, what was asked, and the largest node's offer.
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get(PLACEMENT_TIMEOUT_ENV, 300 if _autoscaling() else 0))
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = _node_resources()
        short = _shortfall(request, nodes, count)
        if short is None:
            return
        if time.monotonic() >= deadline:
            name, need, best = short
            raise PlacementError(
                f"{what} needs {need:g} {name} on one node (x{count}), but the cluster's largest "
                f"node offers {best:g} {name} (nodes: "
                f"{[{k: v for k, v in r.items() if k in ('CPU', 'GPU')} for r in nodes]}); "
                "lower the request or add nodes"
            )
        time.sleep(2.0)


def _shortfall(
    request: dict[str, float], nodes: list[dict[str, float]], count: int
) -> tuple[str, float, float] | None:
    """The first resource that ``count`` bundles cannot get, or None if they all fit."""
    fits = sum(
        min(int(r.get(k, 0.0) // v) if v > 0 else count for k, v in request.items()) for r in nodes
    )
    if fits >= count:
        return None
    for name, need in request.items():
        best = max((r.get(name, 0.0) for r in nodes), default=0.0)
        if best < need or sum(r.get(name, 0.0) for r in nodes) < need * count:
            return name, need, best
    name, need = next(iter(request.items()))
    return name, need, max((r.get(name, 0.0) for r in nodes), default=0.0)


def _autoscaling() -> bool:
    """Whether the cluster runs an autoscaler (a launcher, KubeRay or Slurm-less cloud)."""
    return bool(os.environ.get("RAY_AUTOSCALER") or os.environ.get("KUBERAY_GEN_RAY_START_CMD"))


# --------------------------------------------------------------------------- progress

progress_log = logging.getLogger("medcae.progress")


@ray.remote(num_cpus=0)
class _Counter:
    def __init__(self) -> None:
        self.n = 0

    def add(self, k: int) -> None:
        self.n += k

    def get(self) -> int:
        return self.n


class Progress:
    """One console line per stage every ``every`` seconds: done/total, rate, ETA.

    Stages running in Ray tasks count through :meth:`counter` (a pass-through
    ``map_batches`` function); the driver thread reads the count and logs.
    """

    def __init__(self, stage: str, total: int, unit: str = "rows", every: float = 10.0):
        import threading

        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.start = time.perf_counter()
        self._actor = _Counter.remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def counter(self):
        """A ``map_batches`` function that counts rows and returns the batch unchanged."""
        actor = self._actor

        def count(batch: dict) -> dict:
            actor.add.remote(len(next(iter(batch.values()))) if batch else 0)
            return batch

        return count

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                done = ray.get(self._actor.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - progress must never break the job
                continue
            secs = time.perf_counter() - self.start
            rate = done / max(secs, 1e-9)
            eta = f"{(self.total - done) / rate:.0f}s" if rate > 0 else "?"
            progress_log.info(
                "%s: %d/%d %s, %.1f %s/s, ETA %s",
                self.stage,
                done,
                self.total,
                self.unit,
                rate,
                self.unit,
                eta,
            )

    def stop(self) -> None:
        """Stop the ticker and its counter (also when the stage failed)."""
        if not self._stop.is_set():
            self._stop.set()
            ray.kill(self._actor)

    def done(self, message: str) -> None:
        """Stop the ticker and log the stage's final line."""
        self.stop()
        progress_log.info("%s: %s", self.stage, message)

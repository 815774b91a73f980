"""Start and stop real local Ray nodes for cluster tests, without touching anyone else's Ray.

Each node is a ``ray start --block`` subprocess in its own session, with its own temp dir, its
own free ports and token authentication; the dashboard listens on 127.0.0.1 (Ray replaces a
``--node-ip-address`` of 127.0.0.1 by the host's address for everything else). Stopping a node
sends SIGTERM to that process (which tears its node down), then SIGKILL to whatever is left in
its process group or names its temp dir. Never ``ray stop``: it kills every Ray of this user.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from helpers import ROOT

RAY = str(Path(sys.executable).with_name("ray"))
HOST = "127.0.0.1"
WORKER_PORTS = 40  # per node: enough for a few Train workers and Ray Data tasks


def short_temp_dir(prefix: str = "rt-") -> Path:
    """A fresh short dir under /tmp (Ray's unix socket paths must stay under 107 chars)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def new_token() -> str:
    """A fresh random cluster token."""
    return secrets.token_hex(32)


def node_env(token: str | None = None) -> dict[str, str]:
    """This process's env without any ``RAY_*`` variable (a test's own Ray must not leak in),
    plus token auth with ``token`` and no drain wait on SIGTERM (Ray 2.60's ``ray start
    --block`` otherwise drains for up to 30 s before it stops)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", RAY_USAGE_STATS_ENABLED="0")
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` on any address (binding the wildcard address fails then)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free now (chosen by the kernel)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def free_port_range(size: int, low: int = 20000, high: int = 32000) -> int:
    """First port of ``size`` consecutive free ports in ``[low, high)`` (below the ephemeral
    range, so outgoing connections do not grab them)."""
    for _ in range(200):
        start = random.randrange(low, high - size)
        if all(port_free(p) for p in range(start, start + size)):
            return start
    raise RuntimeError(f"no {size} consecutive free ports in [{low}, {high})")


@dataclass
class RayNode:
    """One ``ray start --block`` subprocess and what it was given."""

    proc: subprocess.Popen
    temp_dir: Path
    ports: dict[str, int]
    log: Path
    head: bool

    @property
    def gcs_address(self) -> str:
        return f"{HOST}:{self.ports['port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ports['dashboard-port']}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _node_ports(head: bool) -> dict[str, int]:
    names = [
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    ]
    if head:
        names += ["port", "dashboard-port", "ray-client-server-port"]
    ports = dict(zip(names, free_ports(len(names))))
    ports["min-worker-port"] = free_port_range(WORKER_PORTS)
    ports["max-worker-port"] = ports["min-worker-port"] + WORKER_PORTS - 1
    return ports


def start_node(
    token: str,
    temp_dir: Path,
    log: Path,
    head_address: str | None = None,
    num_cpus: int = 2,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
) -> RayNode:
    """Start a head (``head_address`` None, with the dashboard) or a worker node; returns at once.

    Use :func:`wait_for_gcs` / :func:`wait_for_nodes` to know when it is up.
    """
    head = head_address is None
    ports = _node_ports(head)
    args = [RAY, "start", "--block", f"--node-ip-address={HOST}", f"--temp-dir={temp_dir}"]
    args += [f"--num-cpus={num_cpus}", "--disable-usage-stats", "--log-style=record"]
    args += [f"--{k}={v}" for k, v in ports.items()]
    if head:
        args += ["--head", "--include-dashboard=true", f"--dashboard-host={HOST}"]
    else:
        # Ray 2.60 aborts a worker given --include-dashboard (a head-only flag); workers never
        # run the dashboard, only its per-node agent.
        args.append(f"--address={head_address}")
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or node_env(token),
            cwd=ROOT,
            start_new_session=True,
        )
    return RayNode(proc, temp_dir, ports, log, head)


def _procs() -> Iterator[tuple[int, int, str, bytes]]:
    """(pid, process group, state, command line) of every live process but this one."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(") ", 1)[1].split()
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if stat[0] != "Z":
            yield int(d.name), int(stat[2]), stat[0], cmd


def ray_pids(temp_dir: Path) -> list[int]:
    """Pids of live processes whose command line names ``temp_dir`` (this node's processes)."""
    needle = str(temp_dir).encode()
    return [pid for pid, _, _, cmd in _procs() if needle in cmd]


def group_or_dir_pids(pgid: int, temp_dir: Path | str) -> list[int]:
    """Pids still in process group ``pgid`` or naming ``temp_dir`` (some Ray processes rename
    themselves, e.g. ``ray::DashboardAgent``, so the temp dir alone misses them)."""
    needle = str(temp_dir).encode()
    return [pid for pid, group, _, cmd in _procs() if group == pgid or needle in cmd]


def wait_gone(pgid: int, temp_dir: Path | str, timeout: float = 15.0) -> dict[int, str]:
    """Wait up to ``timeout`` for :func:`group_or_dir_pids` to be empty; returns what is left,
    pid to command line (processes may take a moment to exit after their parent)."""
    deadline = time.monotonic() + timeout
    while (pids := group_or_dir_pids(pgid, temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {}
    for pid in pids:
        try:
            left[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            pass
    return left


def node_pids(node: RayNode) -> list[int]:
    """What is left of ``node``: its process group and anything naming its temp dir."""
    return group_or_dir_pids(node.proc.pid, node.temp_dir)


def stop_node(node: RayNode, timeout: float = 30.0) -> None:
    """SIGTERM the ``ray start --block`` process, then SIGKILL whatever of the node is left."""
    if node.proc.poll() is None:
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    for pid in node_pids(node):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    node.proc.wait(10)
    deadline = time.monotonic() + 10
    while node_pids(node) and time.monotonic() < deadline:
        time.sleep(0.2)


def dashboard_get(url: str, token: str | None, timeout: float = 10.0) -> dict:
    """GET a dashboard JSON endpoint with the bearer token (none when ``token`` is None)."""
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def alive_node_ids(dashboard_url: str, token: str) -> list[str]:
    """Hex ids of the cluster's alive nodes, from the state API."""
    body = dashboard_get(f"{dashboard_url}/api/v0/nodes?limit=100", token)
    nodes = body["data"]["result"]["result"]
    return [n["node_id"] for n in nodes if n["state"] == "ALIVE"]


def wait_for_nodes(node: RayNode, token: str, n: int, timeout: float = 120.0) -> list[str]:
    """Poll the head's state API until ``n`` nodes are alive; return their ids."""
    deadline, last = time.monotonic() + timeout, "no answer yet"
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise RuntimeError(f"head exited ({node.proc.returncode}):\n{node.log_tail()}")
        try:
            ids = alive_node_ids(node.dashboard_url, token)
            if len(ids) >= n:
                return ids
            last = f"{len(ids)} alive"
        except (OSError, urllib.error.URLError, KeyError, ValueError) as e:
            last = repr(e)
        time.sleep(1.0)
    raise TimeoutError(f"{n} nodes not alive after {timeout:.0f}s ({last}):\n{node.log_tail()}")


@dataclass
class LocalCluster:
    """A head and workers started by :func:`local_cluster`."""

    token: str
    head: RayNode
    workers: list[RayNode] = field(default_factory=list)
    node_ids: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> list[RayNode]:
        return [self.head, *self.workers]


#: Restarts allowed, per cluster, of a node whose ``ray start`` gave up: Ray waits a fixed 30 s
#: for a raylet to register, which a loaded 2-core machine can exceed, and a port picked free
#: can be taken before Ray binds it. Each restart picks fresh ports.
NODE_RESTARTS = 2


def _wait_restarting_workers(
    nodes: list[RayNode],
    token: str,
    worker_resources: list[dict[str, float]],
    num_cpus: int,
    timeout: float,
) -> list[str]:
    """Wait until every node of ``nodes`` (head first) is alive; a worker whose ``ray start``
    exited is stopped and started again (at most :data:`NODE_RESTARTS` times), in place."""
    head, deadline, restarts = nodes[0], time.monotonic() + timeout, 0
    while True:
        try:
            return wait_for_nodes(head, token, len(nodes), min(10.0, timeout))
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
        for k in range(1, len(nodes)):
            node = nodes[k]
            if node.proc.poll() is None or restarts >= NODE_RESTARTS:
                continue
            restarts += 1
            stop_node(node)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
            log = node.log.with_name(f"{node.log.stem}.restart{restarts}.log")
            nodes[k] = start_node(
                token, short_temp_dir(), log, head.gcs_address, num_cpus, worker_resources[k - 1]
            )


def _start_head(token: str, log_dir: Path, num_cpus: int, timeout: float) -> RayNode:
    """A head node that is up. Its ports were free when picked but not held until Ray binds
    them: a head that exits while starting (a port taken in between, or Ray's raylet timeout)
    is started again on fresh ports, at most :data:`NODE_RESTARTS` times."""
    for attempt in range(NODE_RESTARTS + 1):
        log = log_dir / ("head.log" if attempt == 0 else f"head.restart{attempt}.log")
        head = start_node(token, short_temp_dir(), log, num_cpus=num_cpus)
        try:
            wait_for_nodes(head, token, 1, timeout)
            return head
        except RuntimeError:  # the head exited
            stop_node(head)
            shutil.rmtree(head.temp_dir, ignore_errors=True)
            if attempt == NODE_RESTARTS:
                raise
    raise AssertionError("unreachable")


@contextmanager
def local_cluster(
    log_dir: Path,
    worker_resources: list[dict[str, float]],
    num_cpus: int = 2,
    timeout: float = 180.0,
) -> Iterator[LocalCluster]:
    """A head plus one worker node per entry of ``worker_resources``, all local with a fresh
    token and node logs in ``log_dir``; every node is stopped and its temp dir removed on exit,
    also when the body raises."""
    token = new_token()
    nodes: list[RayNode] = []
    try:
        head = _start_head(token, log_dir, num_cpus, timeout)
        nodes.append(head)
        for i, res in enumerate(worker_resources, 1):
            log = log_dir / f"worker{i}.log"
            nodes.append(start_node(token, short_temp_dir(), log, head.gcs_address, num_cpus, res))
        ids = _wait_restarting_workers(nodes, token, worker_resources, num_cpus, timeout)
        yield LocalCluster(token, head, nodes[1:], ids)
    finally:
        left = []
        for node in reversed(nodes):
            stop_node(node)
            left += node_pids(node)
            if not left:
                shutil.rmtree(node.temp_dir, ignore_errors=True)
        if left:
            raise RuntimeError(f"Ray processes still running after SIGKILL: {left}")

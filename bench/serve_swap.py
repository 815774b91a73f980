"""A promotion, and a replica SIGKILLed, under load: what clients see.

Starts `medcae serve --model bench@champion` as a user would (its own local Ray), with a
throw-away registry holding the bundle as versions 1 and 2, and runs clients without pause:

- swap: at ``--event-at`` seconds version 2 is promoted; prints requests, failures, the time
  from the promotion to the first answer from version 2, whether any request sent after that
  got version 1, and the latency before, during and after.
- kill: two replicas; at ``--event-at`` seconds one replica process is SIGKILLed; prints the
  requests that failed and the seconds until every client is answered again.

    python bench/serve_swap.py --bundle runs/demo/bundle [--clients 32] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from serve_load import free_port, sample_pngs, wait_healthy  # noqa: E402

from medcae.registry.models import Registry  # noqa: E402


def clients(url: str, blobs: list[bytes], n: int, seconds: float, event, at: float) -> dict:
    """``n`` clients posting without pause for ``seconds``; ``event()`` runs at ``at`` s."""
    log: list[tuple[float, float, object, str | None]] = []
    stop = threading.Event()
    start = time.monotonic()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            k = i
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/predict", content=blobs[k % len(blobs)])
                    code = r.status_code
                    version = r.json().get("version") if code == 200 else None
                except (httpx.HTTPError, ValueError) as err:
                    code, version = type(err).__name__, None
                log.append((t0 - start, time.monotonic() - start, code, version))
                k += n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(at)
    event_at = time.monotonic() - start
    event()
    time.sleep(max(0.0, seconds - at))
    stop.set()
    for t in threads:
        t.join(120)
    return {"log": log, "event_at": event_at}


def lat_ms(rows) -> str:
    if not rows:
        return "n/a"
    lat = np.array([end - s for s, end, *_ in rows]) * 1000
    return f"p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms"


@contextmanager
def served(uri: str, replicas: int, env: dict) -> Iterator[str]:
    """`medcae serve --model bench@champion` on a free port until the block ends; its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "medcae", "serve", "--model", "bench@champion"]
    cmd += ["--mlflow", uri, "--port", str(port), "--replicas", str(replicas), "--follow-s", "2"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 300)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--event-at", type=float, default=20)
    p.add_argument("--only", choices=["swap", "kill"], default=None)
    a = p.parse_args()
    blobs = sample_pngs()
    with tempfile.TemporaryDirectory(prefix="medcae-swap-") as tmp:
        uri = f"sqlite:///{tmp}/mlruns.db"
        registry = Registry(uri)
        registry.register("bench", a.bundle)
        registry.register("bench", a.bundle)
        registry.promote("bench", "1")
        env = {**os.environ, "MEDCAE_CACHE_DIR": f"{tmp}/cache", "RAY_TMPDIR": tmp}
        if a.only in (None, "swap"):
            with served(uri, 1, env) as url:
                promote = lambda: registry.promote("bench", "2")  # noqa: E731
                got = clients(url, blobs, a.clients, a.seconds, promote, a.event_at)
            log, at = got["log"], got["event_at"]
            failed = [r for r in log if r[2] != 200]
            new = [end for _, end, _, v in log if v == "2"]
            swapped = min(new) if new else float("nan")
            stale = [r for r in log if r[0] > swapped and r[3] != "2"]
            print(
                f"swap: {len(log)} requests from {a.clients} clients in {a.seconds:.0f}s, "
                f"{len(failed)} failed, {len(stale)} sent after the swap answered by the old "
                f"version; promotion -> first answer from version 2: {swapped - at:.1f}s"
            )
            print(f"  latency before: {lat_ms([r for r in log if r[1] < at])}")
            print(f"  during the swap: {lat_ms([r for r in log if at <= r[1] <= swapped])}")
            print(f"  after: {lat_ms([r for r in log if r[0] > swapped])}")
        if a.only in (None, "kill"):
            with served(uri, 2, env) as url:
                pids = set()
                deadline = time.monotonic() + 60
                while len(pids) < 2 and time.monotonic() < deadline:
                    pids.add(httpx.get(f"{url}/v1/model", timeout=10).json()["pid"])
                victim = sorted(pids)[0]
                kill = lambda: os.kill(victim, signal.SIGKILL)  # noqa: E731
                got = clients(url, blobs, a.clients, a.seconds, kill, a.event_at)
            log, at = got["log"], got["event_at"]
            failed = [r for r in log if r[2] != 200]
            last_fail = max((r[1] for r in failed), default=at)
            print(
                f"kill: {len(log)} requests from {a.clients} clients, 2 replicas, one SIGKILLed "
                f"at {at:.0f}s: {len(failed)} failed ({sorted({str(r[2]) for r in failed})}), "
                f"last failure {last_fail - at:.1f}s after the kill"
            )
            print(f"  latency before: {lat_ms([r for r in log if r[1] < at])}")
            print(f"  after: {lat_ms([r for r in log if r[0] > last_fail])}")


if __name__ == "__main__":
    main()

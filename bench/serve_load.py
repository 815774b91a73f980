"""Serving load test on loopback: Ray Serve (batching on / off) vs a plain FastAPI + uvicorn
process running the same Predictor, all in one run.

For each server and concurrency (1, 8, 32) it sends a bounded number of PNG requests and prints
requests/s and p50/p95/p99 latency.

    python bench/serve_load.py --bundle runs/demo/bundle [--requests 200] [--max-seconds 120]
"""

from __future__ import annotations

import argparse
import io
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_pngs(n: int = 32) -> list[bytes]:
    from medcae.data import load_dataset

    images = load_dataset("demo").splits["test"].images[:n]
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not become healthy")


def load(url: str, blobs: list[bytes], concurrency: int, requests: int, max_s: float) -> dict:
    """Send ``requests`` requests from ``concurrency`` threads; stop early after ``max_s``."""
    deadline = time.perf_counter() + max_s
    per = requests // concurrency

    def worker(i: int) -> list[tuple[float, int]]:
        out = []
        with httpx.Client(base_url=url, timeout=60) as c:
            for k in range(per):
                if time.perf_counter() > deadline:
                    break
                t = time.perf_counter()
                try:
                    code = c.post("/v1/predict", content=blobs[(i + k) % len(blobs)]).status_code
                except httpx.HTTPError:
                    code = -1  # a refused or dropped connection: an error, not the end of the run
                out.append((time.perf_counter() - t, code))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = [r for rs in pool.map(worker, range(concurrency)) for r in rs]
    wall = time.perf_counter() - start
    lat = np.array([r[0] for r in res]) * 1000
    errors = sum(1 for r in res if r[1] != 200)
    return {
        "n": len(res),
        "rps": len(res) / wall,
        "p50": np.percentile(lat, 50),
        "p95": np.percentile(lat, 95),
        "p99": np.percentile(lat, 99),
        "errors": errors,
    }


def run_serve(bundle: str, batch: int, port: int, threads: int, runtime: str) -> str:
    from ray import serve

    from medcae.serving.app import build_app

    serve.run(
        build_app(
            {
                "bundle": bundle,
                "max_batch_size": batch,
                "batch_wait_timeout_s": 0.01 if batch > 1 else 0.0,
                "threads": threads,
                "runtime": runtime,
            }
        ),
        name="medcae",
        route_prefix="/",
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="runs/demo/bundle")
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--max-seconds", type=float, default=90)
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of the Serve replica; 0 = Ray's default (its num_cpus, 1). On 2 "
        "cores, 2 threads oversubscribe next to the proxy and the load generator",
    )
    p.add_argument(
        "--runtime", default="auto", choices=["auto", "torch", "onnxruntime", "openvino"]
    )
    a = p.parse_args()
    import ray
    from ray import serve

    bundle = str(Path(a.bundle).resolve())
    blobs = sample_pngs()
    levels = [int(c) for c in a.concurrency.split(",")]
    rows = []
    base_port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medcae.serving.baseline",
            "--bundle",
            bundle,
            "--port",
            str(base_port),
            "--runtime",
            a.runtime,
        ]
    )
    try:
        url = f"http://127.0.0.1:{base_port}"
        wait_healthy(url)
        rows += [
            ("FastAPI+uvicorn (1 process)", c, load(url, blobs, c, a.requests, a.max_seconds))
            for c in levels
        ]
    finally:
        proc.terminate()
        proc.wait(30)
    ray.init(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for label, batch in (("Ray Serve, batching 16", 16), ("Ray Serve, no batching", 1)):
        url = run_serve(bundle, batch, port, a.threads, a.runtime)
        rows += [(label, c, load(url, blobs, c, a.requests, a.max_seconds)) for c in levels]
    serve.shutdown()
    ray.shutdown()
    print(
        f"\n{'server':30s} {'conc':>4s} {'n':>5s} {'req/s':>7s} {'p50 ms':>8s} {'p95 ms':>8s} "
        f"{'p99 ms':>8s} {'errors':>6s}"
    )
    for label, c, r in rows:
        print(
            f"{label:30s} {c:4d} {r['n']:5d} {r['rps']:7.1f} {r['p50']:8.1f} {r['p95']:8.1f} "
            f"{r['p99']:8.1f} {r['errors']:6d}"
        )


if __name__ == "__main__":
    main()

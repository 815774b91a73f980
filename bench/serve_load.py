"""Serving load test on loopback, all in one run: a plain FastAPI + uvicorn process running the
same Predictor (the baseline), then Ray Serve with batching through each ingress asked for
(Serve's default Python proxy; HAProxy in front of replicas that serve HTTP themselves), with
one model or two multiplexed on one replica, and without batching.

For each server and concurrency it sends a bounded number of PNG requests and prints requests/s,
p50/p95/p99 latency and the ratio to the baseline at the same concurrency. Each Ray Serve
configuration runs in a child process of its own (the ingress is chosen by environment
variables read when Ray starts).

    python bench/serve_load.py --bundle runs/demo/bundle [--concurrency 1,8,32]
        [--ingress proxy,haproxy] [--requests 480] [--max-seconds 90]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
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


def load(
    url: str,
    blobs: list[bytes],
    concurrency: int,
    requests: int,
    max_s: float,
    paths: tuple[str, ...] = ("/v1/predict",),
) -> dict:
    """Send ``requests`` requests from ``concurrency`` threads, in turn to each of ``paths``;
    stop early after ``max_s``. Each thread opens its connection first (one ``/healthz``) and
    all start together, so the figures are the steady state, not 32 TCP handshakes at once."""
    deadline = time.perf_counter() + max_s
    per = requests // concurrency
    ready = threading.Barrier(concurrency)

    def worker(i: int) -> list[tuple[float, float, int]]:
        out = []
        with httpx.Client(base_url=url, timeout=60) as c:
            try:
                c.get("/healthz")
            except httpx.HTTPError:
                pass
            ready.wait()
            for k in range(per):
                if time.perf_counter() > deadline:
                    break
                t = time.perf_counter()
                path = paths[(i + k) % len(paths)]
                try:
                    code = c.post(path, content=blobs[(i + k) % len(blobs)]).status_code
                except httpx.HTTPError:
                    code = -1  # a refused or dropped connection: an error, not the end of the run
                out.append((t, time.perf_counter(), code))
        return out

    with ThreadPoolExecutor(concurrency) as pool:
        res = [r for rs in pool.map(worker, range(concurrency)) for r in rs]
    wall = max(r[1] for r in res) - min(r[0] for r in res)
    lat = np.array([r[1] - r[0] for r in res]) * 1000
    errors = sum(1 for r in res if r[2] != 200)
    return {
        "n": len(res),
        "rps": len(res) / wall,
        "p50": np.percentile(lat, 50),
        "p95": np.percentile(lat, 95),
        "p99": np.percentile(lat, 99),
        "errors": errors,
    }


INGRESS_ENV = {
    "proxy": {},
    "haproxy": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}


def serve_rows(a: argparse.Namespace, bundle: str, levels: list[int]) -> list:
    """In this (child) process: Ray Serve through ``a.ingress`` at each configuration."""
    import ray
    from ray import serve

    from medcae.serving.app import build_app

    blobs = sample_pngs()
    ray.init(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    one, two = ("/v1/predict",), ("/v1/models/a/predict", "/v1/models/b/predict")
    configs = [("batching 16", 16, [bundle], one)]
    if a.ingress == "proxy":  # the other comparisons once, through the default ingress
        configs += [
            ("batching 16, 2 models", 16, [f"a={bundle}", f"b={bundle}"], two),
            ("no batching", 1, [bundle], one),
        ]
    rows = []
    try:
        for label, batch, models, paths in configs:
            args = {
                "models": models,
                "max_batch_size": batch,
                "batch_wait_timeout_s": 0.01 if batch > 1 else 0.0,
                "threads": a.threads,
                "runtime": a.runtime,
            }
            serve.run(build_app(args), name="medcae", route_prefix="/")
            wait_healthy(url)
            for p in paths:  # every model loaded before the clock starts
                httpx.post(url + p, content=blobs[0], timeout=120).raise_for_status()
            name = f"Serve {a.ingress}, {label}"
            for c in levels:
                load(url, blobs, c, 4 * c, a.max_seconds, paths)  # warm-up, not counted
                rows.append((name, c, load(url, blobs, c, a.requests, a.max_seconds, paths)))
            serve.delete("medcae")
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="runs/demo/bundle")
    p.add_argument("--requests", type=int, default=480)
    p.add_argument("--max-seconds", type=float, default=90)
    p.add_argument("--concurrency", default="32")
    p.add_argument("--ingress", default="proxy,haproxy", help="proxy, haproxy, or both")
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
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    bundle = str(Path(a.bundle).resolve())
    levels = [int(c) for c in a.concurrency.split(",")]
    if a.child:  # one ingress, its rows as JSON on the last line
        rows = serve_rows(a, bundle, levels)
        print(
            "ROWS " + json.dumps([(n, c, {k: float(v) for k, v in r.items()}) for n, c, r in rows])
        )
        return
    blobs = sample_pngs()
    rows = []
    base_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcae.serving.baseline", "--bundle", bundle]
        + ["--port", str(base_port), "--runtime", a.runtime]
    )
    try:
        url = f"http://127.0.0.1:{base_port}"
        wait_healthy(url)
        for c in levels:
            load(url, blobs, c, 4 * c, a.max_seconds)  # warm-up, not counted
            rows.append(
                ("FastAPI+uvicorn (1 process)", c, load(url, blobs, c, a.requests, a.max_seconds))
            )
    finally:
        proc.terminate()
        proc.wait(30)
    for ingress in a.ingress.split(","):
        argv = [sys.executable, __file__, "--child", "--ingress", ingress, "--bundle", bundle]
        argv += ["--concurrency", a.concurrency, "--requests", str(a.requests)]
        argv += ["--max-seconds", str(a.max_seconds), "--threads", str(a.threads)]
        argv += ["--runtime", a.runtime]
        env = {**os.environ, **INGRESS_ENV[ingress]}
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
        last = [ln for ln in out.stdout.splitlines() if ln.startswith("ROWS ")]
        if out.returncode or not last:
            print(f"{ingress}: failed (exit {out.returncode})\n{out.stderr[-3000:]}")
            continue
        rows += [tuple(r) for r in json.loads(last[-1][5:])]
    baseline = {c: r["rps"] for n, c, r in rows if n.startswith("FastAPI")}
    print(
        f"\n{'server':38s} {'conc':>4s} {'n':>5s} {'req/s':>7s} {'x base':>6s} {'p50 ms':>8s} "
        f"{'p95 ms':>8s} {'p99 ms':>8s} {'errors':>6s}"
    )
    for label, c, r in rows:
        ratio = r["rps"] / baseline[c] if baseline.get(c) else float("nan")
        print(
            f"{label:38s} {c:4d} {int(r['n']):5d} {r['rps']:7.1f} {ratio:6.2f} {r['p50']:8.1f} "
            f"{r['p95']:8.1f} {r['p99']:8.1f} {int(r['errors']):6d}"
        )


if __name__ == "__main__":
    main()

"""Whole-archive predictions: ``medcae predict`` (Ray Data batch stage) against the same images
sent one per request to the Serve endpoint at concurrency 32, on the same machine, in one run.

Writes ``--images`` PNG files (default 20,000, cycling the PneumoniaMNIST splits when
``$MEDCAE_DATA_DIR`` holds them, else the built-in demo set) unless they are there, then runs,
one after the other so that none shares the cores with another:

1. ``medcae predict --bundle B --data PNGS --out preds.parquet`` as its own process;
2. ``medcae serve --bundle B`` as shipped (one replica of one CPU, batching 16), each PNG POSTed
   to ``/v1/predict`` by ``--concurrency`` client threads that hold the files in memory;
3. the same endpoint with ``--replicas`` replicas (default: one per core), so the endpoint has
   every core too.

For each: images, wall seconds, images/s, wall ms per image and machine core-ms per image (every
process's CPU time over the images; for the endpoint also without the load generator's own
CPU), and the speedup of ``medcae predict`` over each endpoint. The endpoint's probabilities are
checked against ``preds.parquet`` for every image both produced. Each endpoint run stops after
``--max-seconds``; its images/s is over the images it sent. The goal is a speedup of 3.

    python bench/predict_archive.py --bundle runs/demo/bundle [--images 20000]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from serve_load import free_port  # noqa: E402 - bench/ is the script's own folder

#: The issue's goal: ``medcae predict`` images/s over the endpoint's.
GOAL_SPEEDUP = 3.0


@dataclass
class Measured:
    """One way of predicting the archive."""

    name: str
    images: int
    seconds: float
    core_seconds: float
    client_core_seconds: float = 0.0
    errors: int = 0
    note: str = ""

    @property
    def rate(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def core_ms(self, without_client: bool = False) -> float:
        busy = self.core_seconds - (self.client_core_seconds if without_client else 0.0)
        return 1000 * busy / max(self.images, 1)


def busy_core_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (every process)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def write_pngs(root: Path, n: int) -> Path:
    """``n`` PNG files under ``root`` (1,000 per folder), cycling the data set's images."""
    from PIL import Image

    from medcae.data import load_dataset

    done = root / f".complete-{n}"
    if done.exists():
        return root
    name = "pneumoniamnist" if os.environ.get("MEDCAE_DATA_DIR") else "demo"
    ds = load_dataset(name)
    images = np.concatenate([ds.splits[s].images for s in ("train", "val", "test")])
    t0 = time.perf_counter()
    for i in range(n):
        folder = root / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(folder / f"{i:06d}.png")
        if (i + 1) % 5000 == 0:
            print(f"  wrote {i + 1}/{n} PNGs of {name} ({time.perf_counter() - t0:.0f}s)")
    done.touch()
    return root


def run_batch(bundle: str, pngs: Path, out: Path, extra: list[str]) -> tuple[Measured, Path]:
    """``medcae predict`` over the folder as its own process; wall time includes Ray's start."""
    parquet = out / "preds.parquet"
    cmd = [sys.executable, "-m", "medcae", "predict", "--bundle", bundle, "--data", str(pngs)]
    cmd += ["--out", str(parquet), *extra]
    print("$", " ".join(cmd), flush=True)
    c0, t0 = busy_core_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    secs, cores = time.perf_counter() - t0, busy_core_seconds() - c0
    if proc.returncode != 0:
        sys.exit(f"medcae predict failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    import pyarrow.parquet as pq

    rows = pq.read_metadata(parquet).num_rows
    stage = re.search(r"predicted \d+ of \d+ images in ([\d.]+)s", proc.stdout)
    note = f"Ray Data stages alone {float(stage.group(1)):.1f}s" if stage else ""
    return Measured("medcae predict (Ray Data)", rows, secs, cores, note=note), parquet


def start_server(bundle: str, port: int, replicas: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medcae", "serve", "--bundle", bundle, "--port", str(port)]
    cmd += ["--replicas", str(replicas)]
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"medcae serve exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                time.sleep(2)  # let every replica of the deployment finish starting
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(proc)
    sys.exit(f"medcae serve did not become healthy in 240s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM takes ``medcae serve``'s own way out (Serve and its Ray shut down)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_endpoint(
    name: str,
    bundle: str,
    files: list[Path],
    blobs: list[bytes],
    replicas: int,
    concurrency: int,
    max_s: float,
    log: Path,
) -> tuple[Measured, dict[str, dict[str, float]]]:
    """POST every PNG once from ``concurrency`` threads (stopping after ``max_s``)."""
    port = free_port()
    proc = start_server(bundle, port, replicas, log)
    url = f"http://127.0.0.1:{port}"
    got: dict[str, dict[str, float]] = {}
    errors = 0
    lock = threading.Lock()
    next_i = iter(range(len(blobs)))
    deadline = time.perf_counter() + max_s

    def worker(_: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                r = client.post("/v1/predict", content=blobs[i])
                with lock:
                    if r.status_code == 200:
                        got[str(files[i])] = r.json()["prediction"]["probabilities"]
                    else:
                        errors += 1

    me = psutil.Process()
    try:
        c0, t0, m0 = busy_core_seconds(), time.perf_counter(), sum(me.cpu_times()[:2])
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(worker, range(concurrency)))
        secs = time.perf_counter() - t0
        cores, client = busy_core_seconds() - c0, sum(me.cpu_times()[:2]) - m0
    finally:
        stop_server(proc)
    sent = len(got) + errors
    note = "" if sent == len(blobs) else f"stopped after {max_s:.0f}s: {sent} of {len(blobs)} sent"
    return Measured(name, len(got), secs, cores, client, errors, note), got


def agreement(parquet: Path, got: dict[str, dict[str, float]]) -> tuple[int, float]:
    """Images both ways predicted, and the largest probability difference among them."""
    import pyarrow.parquet as pq

    t = pq.read_table(parquet)
    classes = [c[2:] for c in t.schema.names if c.startswith("p_")]
    batch = dict(zip(t["path"].to_pylist(), zip(*(t[f"p_{c}"].to_pylist() for c in classes))))
    both = [p for p in got if p in batch]
    diff = max(
        (abs(batch[p][k] - got[p][c]) for p in both for k, c in enumerate(classes)), default=0.0
    )
    return len(both), diff


def report(rows: list[Measured], batch: Measured) -> None:
    print(
        f"\n{'how':50s} {'images':>7s} {'wall s':>7s} {'img/s':>7s} {'ms/img':>7s} "
        f"{'core-ms/img':>12s} {'server core-ms/img':>19s} {'errors':>6s}  predict is"
    )
    for r in rows:
        server = f"{r.core_ms(True):19.2f}" if r.client_core_seconds else f"{'-':>19s}"
        speed = "" if r is batch else f"{batch.rate / r.rate:.1f}x faster"
        print(
            f"{r.name:50s} {r.images:7d} {r.seconds:7.1f} {r.rate:7.1f} "
            f"{1000 / r.rate:7.2f} {r.core_ms():12.2f} {server} {r.errors:6d}  {speed}"
        )
        if r.note:
            print(f"{'':50s} ({r.note})")
    shipped = rows[1]
    best = max(rows[1:], key=lambda r: r.rate)
    verdict = "met" if batch.rate / best.rate >= GOAL_SPEEDUP else "MISSED"
    print(
        f"\ngoal {GOAL_SPEEDUP:.0f}x the endpoint's images/s: {verdict} "
        f"({batch.rate / shipped.rate:.1f}x the shipped endpoint, "
        f"{batch.rate / best.rate:.1f}x the fastest endpoint)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="runs/demo/bundle")
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--work", default="/tmp/medcae-predict-bench")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--replicas", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-seconds", type=float, default=300, help="per endpoint run")
    p.add_argument(
        "--predict-args", default="", help="extra flags for medcae predict, e.g. '--actors 2'"
    )
    a = p.parse_args()
    bundle = str(Path(a.bundle).resolve())
    if not (Path(bundle) / "bundle.json").exists():
        sys.exit(f"{a.bundle}: no model bundle there (make demo writes runs/demo/bundle)")
    work = Path(a.work)
    pngs = write_pngs(work / f"png-{a.images}", a.images)
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    batch, parquet = run_batch(bundle, pngs, out, a.predict_args.split())
    files = sorted(pngs.rglob("*.png"))
    blobs = [f.read_bytes() for f in files]
    rows = [batch]
    for replicas in dict.fromkeys([1, a.replicas]):  # as shipped, then every core
        name = "1 replica (shipped)" if replicas == 1 else f"{replicas} replicas"
        m, got = run_endpoint(
            f"Serve /v1/predict, {name}, {a.concurrency} clients",
            bundle,
            files,
            blobs,
            replicas,
            a.concurrency,
            a.max_seconds,
            out / f"serve-{replicas}.log",
        )
        n, diff = agreement(parquet, got)
        m.note = "; ".join(x for x in (m.note, f"{n} images agree to {diff:.1e}") if x)
        rows.append(m)
    report(rows, batch)


if __name__ == "__main__":
    main()

"""Scale benchmark: bounded memory on input larger than the object store, DDP throughput,
and the time a worker failure costs.

1. Writes a folder of large grayscale PNGs (default 600 x 1024^2, about 5x a 128 MB object
   store once decoded) unless it exists.
2. Starts a local Ray with a small object store and streams the folder through
   ``medcae.distributed.ingest`` (read -> decode+resize -> backbone actor pool -> Parquet)
   while sampling the memory (PSS) of the driver and every Ray process, and object-store use,
   for half and all of the images: the peak should not grow with the input.
3. Trains the CAE on the stored features (streamed from storage) with 1 and 2 workers and
   reports samples/s and the same peaks.
4. With ``--kill``, trains again with 2 workers, SIGKILLs one worker after the first
   checkpoint and reports the seconds from the kill to the next finished epoch.

    python bench/scale.py [--work /tmp/medcae-scale] [--images 600] [--object-store-mb 128]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402


def memory_now() -> int:
    """Summed PSS of this driver and every process under it (the local Ray: raylet, GCS,
    workers, actors). PSS splits shared pages (the object store's mmap, libraries) between
    the processes that map them, so the sum is not inflated the way summed RSS is."""
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


class Sampler:
    """Background sampling of memory (see :func:`memory_now`) and object-store use."""

    def __init__(self, every: float = 0.5):
        self.every = every
        self.mem_peak = 0
        self.store_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.mem_peak = max(self.mem_peak, memory_now())
            self.store_peak = max(self.store_peak, _store_used())
            self._stop.wait(self.every)


def _store_used() -> int:
    """Bytes in the object store (plasma), from Ray's memory summary."""
    from ray._private.internal_api import memory_summary

    try:
        text = memory_summary(stats_only=True)
    except Exception:  # noqa: BLE001 (Ray not up yet / shutting down)
        return 0
    m = re.search(r"Plasma memory usage (\d+) MiB", text)
    return int(m.group(1)) * 2**20 if m else 0


def write_images(folder: Path, n: int, side: int) -> int:
    """``n`` noisy grayscale PNGs of ``side``^2 px (incompressible-ish, like real scans)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.png")))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(have, n):
        base = 128 + 60 * np.sin(6 * xx + i) * np.cos(4 * yy)
        img = np.clip(base + rng.normal(0, 25, (side, side)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:05d}.png", compress_level=1)
    return sum(f.stat().st_size for f in folder.glob("*.png"))


def _mb(x: float) -> str:
    return f"{x / 2**20:,.0f} MB"


def _kill_after_checkpoint(run: Path, out: dict) -> None:
    from medcae.distributed.runtime import local_train_worker_pids
    from medcae.distributed.train import registered_epoch

    while registered_epoch(run) < 1:
        time.sleep(0.1)
    os.kill(local_train_worker_pids()[-1], signal.SIGKILL)
    out["killed_at"] = time.time()


def _train(store, cae, cfg, ckpt: Path, name: str, hold: bool):
    """``train_cae`` on the store's maps, held in the object store or streamed."""
    from medcae.distributed.train import train_cae

    return train_cae(
        store.split("train", hold),
        store.split("val", hold),
        cae,
        cfg,
        store.mean,
        store.std,
        ckpt,
        name,
        in_channels=store.shape[0],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/medcae-scale")
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--object-store-mb", type=int, default=128)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--kill", action="store_true", help="also measure a worker failure")
    a = p.parse_args()

    import ray

    from medcae.config import BackboneConfig, CAEConfig, TrainConfig
    from medcae.distributed.ingest import build_feature_store, folder_source
    from medcae.distributed.runtime import quiet_data_progress

    work = Path(a.work)
    on_disk = write_images(work / "images", a.images, a.side)
    decoded = a.images * a.side**2
    ray.init(num_cpus=4, object_store_memory=a.object_store_mb * 2**20, include_dashboard=False)
    quiet_data_progress()
    store_cap = ray.cluster_resources()["object_store_memory"]
    print(
        f"input: {a.images} PNGs {a.side}x{a.side}, {_mb(on_disk)} on disk, {_mb(decoded)} "
        f"decoded = {decoded / store_cap:.1f}x the object store ({_mb(store_cap)})"
    )
    backbone = BackboneConfig(taps=("stage5",), resolution=a.resolution)
    base = memory_now()
    print(f"memory (PSS, driver + all Ray processes) with Ray idle: {_mb(base)}")
    print(f"{'images':>7s} {'decoded':>9s} {'img/s':>6s} {'peak memory':>12s} {'peak store':>10s}")
    store = None
    for n in sorted({a.images // 2, a.images}):
        uri = str(work / f"store-{n}-{int(time.time())}")
        src = folder_source(work / "images", a.resolution, f"{uri}/_skipped", limit=n)
        with Sampler() as s:
            t0 = time.perf_counter()
            store = build_feature_store(src, backbone, uri, batch_size=32, threads=2)
            secs = time.perf_counter() - t0
        rows = sum(store.rows.values())
        print(
            f"{rows:7d} {_mb(rows * a.side**2):>9s} {rows / secs:6.1f} {_mb(s.mem_peak):>12s} "
            f"{_mb(s.store_peak):>10s}"
        )
    assert store is not None

    cae = CAEConfig(channels=(64,), latent_channels=16, epochs=a.epochs, batch_size=64)
    print(
        f"CAE training on {store.rows['train']} feature maps {store.shape}, {a.epochs} epochs:\n"
        f"{'workers':>7s} {'maps':>15s} {'samples/s':>10s} {'epoch s':>8s} {'peak memory':>12s} "
        f"{'peak store':>10s}"
    )
    for hold in (False, True):
        for workers in (1, 2):
            cfg = TrainConfig(num_workers=workers, cpus_per_worker=1.0)
            with Sampler() as s:
                name = f"bench-{workers}w-{int(time.time())}"
                out = _train(store, cae, cfg, work / "ckpt", name, hold)
            rates = [h["samples_per_s"] for h in out.history[1:]] or [
                out.history[0]["samples_per_s"]
            ]
            where = "object store" if hold else "streamed"
            print(
                f"{workers:7d} {where:>15s} {np.median(rates):10.0f} "
                f"{np.median([h['epoch_s'] for h in out.history]):8.2f} {_mb(s.mem_peak):>12s} "
                f"{_mb(s.store_peak):>10s}"
            )

    if a.kill:
        name = f"bench-kill-{int(time.time())}"
        info: dict = {}
        threading.Thread(
            target=_kill_after_checkpoint, args=(work / "ckpt" / name, info), daemon=True
        ).start()
        cfg = TrainConfig(num_workers=2, cpus_per_worker=1.0, max_failures=1)
        cae_k = CAEConfig(channels=(64,), latent_channels=16, epochs=a.epochs + 6, batch_size=64)
        out = _train(store, cae_k, cfg, work / "ckpt", name, hold=True)
        after = [h for h in out.history if h["restored_from"] > 0]
        first = after[0]
        since = first["time"] - info["killed_at"]
        print(
            f"worker SIGKILLed after checkpoint {first['restored_from']}: next epoch finished "
            f"{since:.1f}s after the kill (its own compute {first['epoch_s']:.1f}s), so "
            f"{since - first['epoch_s']:.1f}s lost to detection, restart and restore"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()

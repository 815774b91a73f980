"""Scale benchmark of the one data path: memory that stays flat, and streamed training speed.

``e2e``: writes PNG class folders of large grayscale images (default 2,000 and 8,000 images of
1024x1024) unless they exist, runs ``medcae run`` on each as its own process, and prints the
wall time per stage, images/s, the driver's peak RSS and the whole run's peak PSS (driver plus
every Ray process it started; PSS splits the object store's shared pages fairly).

``stream``: trains the CAE from one feature store (8,000 maps or more) with the object store
capped (default 256 MB): with the maps held in the object store, streamed from storage by each
worker (equal shards, :mod:`medcae.data.shards`), and, for comparison, as a lazy Ray Data dataset
re-read every epoch; prints samples/s of each (epochs after the first) and the ratios.

    python bench/scale.py e2e [--sizes 2000,8000] [--side 1024] [--work /tmp/medcae-scale]
    python bench/scale.py stream [--images 8000] [--object-store-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

RESULT_TAG = "MEDCAE_RESULT"


def write_folder(root: Path, n: int, side: int, seed: int = 0) -> Path:
    """``n`` grayscale PNGs of ``side`` x ``side`` in two class folders (skipped if present)."""
    from PIL import Image

    done = root / f".complete-{n}-{side}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    coarse = np.linspace(0, 1, side, dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(n):
        cls = root / ("lesion" if i % 2 else "normal")
        cls.mkdir(parents=True, exist_ok=True)
        a, b = rng.uniform(2, 9, 2)
        base = np.sin(a * coarse)[:, None] * np.cos(b * coarse)[None, :]
        img = 90 + 60 * base + rng.normal(0, 3, (side, side)).astype(np.float32)
        if i % 2:
            cy, cx = rng.integers(side // 4, 3 * side // 4, 2)
            img[cy - side // 16 : cy + side // 16, cx - side // 16 : cx + side // 16] += 40
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            cls / f"{i:06d}.png", compress_level=1
        )
        if (i + 1) % 1000 == 0:
            print(f"  wrote {i + 1}/{n} images ({time.perf_counter() - t0:.0f}s)", flush=True)
    done.touch()
    return root


class Peaks:
    """Samples a process tree every ``every`` seconds: the root's RSS, the tree's summed PSS."""

    def __init__(self, pid: int, every: float = 0.5):
        self.root = psutil.Process(pid)
        self.every, self.rss, self.pss = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.rss = max(self.rss, self.root.memory_info().rss)
            except psutil.Error:
                continue
            total = 0
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                except psutil.Error:
                    pass
            self.pss = max(self.pss, total)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_job(args: list[str], log: Path) -> tuple[dict, Peaks, float]:
    """``medcae run ARGS`` as its own process; its result, memory peaks and wall time."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "medcae.cli.main", "run", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        peaks = Peaks(proc.pid)
        rc = proc.wait()
        peaks.stop()
    wall = time.perf_counter() - t0
    text = log.read_text()
    if rc != 0:
        raise SystemExit(f"medcae run failed ({rc}):\n{text[-4000:]}")
    line = next(x for x in reversed(text.splitlines()) if x.startswith(RESULT_TAG))
    return json.loads(line[len(RESULT_TAG) + 1 :]), peaks, wall


def e2e(a: argparse.Namespace) -> None:
    work = Path(a.work)
    rows = []
    for n in a.sizes:
        folder = write_folder(work / f"png-{n}-{a.side}", n, a.side)
        out = work / f"run-{n}"
        store = work / f"store-{n}-{time.time():.0f}"  # a fresh store: extraction is measured
        res, peaks, wall = run_job(
            [
                "--data",
                str(folder),
                "--out",
                str(out),
                "--feature-store",
                str(store),
                "--epochs",
                str(a.epochs),
                "--num-cpus",
                str(a.num_cpus),
            ],
            out.with_suffix(".log"),
        )
        t = res["timings"]
        rows.append((n, wall, t, peaks))
        print(
            f"{n} images: wall {wall:.0f}s | features {t['features_s']:.0f}s "
            f"({n / t['features_s']:.1f} img/s) | CAE {t['train_s']:.0f}s | classifier "
            f"{t['classifier_s']:.0f}s | driver peak RSS {peaks.rss / 2**20:,.0f} MB | "
            f"run peak PSS {peaks.pss / 2**20:,.0f} MB",
            flush=True,
        )
    if len(rows) >= 2:
        lo, hi = rows[0][3].rss, rows[-1][3].rss
        print(
            f"driver peak RSS {rows[-1][0]} vs {rows[0][0]} images: {hi / lo:.2f}x "
            f"(goal: within 1.20x, under 2 GB)"
        )


def stream(a: argparse.Namespace) -> None:
    import ray

    from medcae.config import BackboneConfig, CAEConfig, TrainConfig
    from medcae.data import list_rows
    from medcae.distributed.runtime import quiet_data_progress
    from medcae.distributed.store import ExtractOptions, build_store
    from medcae.distributed.train import StreamedSplits, train_cae

    work = Path(a.work)
    folder = write_folder(work / f"png-{a.images}-{a.side}", a.images, a.side)
    ray.init(
        num_cpus=4,
        object_store_memory=a.object_store_mb * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    quiet_data_progress()
    store = build_store(
        [list_rows(str(folder))], BackboneConfig(), str(work / "stream-store"), ExtractOptions()
    )
    splits = ("train", "val", "test")  # every map trains the CAE here: 8,000 of them
    print(
        f"store: {store.count(*splits)} maps of {store.shape}, "
        f"{store.nbytes / 2**20:.0f} MB; object store {a.object_store_mb} MB",
        flush=True,
    )
    cae = CAEConfig(epochs=a.epochs)
    sources = {
        "held": lambda: (store.split(*splits, materialize=True), store.split("val").materialize()),
        "streamed": lambda: (
            StreamedSplits(store.files(*splits)),
            StreamedSplits(store.files("val")),
        ),
        "Ray Data lazy": lambda: (store.split(*splits), store.split("val")),
    }
    rates = {}
    for mode, make in sources.items():
        train_src, val_src = make()
        out = train_cae(
            train_src,
            val_src,
            cae,
            TrainConfig(),
            store.mean,
            store.std,
            work / "stream-ckpt",
            f"{mode}-{time.time():.0f}",
            in_channels=store.shape[0],
            fingerprint=store.key,
        )
        later = out.history[1:] or out.history
        rates[mode] = float(np.mean([h["samples_per_s"] for h in later]))
        secs = ", ".join(f"{h['epoch_s']:.1f}s" for h in later)
        print(
            f"{mode}: {rates[mode]:,.0f} samples/s (epochs 2..{len(out.history)}: {secs})",
            flush=True,
        )
    print(
        f"streamed / held: {rates['streamed'] / rates['held']:.2f}x (goal: at least 0.5x); "
        f"Ray Data lazy / held: {rates['Ray Data lazy'] / rates['held']:.2f}x"
    )
    ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("e2e")
    e.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 8000])
    e.add_argument("--side", type=int, default=1024)
    e.add_argument("--epochs", type=int, default=3)
    e.add_argument("--num-cpus", type=int, default=4)
    s = sub.add_parser("stream")
    s.add_argument("--images", type=int, default=8000)
    s.add_argument("--side", type=int, default=64)
    s.add_argument("--epochs", type=int, default=4)
    s.add_argument("--object-store-mb", type=int, default=256)
    for q in (e, s):
        q.add_argument("--work", default=os.environ.get("MEDCAE_BENCH_DIR", "/tmp/medcae-scale"))
    a = p.parse_args()
    e2e(a) if a.what == "e2e" else stream(a)


if __name__ == "__main__":
    main()

"""Queue latency at a large pool: the labeling loop's ``GET .../queue`` work, without HTTP.

Writes ``--pool-size`` PNG files (the demo's images, each with its own noise, so every file is
distinct), then times, through :class:`medcae.labeling.service.Loop` as the server calls it:

- the first request: listing is done at server start (timed apart); the first queue request
  predicts the whole pool with the bundle (once per version), ranks it and leases ``k``;
- a restart's first request: the pool's predictions read back from the state folder;
- later requests: rank around the labels so far and lease, for each strategy, with labels
  being added in between (median and 95th percentile).

    python bench/labeling_queue.py --bundle runs/demo/bundle [--pool-size 20000] [--k 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def write_pool(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image

    from medcae.data import load_dataset

    ds = load_dataset("demo")
    images = np.concatenate([ds.splits[s].images for s in ("train", "val", "test")])
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(n):
        base = images[i % len(images)].astype(np.int16)
        noisy = np.clip(base + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:06d}.png", compress_level=1)
    print(f"pool: {n} PNG files written in {time.perf_counter() - t0:.0f}s", flush=True)


def model_view(bundle: str):
    from medcae.inference.predictor import Predictor
    from medcae.labeling.service import Model

    return Model.of(Predictor.from_bundle(bundle), "1")


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--bundle", default="runs/demo/bundle")
    a.add_argument("--pool-size", type=int, default=20_000)
    a.add_argument("--k", type=int, default=5)
    a.add_argument("--requests", type=int, default=20, help="later requests per strategy")
    args = a.parse_args()
    from medcae.labeling.service import Loop

    m = model_view(args.bundle)
    with tempfile.TemporaryDirectory(prefix="medcae-queue-") as tmp:
        pool = Path(tmp) / "pool"
        write_pool(pool, args.pool_size)
        t0 = time.perf_counter()
        loop = Loop("bench", None, str(pool), Path(tmp) / "state")
        print(f"listing at server start: {time.perf_counter() - t0:.2f}s", flush=True)
        t0 = time.perf_counter()
        first = loop.queue(m, args.k, "alice")
        t_first = time.perf_counter() - t0
        print(
            f"first request (predicts {args.pool_size} images, ranks, leases {args.k}): "
            f"{t_first:.1f}s ({args.pool_size / t_first:.0f} images/s)",
            flush=True,
        )
        loop2 = Loop("bench", None, str(pool), Path(tmp) / "state")  # a restarted server
        t0 = time.perf_counter()
        loop2.queue(m, args.k, "bob")
        print(
            f"first request after a restart (cached predictions): {time.perf_counter() - t0:.2f}s"
        )
        truth = m.names
        rows = []
        for strategy in ("random", "margin", "typiclust", "hybrid"):
            times = []
            for r in range(args.requests):
                t0 = time.perf_counter()
                got = loop.queue(m, args.k, "alice", strategy)
                times.append(time.perf_counter() - t0)
                for item in got[:2]:  # label two of each answer: the ranking changes
                    loop.add_label(m, item["image_id"], truth[r % len(truth)], "alice")
            t = np.asarray(times) * 1000
            rows.append(
                (strategy, np.median(t), np.percentile(t, 95), len(loop.store.current("bench")))
            )
        print("\nlater requests (ms), labels added between requests:")
        print("| strategy | median | p95 | labels at the end |\n|---|---|---|---|")
        for s, med, p95, n in rows:
            print(f"| {s} | {med:.0f} | {p95:.0f} | {n} |")
        assert first, "the first request handed out nothing"


if __name__ == "__main__":
    main()

"""Backbone feature extraction as a Ray Data ``map_batches`` stage on an actor pool."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import ray

from medcae.config import BackboneConfig
from medcae.features import FeatureExtractor

log = logging.getLogger(__name__)


class BackboneStage:
    """Ray Data callable class: one frozen backbone per actor, reused across batches.

    Args:
        backbone: ``BackboneConfig`` as a dict.
        use_gpu: Run on the actor's GPU.
        threads: Torch intra-op threads in the actor (0 = leave torch's default).
        outputs: Which features to emit (``maps``, ``final``).
        timestamps: Add a ``done_at`` column (wall clock when the batch finished).

    Columns other than ``image`` pass through unchanged (``idx``, ``split``...).
    """

    def __init__(
        self,
        backbone: dict,
        use_gpu: bool = False,
        threads: int = 0,
        outputs: tuple[str, ...] = ("maps", "final"),
        timestamps: bool = True,
    ):
        import torch

        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.extractor = FeatureExtractor(BackboneConfig(**backbone), device)
        self.outputs = tuple(outputs)
        self.timestamps = timestamps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image"])
        out = {k: v for k, v in batch.items() if k != "image"}
        if n == 0:  # a batch whose files were all undecodable
            return out | {k: np.zeros((0,), np.float32) for k in self.outputs}
        feats = self.extractor(batch["image"])
        out |= {k: feats[k] for k in self.outputs}
        if self.timestamps:
            out["done_at"] = np.full(n, time.time())
        return out


def extract_with_ray(
    images: np.ndarray,
    backbone: BackboneConfig,
    batch_size: int = 64,
    actors: int = 1,
    use_gpu: bool = False,
    threads: int = 0,
    label: str = "",
    stats: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Extract backbone features of ``images`` through Ray Data, in input order.

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, H, W, 3)``.
        backbone: Backbone configuration.
        batch_size: Images per ``map_batches`` batch.
        actors: Size of the actor pool.
        use_gpu: One GPU per actor.
        threads: CPUs each actor reserves and uses as torch threads; 0 means all cores of
            the node split over the actors (Ray would otherwise give each actor one thread).
        label: Prefix for progress log lines.
        stats: If given, filled with ``wall_s``, ``steady_images_per_s`` (actor throughput
            after its first batch) and ``first_batch_s`` (the rest of the wall time: start-up,
            first batch, moving results).

    Returns:
        ``{"maps": (N, C, h, w) float32, "final": (N, C_final) float32}``.
    """
    ds = backbone_stage(image_dataset(images), backbone, batch_size, actors, use_gpu, threads)
    return _collect(ds, len(images), label, stats if stats is not None else {})


def backbone_stage(
    ds: ray.data.Dataset,
    backbone: BackboneConfig,
    batch_size: int = 64,
    actors: int = 1,
    use_gpu: bool = False,
    threads: int = 0,
    **stage_kwargs,
) -> ray.data.Dataset:
    """``ds`` (column ``image``) through :class:`BackboneStage` on an actor pool.

    Args:
        ds: Dataset with an ``image`` column; other columns pass through.
        backbone: Backbone configuration.
        batch_size: Images per batch.
        actors: Size of the actor pool.
        use_gpu: One GPU per actor.
        threads: CPUs each actor reserves and uses as torch threads; 0 means the node's
            cores split over the actors (Ray would otherwise give each actor one thread).
        **stage_kwargs: ``outputs`` / ``timestamps`` of :class:`BackboneStage`.
    """
    threads = threads or max(1, (os.cpu_count() or 1) // actors)
    return ds.map_batches(
        BackboneStage,
        fn_constructor_kwargs={
            "backbone": _asdict(backbone),
            "use_gpu": use_gpu,
            "threads": threads,
            **stage_kwargs,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1 if use_gpu else threads,
        batch_format="numpy",
    )


def image_dataset(images: np.ndarray, rows_per_block: int = 1024) -> ray.data.Dataset:
    """A Ray Dataset with columns ``idx`` (row position) and ``image`` (uint8 tensor).

    The pool may finish batches out of order; ``idx`` puts results back in input order.
    """
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    blocks = [
        pa.table(
            {
                "idx": np.arange(i, min(i + rows_per_block, len(images))),
                "image": ArrowTensorArray.from_numpy(images[i : i + rows_per_block]),
            }
        )
        for i in range(0, len(images), rows_per_block)
    ]
    return ray.data.from_arrow(blocks)


def _asdict(cfg: BackboneConfig) -> dict:
    return {
        "name": cfg.name,
        "taps": list(cfg.taps),
        "resolution": cfg.resolution,
        "weights": cfg.weights,
    }


def _collect(ds: ray.data.Dataset, n: int, label: str, stats: dict) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    done, start, last = 0, time.perf_counter(), 0.0
    stamps = np.empty(n)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        idx = batch["idx"]
        for key in ("maps", "final"):
            if key not in out:
                out[key] = np.empty((n, *batch[key].shape[1:]), batch[key].dtype)
            out[key][idx] = batch[key]
        stamps[idx] = batch["done_at"]
        done += len(idx)
        now = time.perf_counter() - start
        if now - last > 10 or done == n:
            rate = done / now
            log.info(
                "%s extracted %d/%d images, %.1f img/s, ETA %.0fs",
                label,
                done,
                n,
                rate,
                (n - done) / max(rate, 1e-9),
            )
            last = now
    if done != n:
        raise RuntimeError(f"extraction returned {done} rows for {n} images")
    # Actor-side throughput: rows finished after the first batch over the time they took.
    first, span = stamps.min(), stamps.max() - stamps.min()
    steady = (stamps > first).sum() / span if span > 0 else float("nan")
    stats.update(wall_s=now, steady_images_per_s=steady, first_batch_s=now - span)
    return out

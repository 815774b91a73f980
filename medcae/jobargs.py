"""Command-line flags shared by the ``ray_jobs`` entry points, and the config they build."""

from __future__ import annotations

import argparse

from medcae.config import (
    BackboneConfig,
    CAEConfig,
    ClassifierConfig,
    PipelineConfig,
    TrainConfig,
)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _taps(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def budget(text: str) -> float | int:
    """``0.1`` is a fraction of each class; ``20`` (no dot) is a count per class."""
    return float(text) if "." in text else int(text)


def add_data_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default="demo",
        help="data set: .npz / folder / .parquet path, "
        "a MedMNIST name (pneumoniamnist, ...) or 'demo' (built-in synthetic set)",
    )
    d.add_argument(
        "--unlabeled",
        default=None,
        help="separate unlabeled images for the CAE "
        "(folder, .npz, .parquet); default: the labeled set's training images",
    )
    d.add_argument(
        "--data-dir",
        default=None,
        help="where named data sets live (default $MEDCAE_DATA_DIR or ~/.medmnist)",
    )


def add_model_args(p: argparse.ArgumentParser, epochs: int | None = 15) -> None:
    b = p.add_argument_group("backbone")
    b.add_argument("--backbone", default="efficientnet_lite0")
    b.add_argument("--taps", default="", help="comma-separated tap layers (default per backbone)")
    b.add_argument("--resolution", type=int, default=112)
    b.add_argument("--backbone-weights", default=None, help="state-dict file of the backbone")
    c = p.add_argument_group("auto-encoder")
    c.add_argument("--cae-channels", type=_ints, default=(128, 64))
    c.add_argument("--latent-channels", type=int, default=32)
    c.add_argument("--downsample", action="store_true")
    c.add_argument("--noise-std", type=float, default=0.1)
    c.add_argument("--pool", default="flatten", choices=["avg", "avgmax", "flatten"])
    c.add_argument("--epochs", type=int, default=epochs)
    c.add_argument("--batch-size", type=int, default=64, help="global batch (split over workers)")
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--weight-decay", type=float, default=1e-4)
    c.add_argument("--seed", type=int, default=0)


def add_ray_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("ray")
    r.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    r.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    r.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP if > 1)")
    r.add_argument("--use-gpu", action="store_true", help="one GPU per Train worker and actor")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--extract-batch-size", type=int, default=64)
    r.add_argument("--extract-actors", type=int, default=1)
    r.add_argument(
        "--extract-threads",
        type=int,
        default=0,
        help="CPUs/torch threads per backbone actor (0: node cores / actors)",
    )


def add_fault_args(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("checkpoints and failures")
    f.add_argument(
        "--max-failures", type=int, default=0, help="worker-group restarts allowed (-1: no limit)"
    )
    f.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept (0: all)")
    f.add_argument(
        "--checkpoint-score-attribute",
        default="",
        choices=["", "train_loss", "val_loss"],
        help="metric ranking checkpoints (lower is better); empty: keep the latest",
    )
    f.add_argument(
        "--placement-strategy",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="where Train workers go: PACK fills nodes, SPREAD one per node first",
    )


def config_from_args(a: argparse.Namespace) -> PipelineConfig:
    """Build the pipeline config from parsed flags (fields absent from ``a`` keep defaults)."""
    g = vars(a)
    train_fields = ("max_failures", "num_to_keep", "checkpoint_score_attribute")
    return PipelineConfig(
        data=a.data,
        unlabeled=a.unlabeled,
        backbone=BackboneConfig(a.backbone, _taps(a.taps), a.resolution, a.backbone_weights),
        cae=CAEConfig(
            a.cae_channels,
            a.latent_channels,
            a.downsample,
            a.noise_std,
            a.pool,
            a.epochs if a.epochs is not None else CAEConfig.epochs,
            a.batch_size,
            a.lr,
            a.weight_decay,
            a.seed,
        ),
        classifier=ClassifierConfig(
            g.get("classifier", "logreg"), g.get("budget", 1.0), seed=a.seed
        ),
        train=TrainConfig(
            a.num_workers,
            a.use_gpu,
            a.cpus_per_worker,
            a.extract_batch_size,
            a.extract_actors,
            a.extract_threads,
            **{k: g[k] for k in train_fields if k in g},
            placement_strategy=g.get("placement_strategy", "PACK"),
        ),
    )

"""Main job: train a CAE on frozen-backbone feature maps on Ray, fit a classifier, save a bundle.

Runs directly (``python ray_jobs/pipeline.py --data pneumoniamnist``) or on a cluster
(``ray job submit --working-dir . -- python ray_jobs/pipeline.py ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.config import (  # noqa: E402
    BackboneConfig,
    CAEConfig,
    ClassifierConfig,
    PipelineConfig,
    TrainConfig,
)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _budget(text: str) -> float | int:
    """``0.1`` is a fraction of each class; ``20`` (no dot) is a count per class."""
    return float(text) if "." in text else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
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
    c.add_argument("--epochs", type=int, default=15)
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--weight-decay", type=float, default=1e-4)
    k = p.add_argument_group("classifier")
    k.add_argument("--classifier", default="logreg", choices=["logreg", "linear_svm"])
    k.add_argument(
        "--budget",
        type=_budget,
        default=1.0,
        help="labels used: fraction of each class (0.1) or count per class (20)",
    )
    k.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("ray")
    r.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    r.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")
    r.add_argument("--num-workers", type=int, default=1)
    r.add_argument("--use-gpu", action="store_true")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--extract-batch-size", type=int, default=64)
    r.add_argument("--extract-actors", type=int, default=1)
    r.add_argument(
        "--extract-threads",
        type=int,
        default=0,
        help="CPUs/torch threads per backbone actor (0: node cores / actors)",
    )
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default runs/<time>)")
    o.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/medcae)")
    o.add_argument("--smoke-test", action="store_true", help="tiny subset, tiny model: seconds")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> PipelineConfig:
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
            a.epochs,
            a.batch_size,
            a.lr,
            a.weight_decay,
            a.seed,
        ),
        classifier=ClassifierConfig(a.classifier, a.budget, seed=a.seed),
        train=TrainConfig(
            a.num_workers,
            a.use_gpu,
            a.cpus_per_worker,
            a.extract_batch_size,
            a.extract_actors,
            a.extract_threads,
        ),
    )


def _taps(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    from medcae.errors import run_cli

    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import ray

    from medcae.classifier import sample_budget
    from medcae.data import load_dataset
    from medcae.distributed.pipeline import run_pipeline
    from medcae.distributed.runtime import init_ray

    cfg = config_from_args(args)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    dataset = load_dataset(cfg.data, args.data_dir)  # bad input fails before Ray starts
    sample_budget(dataset.splits["train"].labels, cfg.classifier.budget, cfg.classifier.seed)
    init_ray(args.address, args.num_cpus)
    res = run_pipeline(cfg, out, args.cache_dir, args.smoke_test, args.data_dir, dataset)
    ray.shutdown()  # flush worker logs before the summary, so it is the last thing printed
    print(
        f"\nTest-set results ({cfg.data}, {len(res.history)} CAE epochs, "
        f"labels: budget {cfg.classifier.budget}):\n"
    )
    print(res.table)
    for path, reason in res.skipped:
        print(f"skipped unreadable image: {path}: {reason}")
    print(
        f"\nfeature cache: {'hit' if all(res.cache_hits.values()) else 'miss'} "
        f"(features {res.timings['features_s']:.1f}s, CAE training {res.timings['train_s']:.1f}s,"
        f" total {res.timings['total_s']:.1f}s)"
    )
    print(f"model bundle: {res.bundle.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Distributed CAE training: images -> Ray Data backbone stage -> feature store -> Ray Train DDP.

Runs directly (``python ray_jobs/train.py --data pneumoniamnist --num-workers 2``) or on a
cluster (``ray job submit --working-dir . -- python ray_jobs/train.py ... --use-gpu``).
Checkpoints go to ``--storage-path/--name``; run it again with the same name and storage
path to resume after the job was killed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.jobargs import (  # noqa: E402
    add_data_args,
    add_fault_args,
    add_model_args,
    add_ray_args,
    config_from_args,
)

RESULT_TAG = "MEDCAE_TRAIN_RESULT"
SMOKE_LIMIT = {"train": 96, "val": 48}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_data_args(p)
    p.add_argument(
        "--color", default="gray", choices=["gray", "rgb"], help="folders: decode images as"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="folders: share held out for val loss"
    )
    add_model_args(p, epochs=None)
    add_ray_args(p)
    add_fault_args(p)
    o = p.add_argument_group("output")
    o.add_argument(
        "--storage-path",
        default="runs/train",
        help="checkpoints and feature store: local path, NFS, or a pyarrow URI (s3://...)",
    )
    o.add_argument(
        "--name", default=None, help="run name; the same name and storage path resume a run"
    )
    o.add_argument(
        "--feature-store",
        default=None,
        help="where the backbone features go (default <storage-path>/<name>/features); point "
        "several runs at one store to extract once",
    )
    o.add_argument(
        "--materialize",
        default="auto",
        choices=["auto", "always", "never"],
        help="hold the feature maps in the object store during training (auto: if they take "
        "under a quarter of it) or stream them from storage every epoch",
    )
    o.add_argument(
        "--smoke-test", action="store_true", help="tiny subset, tiny model, 64 px: seconds"
    )
    a = p.parse_args(argv)
    if not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, got {a.val_fraction}")
    return a


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    from medcae.errors import run_cli

    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import ray

    from medcae.distributed.ingest import (
        build_feature_store,
        check_source,
        open_source,
        storage_uri,
    )
    from medcae.distributed.pipeline import resolved_backbone, smoke_config
    from medcae.distributed.runtime import init_ray
    from medcae.distributed.train import train_cae
    from medcae.features import FeatureExtractor

    cfg = config_from_args(args)
    if args.smoke_test:
        cfg = smoke_config(cfg)
        if args.epochs is not None:  # an explicit --epochs wins over the smoke default
            cfg = replace(cfg, cae=replace(cfg.cae, epochs=args.epochs))
    cfg = resolved_backbone(cfg)
    FeatureExtractor(cfg.backbone)  # missing weights: one clear error before Ray starts
    what, dataset = check_source(cfg.data, cfg.unlabeled, args.data_dir)
    logging.info("data: %s", what)
    name = args.name or f"cae-{time.strftime('%Y%m%d-%H%M%S')}"
    run_uri = f"{storage_uri(args.storage_path)}/{name}"
    features_uri = storage_uri(args.feature_store) if args.feature_store else f"{run_uri}/features"
    limit = SMOKE_LIMIT if args.smoke_test else None
    init_ray(args.address, args.num_cpus)
    source = open_source(
        cfg.data,
        cfg.backbone.resolution,
        f"{features_uri}/_skipped",
        cfg.unlabeled,
        args.data_dir,
        args.color,
        args.val_fraction,
        limit,
        dataset,
    )
    t0 = time.perf_counter()
    store = build_feature_store(
        source,
        cfg.backbone,
        features_uri,
        cfg.train.extract_batch_size,
        cfg.train.extract_actors,
        cfg.train.use_gpu,
        cfg.train.extract_threads,
    )
    t1 = time.perf_counter()
    hold = store.should_materialize(args.materialize)
    logging.info(
        "feature maps: %.1f MB, %s",
        store.nbytes / 1e6,
        "in the object store" if hold else "streamed from storage each epoch",
    )
    out = train_cae(
        store.split("train", hold),
        store.split("val", hold),
        cfg.cae,
        cfg.train,
        store.mean,
        store.std,
        args.storage_path,
        name,
        in_channels=store.shape[0],
    )
    t2 = time.perf_counter()
    ray.shutdown()  # flush worker logs so the summary comes last
    last = out.history[-1]
    summary = {
        "name": name,
        "run": run_uri,
        "checkpoint": out.checkpoint,
        "epochs": len(out.history),
        "final_train_loss": last["train_loss"],
        "final_val_loss": last["val_loss"],
        "restored_from_epoch": out.restored_from,
        "worker_nodes": out.worker_nodes,
        "history": out.history,
        "features_reused": store.reused,
        "feature_store": features_uri,
        "feature_rows": store.rows,
        "skipped": store.skipped,
        "extract_s": t1 - t0,
        "train_s": t2 - t1,
        "config": cfg.to_dict(),
    }
    for path, reason in store.skipped:
        print(f"skipped unreadable image: {path}: {reason}")
    print(
        f"\nCAE trained: {len(out.history)} epochs on {store.rows['train']} images, "
        f"{len(set(out.worker_nodes))} node(s), {len(out.worker_nodes)} worker(s); "
        f"final train_loss {last['train_loss']:.4f} val_loss {last['val_loss']:.4f}"
        + (f"; resumed from epoch {out.restored_from}" if out.restored_from else "")
    )
    print(f"checkpoint: {out.checkpoint}")
    print(f"resume with: --storage-path {args.storage_path} --name {name}")
    print(f"{RESULT_TAG} {json.dumps(summary, default=float)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

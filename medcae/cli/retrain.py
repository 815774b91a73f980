"""``medcae retrain``: the labeling loop's job (``ray_jobs/retrain.py``; submitted by the server
through the Ray Jobs API on ``POST /v1/models/{name}/train``).

The champion of ``--model`` is trained again, with its own configuration, on its own labels plus
the loop's (:mod:`medcae.labeling.retrain`), the pool as unlabeled images; the new bundle and the
champion are compared on the same held-out images; the new bundle is registered as the next
version, with the comparison and the job id as tags, under the alias ``challenger``. The
champion is never touched: a job that fails leaves the registry as it was.

The console has a line per stage; the last ones are ``comparison: ...``, ``registered: ...``
and ``MEDCAE_RETRAIN {json}`` (the version, the comparison), which the server reads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medcae.cli.logs import print_summary, route_ray_output, setup_run_logging
from medcae.cli.models import registry_uri

RESULT_TAG = "MEDCAE_RETRAIN"
#: Registry tags of a retrained version.
JOB_TAG, PARENT_TAG, COMPARE_TAG, LABELS_TAG = (
    "medcae.job",
    "medcae.parent",
    "medcae.compare",
    "medcae.labels",
)
_TAG_CHARS = 5000  # MLflow's longest tag value


def main(args: argparse.Namespace) -> int:
    from medcae.cli.run import run_paths
    from medcae.config import PipelineConfig
    from medcae.distributed.pipeline import list_sources, run_pipeline, smoke_config
    from medcae.distributed.runtime import init_ray, shutdown_ray
    from medcae.distributed.store import ExtractOptions
    from medcae.inference.bundle import read_bundle
    from medcae.labeling.pool import LabelPool
    from medcae.labeling.retrain import compare_summary, loop_rows, read_snapshot
    from medcae.registry.models import ModelRef, Registry

    t0 = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # not on the console
    registry = Registry(registry_uri(args.mlflow))
    champion = registry.resolve(ModelRef(args.model, alias="champion"))
    meta, _, _ = read_bundle(champion.bundle)
    cfg = PipelineConfig.from_dict(meta["config"])
    cfg = replace(cfg, unlabeled=args.pool)
    if args.smoke_test:
        cfg = smoke_config(cfg)
    if args.epochs is not None:
        cfg = replace(cfg, cae=replace(cfg.cae, epochs=args.epochs))
    for field in ("representation", "calibration"):  # the champion's unless asked
        if getattr(args, field) is not None:
            cfg = replace(cfg, classifier=replace(cfg.classifier, **{field: getattr(args, field)}))
    snapshot = read_snapshot(args.labels)
    pool = LabelPool.from_source(args.pool, args.data_dir)
    sources = list_sources(cfg, args.data_dir, args.smoke_test)  # bad input fails before Ray
    sources[0] = loop_rows(
        sources[0], pool, snapshot, cfg.classifier.budget, cfg.classifier.seed, args.labels
    )
    cfg = replace(cfg, classifier=replace(cfg.classifier, budget=1.0))  # every label given
    held = sum(1 for _, _, split in snapshot if split == "test")
    print(
        f"retrain {args.model}: champion version {champion.version}, {len(snapshot)} new "
        f"label(s) ({held} held out for the comparison), pool {args.pool}",
        flush=True,
    )
    out = Path(args.out or f"runs/retrain-{time.strftime('%Y%m%d-%H%M%S')}")
    paths = run_paths(args, out)
    extract = ExtractOptions(
        args.extract_batch_size,
        args.extract_actors,
        args.use_gpu,
        args.extract_threads,
        runtime=args.runtime,
    )
    cfg = replace(
        cfg,
        train=replace(
            cfg.train,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            cpus_per_worker=args.cpus_per_worker,
            max_failures=args.max_failures,
            num_to_keep=args.num_to_keep,
            checkpoint_score_attribute=args.checkpoint_score_attribute,
            placement_strategy=args.placement_strategy,
        ),
    )
    log_file = setup_run_logging(out)
    init_ray(args.address, args.num_cpus)
    route_ray_output()
    try:
        res = run_pipeline(cfg, paths, sources, extract)
    finally:
        shutdown_ray()
    print(f"compare: the challenger and champion {champion.version} on the test split", flush=True)
    result = compare_bundles(sources[0], str(champion.bundle), str(res.bundle))
    result |= {"champion_version": champion.version, "job": args.job_id, "held_out": held}
    tags = {
        JOB_TAG: args.job_id,
        PARENT_TAG: str(champion.version),
        LABELS_TAG: str(len(snapshot)),
        COMPARE_TAG: _tag_json(result),
    }
    info = registry.register(args.model, res.bundle, tags=tags)
    registry.promote(args.model, info.version, args.alias)
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=float))
    summary = {
        "model": args.model,
        "version": info.version,
        "alias": args.alias,
        "champion": champion.version,
        "job": args.job_id,
        "bundle": str(res.bundle.resolve()),
        "worker_nodes": res.training.worker_nodes,
        "epochs": len(res.training.history),
        "total_s": round(time.perf_counter() - t0, 1),
        "compare": result,
    }
    print_summary(
        [
            f"comparison: {compare_summary(result)}",
            f"registered: {args.model} version {info.version} as @{args.alias} at "
            f"{registry.uri} (promote it to make it the champion)",
            f"log: {log_file.resolve()}",
            f"{RESULT_TAG} {json.dumps(summary, default=float)}",
        ]
    )
    return 0


def _tag_json(result: dict[str, Any]) -> str:
    """The comparison as a tag: whole when it fits, else without the per-class tests."""
    text = json.dumps(result, default=float)
    if len(text) > _TAG_CHARS:
        text = json.dumps({k: v for k, v in result.items() if k != "tests"}, default=float)
    return text[:_TAG_CHARS]


def compare_bundles(rows: Any, champion: str, challenger: str) -> dict[str, Any]:
    """Both bundles' probabilities and decisions on the test split of ``rows`` (the
    champion's test images and the held-out loop labels), compared
    (:func:`medcae.labeling.retrain.compare`); the backbone runs once when they share it."""
    from medcae.inference.predictor import Predictor
    from medcae.labeling.retrain import compare
    from medcae.serving.versions import backbone_key

    table = rows.table
    test = [i for i, s in enumerate(table.column("split").to_pylist()) if s == "test"]
    paths = table.column("path").to_pylist() if "path" in table.column_names else None
    data = table.column("data").to_pylist() if "data" in table.column_names else None
    images = []
    for i in test:
        if data is not None and data[i] is not None:
            images.append(data[i])
        else:
            assert paths is not None
            images.append(Path(paths[i]).read_bytes())
    y = np.asarray(table.column("label").to_pylist(), np.int64)[test]
    a, b = Predictor.from_bundle(champion), Predictor.from_bundle(challenger)
    outs = []
    shared = backbone_key(a.meta, "torch") == backbone_key(b.meta, "torch")
    feats = [a.backbone(images[s : s + 64]) for s in range(0, len(images), 64)] if shared else None
    for p in (a, b):
        parts = []
        for j, s in enumerate(range(0, len(images), 64)):
            chunk = images[s : s + 64]
            parts.append(p.head_outputs(feats[j]) if feats is not None else p.predict_arrays(chunk))
        out = {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}
        index = {n: c for c, n in enumerate(p.label_names)}
        decided = [index.get(pr.label, -1) for pr in p.predictions(out)]
        outs.append((out["proba"], np.asarray(decided)))
    names = list(b.label_names)
    multilabel = bool(b.meta.get("multilabel"))
    return compare(y, outs[0][0], outs[1][0], names, multilabel, outs[0][1], outs[1][1])

"""``medcae evaluate``: the paper's method against transfer-learned features, a pixel CAE and
fine-tuning (``ray_jobs/evaluate.py``).

Same data, splits, classifier and label budgets for every method, several seeds; methods run as
Ray tasks. Writes report.md (table + conclusions data), results.csv, PNG plots and run.log to
``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from medcae.cli.args import (
    DEFAULT_METHODS,
    config_from_args,
    default_store_root,
    single_label_only,
)
from medcae.cli.logs import route_ray_output, setup_run_logging
from medcae.config import ConfigError

SMOKE_BUDGETS: list[float | int] = [0.1, 1.0, 5]


def store_inputs(store, rows) -> tuple:
    """The store's labeled splits (sorted by id) and their decoded images, in the same order.

    Returns:
        ``(Dataset of the images, {split: {"maps", "final", "labels"}})``.
    """
    from medcae.data import Dataset, ImageSet, decode_image, to_uniform
    from medcae.distributed.store import read_bytes, rows_table

    table = rows_table([rows])  # both payload columns, nulls where a row has the other
    payloads = zip(table.column("data").to_pylist(), table.column("path").to_pylist())
    blobs = dict(
        zip(table.column("id").to_pylist(), (d if d is not None else p for d, p in payloads))
    )
    feats, splits = {}, {}
    for s in ("train", "val", "test"):
        arr = store.arrays(s)
        feats[s] = {"maps": arr["maps"], "final": arr["final"], "labels": arr["label"]}
        images = [
            decode_image(b if isinstance(b, bytes) else read_bytes(b), str(i))
            for i, b in ((i, blobs[i]) for i in arr["id"])
        ]
        splits[s] = images
    sizes = [im.shape[:2] for ims in splits.values() for im in ims]
    side = sizes[0][0] if len(set(sizes)) == 1 and sizes[0][0] == sizes[0][1] else None
    ds = Dataset(
        rows.name,
        {s: ImageSet(to_uniform(ims, side), feats[s]["labels"]) for s, ims in splits.items()},
        store.label_names,
        multilabel=rows.multilabel,
    )
    return ds, feats


def open_store(a: argparse.Namespace, cfg: Any, sources: list) -> tuple:
    """Ray started, the feature store built (or found cached), its splits read.

    Returns:
        :func:`store_inputs` of the labeled source.
    """
    from medcae.distributed.runtime import init_ray
    from medcae.distributed.store import ExtractOptions, build_store

    init_ray(a.address, a.num_cpus)
    route_ray_output()
    root = a.feature_store or default_store_root()
    store = build_store(sources[:1], cfg.backbone, root, ExtractOptions(runtime=cfg.train.runtime))
    return store_inputs(store, sources[0])


def main(a: argparse.Namespace) -> int:
    if a.active:
        return main_active(a)
    from medcae.distributed.evaluate import run_evaluation
    from medcae.distributed.pipeline import list_sources, resolved_backbone, smoke_config
    from medcae.distributed.runtime import shutdown_ray
    from medcae.evaluation.comparison import METHODS
    from medcae.model.finetune import FinetuneConfig

    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected some of {', '.join(METHODS)}")
    cfg = config_from_args(a)
    seeds, budgets = list(range(a.seeds)), a.budgets
    ft = FinetuneConfig(epochs=a.finetune_epochs, resolution=a.finetune_resolution)
    if a.smoke_test:
        cfg, seeds, budgets = smoke_config(cfg), [0], SMOKE_BUDGETS
        ft = FinetuneConfig(epochs=1, min_steps=2, resolution=32, patience=1)
    cfg = resolved_backbone(cfg)
    if "cae_hier" in methods:
        from medcae.evaluation.comparison import hierarchical

        hierarchical(cfg)  # fewer than two taps: one error line before Ray
    sources = list_sources(cfg, a.data_dir, a.smoke_test)  # bad input fails before Ray
    if sources[0].multilabel:  # findings: the methods that have a multi-label form
        from medcae.evaluation.comparison import SINGLE_LABEL_ONLY

        asked = [m for m in SINGLE_LABEL_ONLY if m in methods]
        if asked and a.methods != DEFAULT_METHODS:
            raise ConfigError(
                f"medcae evaluate: {', '.join(asked)} take one class per image; "
                f"{sources[0].name} is multi-label (findings): leave them out of --methods"
            )
        methods = [m for m in methods if m not in SINGLE_LABEL_ONLY]
    out = Path(a.out)
    setup_run_logging(out)
    start = time.perf_counter()
    ds, feats = open_store(a, cfg, sources)
    rows, examples = run_evaluation(
        ds,
        feats,
        cfg,
        methods,
        budgets,
        seeds,
        ft,
    )
    shutdown_ray()  # no process of a local Ray outlives the job
    wall = time.perf_counter() - start
    from medcae.evaluation.report import write_report

    test_labels = feats["test"]["labels"]
    multilabel = sources[0].multilabel
    table = write_report(out, ds, cfg, rows, examples, budgets, ft, wall, test_labels, multilabel)
    from medcae.cli.tracking import log_job, tracking_uri
    from medcae.evaluation.comparison import aggregate

    log_job(
        tracking_uri(a.mlflow),
        "medcae-evaluate",
        out.name,
        {**cfg.to_dict(), "methods": methods, "budgets": budgets, "seeds": len(seeds)},
        metrics={
            f"{r['method']}.{r['budget']:g}.{m}": r[m]
            for r in aggregate(rows)
            for m in ("auc", "auc_std", "acc", "balanced_acc")
        },
        artifacts={"report": out},
    )
    print(table)
    print(f"\nwall time {wall / 60:.1f} min; report: {out / 'report.md'}; log: {out / 'run.log'}")
    return 0


def main_active(a: argparse.Namespace) -> int:
    """``--active``: the simulated labeling study (:mod:`medcae.labeling.study`) on the store's
    splits."""
    from medcae.cli.tracking import log_job, tracking_uri
    from medcae.distributed.pipeline import list_sources, resolved_backbone, smoke_config
    from medcae.distributed.runtime import shutdown_ray
    from medcae.distributed.study import run_study
    from medcae.labeling.study import SMOKE_STUDY, StudyConfig, summarize

    cfg, seeds, study = config_from_args(a), list(range(a.seeds)), StudyConfig()
    if a.smoke_test:
        cfg, seeds, study = smoke_config(cfg), [0], SMOKE_STUDY
    cfg = resolved_backbone(cfg)
    sources = list_sources(cfg, a.data_dir, a.smoke_test)  # bad input fails before Ray
    single_label_only(sources[0], "evaluate --active")
    study.schedule(len(sources[0].label_names))  # so does a start above the last round
    out = Path(a.out)
    setup_run_logging(out)
    start = time.perf_counter()
    ds, feats = open_store(a, cfg, sources)
    rows = run_study(feats, cfg, study, seeds, list(ds.label_names))
    shutdown_ray()  # no process of a local Ray outlives the job
    wall = time.perf_counter() - start
    from medcae.labeling.report import write_study

    table = write_study(out, ds.name, rows, study, len(seeds), wall)
    log_job(
        tracking_uri(a.mlflow),
        "medcae-evaluate-active",
        out.name,
        {**cfg.to_dict(), "study": study.to_dict(), "seeds": len(seeds)},
        metrics={f"{r['strategy']}.{r['n_labels']}.auc": r["auc"] for r in summarize(rows)},
        artifacts={"report": out},
    )
    print(table)
    print(f"\nwall time {wall / 60:.1f} min; report: {out / 'active.md'}; log: {out / 'run.log'}")
    return 0

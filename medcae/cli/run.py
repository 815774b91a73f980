"""``medcae run`` and ``medcae train``: one job, one road to a bundle (``ray_jobs/pipeline.py``,
``ray_jobs/train.py``).

Rows are listed (and bad input refused) before Ray starts; then the feature store is built or
reused, Ray Train trains the CAE with checkpoints under ``--storage-path/--name`` (the same
pair resumes a killed run), a Ray Data stage embeds every split, the classifier is fitted and
the bundle written. The console ends with the results table, a short ``MEDCAE_RESULT {json}``
line (scalars; ``results`` names ``results.json``, which holds the history, reports and
config), then ``results:`` and ``model bundle:``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from medcae.cli.args import config_from_args, default_store_root
from medcae.cli.checks import check_budget
from medcae.cli.logs import print_summary, route_ray_output, setup_run_logging
from medcae.cli.models import register_bundle
from medcae.cli.tracking import log_job, tracking_uri

if TYPE_CHECKING:
    from medcae.distributed.pipeline import RunPaths

RESULT_TAG = "MEDCAE_RESULT"


def main(args: argparse.Namespace) -> int:
    from medcae.distributed.pipeline import (
        list_sources,
        resolved_backbone,
        run_pipeline,
        smoke_config,
    )
    from medcae.distributed.runtime import init_ray, shutdown_ray
    from medcae.distributed.store import ExtractOptions
    from medcae.model.features import FeatureExtractor
    from medcae.model.runtimes import resolve_runtime

    cfg = config_from_args(args)
    if args.smoke_test:
        cfg = smoke_config(cfg)
        if args.epochs is not None:  # an explicit --epochs wins over the smoke default
            cfg = replace(cfg, cae=replace(cfg.cae, epochs=args.epochs))
    cfg = resolved_backbone(cfg)
    # Missing weights or a runtime that cannot run here: one clear error before Ray starts
    # (the PyTorch build only loads the weights; graphs are exported where they run).
    FeatureExtractor(cfg.backbone, runtime="torch")
    resolve_runtime(
        cfg.train.runtime, "cuda" if cfg.train.use_gpu else "cpu", cfg.backbone.precision
    )
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    sources = list_sources(cfg, args.data_dir, args.smoke_test)  # bad input fails before Ray
    check_budget(sources[0], cfg.classifier.budget, cfg.classifier.seed)
    paths = run_paths(args, out)
    extract = ExtractOptions(
        cfg.train.extract_batch_size,
        cfg.train.extract_actors,
        cfg.train.use_gpu,
        cfg.train.extract_threads,
        runtime=cfg.train.runtime,
    )
    log_file = setup_run_logging(out)
    init_ray(args.address, args.num_cpus)
    route_ray_output()
    try:
        res = run_pipeline(cfg, paths, sources, extract)
    finally:  # flush worker logs before the summary, so it is the last thing printed; and
        shutdown_ray()  # no process of a local Ray outlives the job
    tr = res.training
    results = out / "results.json"  # the whole result: history, reports, config, skipped files
    summary = {
        "bundle": str(res.bundle.resolve()),
        "name": paths.name,
        "checkpoint": tr.checkpoint,
        "epochs": len(tr.history),
        "final_train_loss": tr.history[-1]["train_loss"],
        "final_val_loss": tr.history[-1]["val_loss"],
        "restored_from_epoch": tr.restored_from,
        "best_epoch": tr.history[-1].get("best_epoch", len(tr.history)),
        "worker_nodes": tr.worker_nodes,
        "features_reused": res.store.reused,
        "feature_store": res.store.uri,
        "feature_rows": res.store.rows,
        "skipped": len(res.store.skipped),
        "timings": res.timings,
        "results": str(results.resolve()),
        "log": str(log_file.resolve()),
    }  # short and machine-readable: the history, reports and config are in results.json
    lines = [
        f"\nTest-set results ({cfg.data}, {len(tr.history)} CAE epochs"
        + _stopped(tr.history, cfg.cae.epochs)
        + (f", resumed from epoch {tr.restored_from}" if tr.restored_from else "")
        + f", labels: budget {cfg.classifier.budget}):\n",
        res.table,
        *(f"skipped unreadable image: {path}: {reason}" for path, reason in res.skipped),
        f"\nfeature store: {'reused' if res.store.reused else 'built'} {res.store.uri} "
        f"(features {res.timings['features_s']:.1f}s, CAE {res.timings['train_s']:.1f}s on "
        f"{len(set(tr.worker_nodes))} node(s), {len(tr.worker_nodes)} worker(s), "
        f"total {res.timings['total_s']:.1f}s)",
        f"resume with: --storage-path {paths.storage_path} --name {paths.name}",
        f"log: {log_file.resolve()}",
        f"{RESULT_TAG} {json.dumps(summary, default=float)}",
        f"results: {results.resolve()}",
        f"model bundle: {res.bundle.resolve()}",
    ]
    log_job(
        tracking_uri(args.mlflow),
        "medcae-run",
        paths.name or out.name,
        cfg.to_dict(),
        metrics=_report_metrics(res.reports),
        series={k: [h[k] for h in tr.history] for k in ("train_loss", "val_loss")},
        artifacts={"bundle": res.bundle, "logs": log_file},
        tags={"data": str(cfg.data), "feature_store": res.store.uri},
    )
    registered, code = register_bundle(args, res.bundle)  # the run is safe on disk
    if registered:
        lines.insert(-3, registered)  # the last three stay RESULT, results, model bundle
    print_summary(lines)
    return code


def run_paths(args: argparse.Namespace, out: Path) -> RunPaths:
    """Where a job run from ``args`` reads and writes (``--feature-store``, ``--storage-path``,
    ``--name``, ``--materialize``), its output folder ``out``."""
    from medcae.distributed.pipeline import RunPaths

    return RunPaths(
        out,
        args.feature_store or default_store_root(),
        args.storage_path or str(out / "checkpoints"),
        args.name,
        args.materialize,
    )


def _report_metrics(reports: dict) -> dict[str, float]:
    """``{"cae.test.auc": 0.93, ...}``: every number in the run's per-method reports, and
    the decisions' worth (:func:`_decision_metrics`)."""
    out = {}
    for method, report in (reports or {}).items():
        out.update({f"{method}.{k}": v for k, v in _decision_metrics(report or {}).items()})
        for key, value in (report or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"{method}.{key}"] = float(value)
            elif isinstance(value, dict):
                for k, v in value.items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        out[f"{method}.{key}.{k}"] = float(v)
    return out


def _decision_metrics(report: dict) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, accuracy and the AUC at the operating point with
    their interval bounds (``sensitivity``, ``sensitivity.ci_low``, ...), ECE/Brier/log-loss
    before and after calibration, and for findings each one's and the macro means."""
    out: dict[str, float] = {}

    def proportions(prefix: str, d: dict) -> None:
        for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "auc"):
            p = d.get(key)
            if isinstance(p, dict) and isinstance(p.get("value"), int | float):
                out[f"{prefix}{key}"] = float(p["value"])
                low, high = p.get("ci") or (None, None)
                if low is not None:
                    out[f"{prefix}{key}.ci_low"], out[f"{prefix}{key}.ci_high"] = low, high

    decision = report.get("decision") or {}
    proportions("", decision)
    for name, d in (decision.get("per_finding") or {}).items():
        proportions(f"finding.{name}.", d)
    for key, v in (decision.get("macro") or {}).items():
        out[f"macro.{key}"] = float(v)
    for when, r in (report.get("calibration") or {}).items():
        if when in ("before", "after") and isinstance(r, dict):
            for key in ("ece", "brier", "log_loss"):
                out[f"calibration.{when}.{key}"] = float(r[key])
    return out


def _stopped(history: list[dict], epochs: int) -> str:
    """``, stopped early: best validation reconstruction at epoch 4`` when it did."""
    best = history[-1].get("best_epoch") if history else None
    if best is None or (len(history) == epochs and best == epochs):
        return ""
    early = "stopped early, " if len(history) < epochs else ""
    return f", {early}weights of epoch {best} (best validation reconstruction)"

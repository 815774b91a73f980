"""``medcae evaluate``: the paper's method against transfer-learned features, a pixel CAE and
fine-tuning (``ray_jobs/evaluate.py``).

Same data, splits, classifier and label budgets for every method, several seeds; methods run as
Ray tasks. Writes report.md (table + conclusions data), results.csv, PNG plots and run.log to
``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medcae.finetune import FinetuneConfig
    from medcae.study import StudyConfig

from medcae.jobargs import config_from_args, default_store_root
from medcae.jobs.logs import route_ray_output, setup_run_logging

SMOKE_BUDGETS: list[float | int] = [0.1, 1.0, 5]


def command_line() -> str:
    """The command as typed: ``python ray_jobs/evaluate.py ...`` or ``medcae evaluate ...``."""
    if sys.argv[0].endswith(".py"):
        return " ".join(["python", *sys.argv])
    return " ".join(["medcae", *sys.argv[1:]])


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
    from medcae.evidence import METHODS
    from medcae.finetune import FinetuneConfig

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
        from medcae.evidence import hierarchical

        hierarchical(cfg)  # fewer than two taps: one error line before Ray
    sources = list_sources(cfg, a.data_dir, a.smoke_test)  # bad input fails before Ray
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
    table = write_report(out, ds, cfg, rows, examples, budgets, ft, wall)
    from medcae.evidence import aggregate
    from medcae.jobs.tracking import log_job, tracking_uri

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


def finetune_text(rows: list[dict], ft: FinetuneConfig, resolution: int) -> str:
    """What the fine-tuning reference trained, for how long, at what cost, per budget."""
    import numpy as np

    runs = [r for r in rows if r.get("finetune")]
    head = (
        f"the whole backbone + a linear head at {ft.resolution or resolution} px, "
        f"frozen batch-norm statistics, AdamW (backbone lr {ft.lr:g}, head x{ft.head_lr_mult:g}), "
        f"warm-up + cosine, augmentation, up to {ft.epochs} epochs of at least "
        f"{-(-ft.min_steps // ft.epochs)} steps, early stopping on validation AUC (patience "
        f"{ft.patience}), best epoch restored"
    )
    per_budget = {}
    for r in runs:
        per_budget.setdefault(r["budget"], []).append(r["finetune"])
    mean = lambda fs, k: np.mean([f[k] for f in fs])  # noqa: E731
    parts = [
        f"{b:g}: best epoch {mean(fs, 'best_epoch'):.1f} of {mean(fs, 'epochs_run'):.1f} run, "
        f"{mean(fs, 'steps'):.0f} steps, {mean(fs, 'seconds'):.0f} s per run"
        for b, fs in sorted(per_budget.items())
    ]
    return head + (" (" + "; ".join(parts) + ")" if parts else "") + "."


def finetune_clause(rows: list[dict], ft: FinetuneConfig, resolution: int) -> str:
    """``; fine-tuning ...`` for the report's header when fine-tuning ran, else ``.``."""
    if not any(r.get("finetune") for r in rows):
        return "."
    return f"; fine-tuning {finetune_text(rows, ft, resolution)}"


def write_report(
    out: Path,
    ds: Any,
    cfg: Any,
    rows: list[dict],
    examples: dict | None,
    budgets: list[float | int],
    ft: FinetuneConfig,
    wall: float,
) -> str:
    """Write results.csv, the plots and report.md to ``out``; returns the evidence table."""
    import numpy as np

    from medcae.evidence import QUOTED, aggregate
    from medcae.report import (
        evidence_table,
        plot_auc_vs_budget,
        plot_confusion,
        plot_reconstructions,
    )

    agg = aggregate(rows)
    with open(out / "results.csv", "w", newline="") as f:
        scalar = dict.fromkeys(  # every row's scalar columns, in first-seen order
            k for r in rows for k, v in r.items() if not isinstance(v, dict | list)
        )
        w = csv.DictWriter(f, fieldnames=list(scalar), extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)
    plot_auc_vs_budget(agg, out / "auc_vs_budget.png")
    full = max(
        (r for r in agg if r["budget"] == max(budgets, key=lambda b: b if b <= 1 else 0)),
        key=lambda r: r["auc"],
    )
    conf = next(
        r["confusion"]
        for r in rows
        if r["method"] == full["method"] and r["budget"] == full["budget"] and r["seed"] == 0
    )
    plot_confusion(
        conf,
        ds.label_names,
        f"{full['method']}, {full['budget']:g} labels, seed 0",
        out / "confusion_best.png",
    )
    if examples is not None:
        plot_reconstructions(examples, out / "reconstructions.png")
        np.savez(out / "reconstructions.npz", **examples)
    table = evidence_table(agg, QUOTED.get(cfg.data, {}))
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)"
    report = (
        f"# medcae evidence: {ds.name}\n\nCommand: `{command_line()}`  \nMachine: {machine}  \n"
        f"Wall time: {wall / 60:.1f} min  \nBackbone: {cfg.backbone.name} "
        f"{'+'.join(cfg.backbone.taps)} at {cfg.backbone.resolution}px; CAE "
        f"{cfg.cae.channels}->{cfg.cae.latent_channels}, {cfg.cae.epochs} epochs; "
        f"classifier {cfg.classifier.kind} (C on validation AUC)"
        f"{finetune_clause(rows, ft, cfg.backbone.resolution)}\n\n{table}\n\n"
        "![AUC vs budget](auc_vs_budget.png) ![confusion](confusion_best.png) "
        "![reconstructions](reconstructions.png)\n"
    )
    (out / "report.md").write_text(report)
    return table


def main_active(a: argparse.Namespace) -> int:
    """``--active``: the simulated labeling study (:mod:`medcae.study`) on the store's splits."""
    from medcae.distributed.pipeline import list_sources, resolved_backbone, smoke_config
    from medcae.distributed.runtime import shutdown_ray
    from medcae.distributed.study import run_study
    from medcae.jobs.tracking import log_job, tracking_uri
    from medcae.study import SMOKE_STUDY, StudyConfig, summarize

    cfg, seeds, study = config_from_args(a), list(range(a.seeds)), StudyConfig()
    if a.smoke_test:
        cfg, seeds, study = smoke_config(cfg), [0], SMOKE_STUDY
    cfg = resolved_backbone(cfg)
    sources = list_sources(cfg, a.data_dir, a.smoke_test)  # bad input fails before Ray
    study.schedule(len(sources[0].label_names))  # so does a start above the last round
    out = Path(a.out)
    setup_run_logging(out)
    start = time.perf_counter()
    ds, feats = open_store(a, cfg, sources)
    rows = run_study(feats, cfg, study, seeds, list(ds.label_names))
    shutdown_ray()  # no process of a local Ray outlives the job
    wall = time.perf_counter() - start
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


def write_study(
    out: Path, name: str, rows: list[dict], study: StudyConfig, seeds: int, wall: float
) -> str:
    """Write active.csv, active_auc.png and active.md to ``out``; returns the table and the
    verdict."""
    from medcae.report import plot_active
    from medcae.study import COLUMNS, goal, study_table, summarize

    with open(out / "active.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    agg = summarize(rows)
    plot_active(agg, out / "active_auc.png", f"{name}, {seeds} seed(s)")
    verdict = goal(agg)
    table = study_table(agg) + ("\n\n" + verdict.text() if verdict else "")
    (out / "active.md").write_text(study_text(name, study, seeds, wall, rows, table))
    return table


def study_text(
    name: str, study: StudyConfig, seeds: int, wall: float, rows: list[dict], table: str
) -> str:
    """active.md: the command, the design, the table and the verdict."""
    from medcae.study import delegation_text

    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)"
    delegated = delegation_text(rows)
    return (
        f"# Which images to label next: {name}\n\nCommand: `{command_line()}`  \n"
        f"Machine: {machine}  \nWall time: {wall / 60:.1f} min\n\n"
        f"The training split is the pool and its labels the oracle. Each seed trains its CAE "
        f"once and draws {study.start_per_class} labels per class at random (the same start "
        f"for every strategy); each round then labels the {study.step} images the strategy "
        f"ranks first, up to {study.max_labels} labels. After every round the default head "
        "(`cae_ensemble`: a logistic head on the CAE codes and one on the pooled tap, logits "
        "averaged, each C chosen on validation AUC) is refitted on exactly the labeled images "
        "and scored on the test split, which nothing else sees. `margin` ranks by the current "
        "head's probabilities, `typiclust` clusters its input vectors (codes + tap, "
        "standardized)"
        + (f"; {delegated}" if delegated else "")
        + f".\n\nTest AUC, mean ± std over {seeds} seed(s) (bold: the best of the row):\n\n"
        f"{table}\n\n![test AUC against labels](active_auc.png)\n"
    )

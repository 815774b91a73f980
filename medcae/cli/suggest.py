"""``medcae suggest --bundle B --pool PATH --k 50 [--labeled CSV]``: which images to label next.

Bad input (no bundle, no image in the pool, ``--k`` below 1, an unknown strategy, a labeled CSV
without a ``path`` or ``label`` column, an output folder holding another ``labels.csv``) is one
``error:`` line before Ray starts. Then the batch-prediction stage
(:func:`medcae.distributed.predict.predict_files`, asked for the classifier's input vectors too)
predicts every pool image into ``<out>/pool.parquet``, unreadable files skipped and listed; the
driver ranks the pool with :mod:`medcae.labeling.strategies` and writes the files of
:mod:`medcae.labeling.suggestions`.

After labeling: fill in the ``label`` column of ``<out>/labels.csv`` (class names or indices;
rows left empty are skipped), then ``medcae run --data <out>/labels.csv --unlabeled POOL``
trains on them, and ``medcae suggest --labeled <out>/labels.csv ...`` asks for the next round.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcae.cli.logs import print_summary, route_ray_output, setup_run_logging
from medcae.cli.predict import SHOWN_SKIPPED, check_stage_sizes

if TYPE_CHECKING:
    from medcae.data import Rows
    from medcae.distributed.predict import BatchResult
    from medcae.labeling.strategies import Pool, Suggestions
    from medcae.labeling.suggestions import Labeled, Row, SuggestPaths

progress = logging.getLogger("medcae.progress")


@dataclass(frozen=True)
class Outcome:
    """What one run suggested and wrote.

    Attributes:
        batch: The prediction stage's result.
        suggestions: The ranking.
        picked: The suggested images, best first.
        labeled_in_pool: Labeled images found in the pool.
        labels: ``labels.csv``, or None for a pool of in-memory rows (Parquet, ``.npz``).
    """

    batch: BatchResult
    suggestions: Suggestions
    picked: list[Row]
    labeled_in_pool: int
    labels: Path | None


def main(args: argparse.Namespace) -> int:
    from medcae.config import ConfigError
    from medcae.data import list_unlabeled_rows
    from medcae.inference.predictor import check_bundle
    from medcae.labeling.strategies import get_strategy
    from medcae.labeling.suggestions import SuggestPaths, no_labels, read_labeled

    check_stage_sizes(args)
    if args.k < 1:
        raise ConfigError(f"--k {args.k}: expected at least 1")
    get_strategy(args.strategy)
    meta, cfg = check_bundle(args.bundle, runtime=args.runtime)
    names = list(meta["label_names"])
    multilabel = meta.get("task") == "multilabel"
    rows = list_unlabeled_rows(args.pool)  # no image found: DataError
    labeled = (
        read_labeled(args.labeled, names, multilabel) if args.labeled else no_labels(multilabel)
    )
    paths = SuggestPaths.under(args.out or _default_out(), labeled.source)
    setup_run_logging(paths.out, paths.batch.log.name)
    batch = _predict(args, rows, names, cfg.backbone.resolution, paths, multilabel)
    outcome = _suggest(args, batch, rows, labeled, names, paths, _thresholds(meta))
    threshold = float(meta.get("ood", {}).get("threshold", float("inf")))
    print_summary(summary(args, outcome, paths, labeled, threshold))
    return 0


def _default_out() -> str:
    return f"runs/suggest-{time.strftime('%Y%m%d-%H%M%S')}"


def _thresholds(meta: dict) -> Any:
    """A multi-label bundle's thresholds in finding order (0.5 where it has none), else None."""
    import numpy as np

    if meta.get("task") != "multilabel":
        return None
    ops = (meta.get("operating_point") or {}).get("findings", {})
    return np.array([(ops.get(n) or {}).get("threshold", 0.5) for n in meta["label_names"]])


def _predict(
    args: argparse.Namespace,
    rows: Rows,
    names: list[str],
    resolution: int,
    paths: SuggestPaths,
    findings: bool = False,
) -> BatchResult:
    """The pool through the batch-prediction stage, with vectors, into ``pool.parquet``."""
    from medcae.data import DataError
    from medcae.distributed.predict import PredictOptions, predict_files
    from medcae.distributed.runtime import init_ray, shutdown_ray

    opts = PredictOptions(
        args.batch_size, args.actors, args.threads, args.runtime, vectors=True, findings=findings
    )
    init_ray(args.address, args.num_cpus)
    route_ray_output()
    try:
        bundle = str(Path(args.bundle).resolve())
        res = predict_files(rows, bundle, names, resolution, paths.batch, opts)
    finally:
        shutdown_ray()  # no process of a local Ray outlives the job
    if res.rows == 0:
        raise DataError(
            f"{args.pool}: none of the {res.listed} listed images could be read; "
            f"the reasons are in {paths.batch.skipped}"
        )
    return res


def _suggest(
    args: argparse.Namespace,
    batch: BatchResult,
    rows: Rows,
    labeled: Labeled,
    names: list[str],
    paths: SuggestPaths,
    thresholds: Any = None,
) -> Outcome:
    """Rank the pool on the driver and write the files."""
    import pyarrow.parquet as pq

    from medcae.labeling.suggestions import pool_from_table, rows_of

    table = pq.read_table(paths.batch.parquet).sort_by("path")
    pool, _ = pool_from_table(table, labeled, len(names), thresholds)
    found = _rank(args, pool)
    picked = rows_of(table, found.ranking.indices)
    labels = _write(paths, table, rows, labeled, found, picked)
    return Outcome(batch, found, picked, int(pool.labeled.sum()), labels)


def _rank(args: argparse.Namespace, pool: Pool) -> Suggestions:
    """:func:`medcae.labeling.strategies.suggest`, with its console line.

    Raises:
        DataError: No image is left to rank.
    """
    from medcae.data import DataError
    from medcae.labeling.strategies import suggest

    t0 = time.perf_counter()
    found = suggest(pool, args.k, args.strategy, args.seed, args.include_ood)
    n, ood = len(found.ranking.indices), len(found.out_of_distribution)
    if n == 0:
        raise DataError(
            f"{args.pool}: no image left to suggest among the {len(pool)} read: "
            f"{int(pool.labeled.sum())} labeled, {ood} out of distribution (--include-ood "
            "ranks those)"
        )
    progress.info(
        "rank: %s over %d images (%d labeled, %d out of distribution left out): %d picks in %.1fs",
        found.ranking.strategy,
        found.candidates,
        int(pool.labeled.sum()),
        ood,
        n,
        time.perf_counter() - t0,
    )
    if n < args.k:
        progress.warning("only %d images were left to suggest, fewer than --k %d", n, args.k)
    return found


def _write(
    paths: SuggestPaths,
    table: Any,
    rows: Rows,
    labeled: Labeled,
    found: Suggestions,
    picked: list[Row],
) -> Path | None:
    """``suggestions.csv``, ``out_of_distribution.csv``, the contact sheet and (for a pool of
    files) ``labels.csv``; returns the path of the last, or None."""
    from medcae.labeling.suggestions import rows_of, write_labels, write_ood, write_suggestions

    write_suggestions(paths.suggestions, picked, found)
    write_ood(paths.ood, rows_of(table, found.out_of_distribution))
    _sheet(paths, rows, found, picked)
    if "path" not in rows.table.column_names:
        return None
    write_labels(paths.labels, labeled, [r.path for r in picked])
    return paths.labels


def _sheet(paths: SuggestPaths, rows: Rows, found: Suggestions, picked: list[Row]) -> None:
    """The contact sheet, with its console line."""
    from medcae.labeling.suggestions import SHEET_MAX, contact_sheet, thumbnails

    t0 = time.perf_counter()
    shown = picked[:SHEET_MAX]
    images = thumbnails(rows.table, [r.path for r in shown])
    captions = [
        f"#{i} {r.predicted_label}\nscore {s:.3g}"
        for i, (r, s) in enumerate(zip(shown, found.ranking.scores), start=1)
    ]
    title = f"{found.ranking.strategy}: {len(picked)} of {found.candidates} images to label next"
    contact_sheet(images, captions, paths.sheet, title)
    progress.info("contact sheet: %d thumbnails in %.1fs", len(shown), time.perf_counter() - t0)


def summary(
    args: argparse.Namespace,
    res: Outcome,
    paths: SuggestPaths,
    labeled: Labeled,
    threshold: float,
) -> list[str]:
    """The closing lines: what was suggested and left out, the files, and the next step."""
    b, found = res.batch, res.suggestions
    ood = len(found.out_of_distribution)
    lines = [
        f"\nsuggested {len(res.picked)} of {found.candidates} images "
        f"({found.ranking.strategy}, {b.rows} of {b.listed} read in {b.seconds:.1f}s): "
        f"{paths.suggestions}",
        f"contact sheet: {paths.sheet}",
        f"left out {ood} out-of-distribution image(s) (reconstruction error above "
        f"{threshold:.4g}): {paths.ood}"
        if not args.include_ood
        else f"out-of-distribution images ranked too (--include-ood), none left out: {paths.ood}",
        f"labels known: {len(labeled.paths)} ({res.labeled_in_pool} in the pool)",
        f"skipped {len(b.skipped)} unreadable image(s), listed in {paths.batch.skipped}",
        *(f"  {path}: {reason}" for path, reason in b.skipped[:SHOWN_SKIPPED]),
    ]
    if len(b.skipped) > SHOWN_SKIPPED:
        lines.append(f"  ... and {len(b.skipped) - SHOWN_SKIPPED} more")
    lines.append(f"predictions and vectors of the pool: {paths.batch.parquet}")
    return [*lines, *_next_step(args, res.labels), f"log: {paths.batch.log}"]


def _next_step(args: argparse.Namespace, labels: Path | None) -> list[str]:
    if labels is None:
        return ["the pool is not a set of files: suggestions.csv names its rows by id"]
    return [
        f"next: fill in the label column of {labels} (empty rows are skipped), then",
        f"  medcae run --data {labels} --unlabeled {args.pool}",
        f"  medcae suggest --bundle NEW_BUNDLE --pool {args.pool} --labeled {labels} "
        f"--k {args.k} --out {labels.parent}",
    ]

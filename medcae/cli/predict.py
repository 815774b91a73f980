"""``medcae predict --bundle B --data PATH --out preds.parquet``: a bundle over a whole archive.

The bundle, the listing and the output folder are checked before Ray starts, so bad input is one
``error:`` line. Then Ray Data reads and decodes the files, an actor pool runs the bundle's
Predictor, and the driver writes ``preds.parquet`` (one row per image), ``preds.skipped.csv``
(unreadable images, never fatal), ``preds.csv`` with ``--csv`` and ``preds.log``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from medcae.cli.logs import print_summary, route_ray_output, setup_run_logging

if TYPE_CHECKING:
    from medcae.data import Rows
    from medcae.distributed.predict import BatchResult
    from medcae.inference.predictions import OutputPaths

#: Skipped images named on the console; the rest are in ``preds.skipped.csv``.
SHOWN_SKIPPED = 20


def main(args: argparse.Namespace) -> int:
    from medcae.data import DataError, list_unlabeled_rows
    from medcae.inference.predictions import OutputPaths
    from medcae.inference.predictor import check_bundle

    check_stage_sizes(args)
    meta, cfg = check_bundle(args.bundle, runtime=args.runtime)
    rows = list_unlabeled_rows(args.data)  # no image found: DataError
    paths = OutputPaths.beside(args.out)
    setup_run_logging(paths.log.parent, paths.log.name)
    res = _run(args, rows, meta, cfg.backbone.resolution, paths)
    if res.rows == 0:
        raise DataError(
            f"{args.data}: none of the {res.listed} listed images could be read; "
            f"the reasons are in {paths.skipped}"
        )
    print_summary([*summary(res), decision_line(meta)])
    return 0


def decision_line(meta: dict) -> str:
    """How the labels were decided: the bundle's operating point(s), in one line."""
    op, names = meta.get("operating_point") or {}, meta.get("label_names", [])
    if "findings" in op:
        each = ", ".join(
            f"{n} >= {op['findings'][n]['threshold']:.3f}" for n in names if n in op["findings"]
        )
        return f"labels: each finding at its own threshold ({each}); finding_<name> columns"
    if op.get("threshold") is not None and op.get("positive") is not None:
        rule = op["rule"] + (f"={op['target']:g}" if op.get("target") is not None else "")
        return (
            f"labels: {names[op['positive']]} when p_{names[op['positive']]} >= "
            f"{op['threshold']:.4f} (operating point {rule}, chosen on validation; the "
            "threshold column)"
        )
    if op:
        return "labels: the most probable class (operating point argmax)"
    return "labels: the most probable class (a bundle from before operating points)"


def check_stage_sizes(args: argparse.Namespace) -> None:
    """``--batch-size``, ``--actors`` and ``--threads`` in range, before Ray starts.

    Raises:
        ConfigError: The first flag out of range, named with its value.
    """
    from medcae.config import ConfigError

    for flag, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--actors", args.actors, 1),
        ("--threads", args.threads, 0),
    ):
        if value < least:
            raise ConfigError(f"{flag} {value}: expected at least {least}")


def _run(
    args: argparse.Namespace,
    rows: Rows,
    meta: dict,
    resolution: int,
    paths: OutputPaths,
) -> BatchResult:
    from medcae.distributed.predict import PredictOptions, predict_files
    from medcae.distributed.runtime import init_ray, shutdown_ray

    label_names = meta["label_names"]
    findings = meta.get("task") == "multilabel"
    opts = PredictOptions(
        args.batch_size, args.actors, args.threads, args.runtime, args.csv, findings=findings
    )
    init_ray(args.address, args.num_cpus)
    route_ray_output()
    try:
        bundle = str(Path(args.bundle).resolve())
        return predict_files(rows, bundle, label_names, resolution, paths, opts)
    finally:
        shutdown_ray()  # no process of a local Ray outlives the job


def summary(res: BatchResult) -> list[str]:
    """The closing lines: what was written, what was skipped and why, where the log is."""
    p = res.paths
    lines = [
        f"\npredicted {res.rows} of {res.listed} images in {res.seconds:.1f}s: {p.parquet}",
        *([f"csv: {p.csv}"] if res.csv else []),
        f"skipped {len(res.skipped)} unreadable image(s), listed in {p.skipped}",
    ]
    lines += [f"  {path}: {reason}" for path, reason in res.skipped[:SHOWN_SKIPPED]]
    if len(res.skipped) > SHOWN_SKIPPED:
        lines.append(f"  ... and {len(res.skipped) - SHOWN_SKIPPED} more")
    return [*lines, f"log: {p.log}"]

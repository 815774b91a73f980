"""The files of ``medcae suggest``, and the pool's prediction table as
:class:`~medcae.labeling.strategies.Pool`.

In the output folder:

- ``suggestions.csv``: the top ``k``, best first, columns :data:`SUGGESTION_COLUMNS`. ``score``
  is the strategy's (:mod:`medcae.labeling.strategies`: higher is more worth labeling),
  ``probability``
  that of ``predicted_label``, ``path`` the absolute file path (the listing's id for rows of a
  Parquet or ``.npz`` pool).
- ``suggestions.png``: their thumbnails in a grid, each captioned with rank, predicted label
  and score.
- ``out_of_distribution.csv``: ``path, reconstruction_error, predicted_label, probability`` of
  the unlabeled images the bundle's out-of-distribution check flagged, left out of the ranking
  (unless ``--include-ood``), largest error first.
- ``labels.csv``: the file to label (pools of files only): ``path,label`` rows, those of
  ``--labeled`` first, then the suggestions with an empty ``label``. It is the format
  ``medcae run --data`` reads (:func:`medcae.data.tables.list_csv`: rows whose label is still
  empty are skipped), and the ``--labeled`` of the next round.
- ``pool.parquet`` (the batch-prediction table of every pool image, with its ``vector``),
  ``skipped.csv`` (unreadable images) and ``run.log``.

Each CSV is written to a temporary name and renamed into place. Ray-free.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medcae.data import DataError
from medcae.inference.predictions import OutputPaths, atomic_file, list_matrix
from medcae.labeling.strategies import Pool, Suggestions

SUGGESTION_COLUMNS = (
    "path",
    "rank",
    "score",
    "strategy",
    "predicted_label",
    "probability",
    "reconstruction_error",
    "in_distribution",
)
OOD_COLUMNS = ("path", "reconstruction_error", "predicted_label", "probability")
#: Side of a contact-sheet thumbnail, pixels; thumbnails per row.
THUMB, SHEET_COLUMNS = 128, 6
#: Most thumbnails on the contact sheet (the CSV holds every suggestion).
SHEET_MAX = 120


# --------------------------------------------------------------------------- --labeled


@dataclass(frozen=True)
class Labeled:
    """Images already labeled, from ``--labeled`` (rows with an empty label left out).

    Attributes:
        source: The CSV, or None when none was given.
        paths: Absolute paths (relative ones in the CSV are relative to its folder).
        labels: The label cells as written (class names or indices).
        classes: int ``(n,)`` the bundle's class of each row (for findings, their bitmask).
        split: The ``split`` cells, or None when the CSV has no such column.
        multilabel: Rows list findings (a ``labels`` column, ``|`` between findings).
    """

    source: Path | None
    paths: list[str]
    labels: list[str]
    classes: np.ndarray
    split: list[str] | None = None
    multilabel: bool = False

    def class_counts(self, num_classes: int) -> np.ndarray:
        """int ``(K,)`` labels per class (for findings, positive labels per finding)."""
        if self.multilabel:
            from medcae.data.findings import decode

            return decode(self.classes, num_classes).sum(axis=0)
        return np.bincount(self.classes, minlength=num_classes)


def no_labels(multilabel: bool = False) -> Labeled:
    """The :class:`Labeled` of a cold start."""
    return Labeled(None, [], [], np.zeros(0, np.int64), multilabel=multilabel)


def read_labeled(path: str | Path, label_names: Sequence[str], multilabel: bool = False) -> Labeled:
    """Read a ``path,label[,split]`` CSV, the format of ``medcae run --data`` (for findings,
    ``path,labels[,split]`` with ``|`` between findings, an empty cell or ``No Finding``
    meaning none).

    Args:
        path: The CSV.
        label_names: The bundle's classes (or findings); a label is one of them or its index.
        multilabel: The bundle is multi-label.

    Raises:
        DataError: Unreadable file, no ``path`` or ``label`` column (the message names the
            file, the columns found and those expected), or a label the bundle lacks.
    """
    from medcae.data.tables import _read_csv

    path = Path(path).expanduser()
    if multilabel:
        return _read_findings(path, label_names)
    header, rows = _read_csv(path, ("path", "label"))
    kept = [(i, r) for i, r in enumerate(rows) if r.get("path") and r.get("label")]
    classes = [_class_of(r["label"], label_names, f"{path}#row={i}") for i, r in kept]
    return Labeled(
        path,
        [os.path.abspath(path.parent / os.path.expanduser(r["path"])) for _, r in kept],
        [r["label"] for _, r in kept],
        np.array(classes, np.int64),
        [r.get("split", "") for _, r in kept] if "split" in header else None,
    )


def _read_findings(path: Path, names: Sequence[str]) -> Labeled:
    """:func:`read_labeled` of a findings CSV; every row with a path is labeled (an empty
    ``labels`` cell is "no finding") unless its cell is ``?`` (not yet labeled)."""
    from medcae.data.findings import NO_FINDING, SEPARATOR
    from medcae.data.tables import _read_csv

    header, rows = _read_csv(path, ("path", "labels"))
    kept = [(i, r) for i, r in enumerate(rows) if r.get("path") and r.get("labels") != "?"]
    masks = []
    for i, r in kept:
        found = [v.strip() for v in r.get("labels", "").split(SEPARATOR) if v.strip()]
        found = [v for v in found if v.lower() != NO_FINDING.lower()]
        unknown = [v for v in found if v not in names]
        if unknown:
            raise DataError(
                f"{path}#row={i}: finding(s) {unknown} were never seen in training; the "
                f"bundle's findings are {list(names)}"
            )
        masks.append(sum(1 << list(names).index(v) for v in set(found)))
    return Labeled(
        path,
        [os.path.abspath(path.parent / os.path.expanduser(r["path"])) for _, r in kept],
        [r.get("labels", "") for _, r in kept],
        np.array(masks, np.int64),
        [r.get("split", "") for _, r in kept] if "split" in header else None,
        multilabel=True,
    )


def _class_of(label: str, label_names: Sequence[str], where: str) -> int:
    if label in label_names:
        return list(label_names).index(label)
    if label.isdigit() and int(label) < len(label_names):
        return int(label)
    raise DataError(
        f"{where}: label {label!r} is none of the bundle's classes {list(label_names)} "
        f"(nor an index 0..{len(label_names) - 1})"
    )


# --------------------------------------------------------------------------- output paths


@dataclass(frozen=True)
class SuggestPaths:
    """The files of one ``medcae suggest`` run, in one folder (see the module docstring).

    Attributes:
        out: The folder.
        batch: ``pool.parquet``, ``skipped.csv`` and ``run.log``, for the prediction stage.
    """

    out: Path
    batch: OutputPaths

    @property
    def suggestions(self) -> Path:
        return self.out / "suggestions.csv"

    @property
    def sheet(self) -> Path:
        return self.out / "suggestions.png"

    @property
    def ood(self) -> Path:
        return self.out / "out_of_distribution.csv"

    @property
    def labels(self) -> Path:
        return self.out / "labels.csv"

    @classmethod
    def under(cls, out: str | Path, labeled: Path | None) -> SuggestPaths:
        """The paths in ``out``, checked: a writable folder whose ``labels.csv``, if any, is
        the ``--labeled`` file (so labels filled in there are never overwritten unread).

        Raises:
            DataError: ``out`` cannot be written, or holds another ``labels.csv``.
        """
        folder = Path(out).expanduser().absolute()
        batch = OutputPaths.beside(folder / "pool.parquet")  # creates and probes the folder
        batch = replace(batch, skipped=folder / "skipped.csv", log=folder / "run.log")
        paths = cls(folder, batch)
        if paths.labels.exists() and not (labeled and os.path.samefile(labeled, paths.labels)):
            raise DataError(
                f"{paths.labels} exists and may hold labels filled in since: pass it as "
                f"--labeled {paths.labels}, or choose another --out"
            )
        return paths


# --------------------------------------------------------------------------- the pool


def pool_from_table(
    table: Any, labeled: Labeled, num_classes: int, thresholds: np.ndarray | None = None
) -> tuple[Pool, list[str]]:
    """The prediction table of ``pool.parquet`` (with ``vector``) as a :class:`Pool`.

    Args:
        table: ``pyarrow.Table`` of :func:`medcae.inference.predictions.prediction_table` rows,
        sorted by
            ``path`` (workers finish in any order; sorted, a seed gives the same picks).
        labeled: The labeled images; those in the table are marked labeled.
        num_classes: K of the bundle.
        thresholds: A multi-label bundle's thresholds, one per finding.

    Returns:
        ``(pool, paths)``: row ``i`` of the pool is ``paths[i]``.
    """
    paths = [str(p) for p in table.column("path").to_pylist()]
    pool = Pool(
        proba=list_matrix(table, "probabilities", np.float64).reshape(len(paths), num_classes),
        vectors=list_matrix(table, "vector") if "vector" in table.column_names else None,
        in_distribution=table.column("in_distribution").to_numpy(zero_copy_only=False),
        labeled=np.isin(paths, labeled.paths),
        class_counts=labeled.class_counts(num_classes),
        thresholds=thresholds,
    )
    return pool, paths


@dataclass(frozen=True)
class Row:
    """One image of a written list."""

    path: str
    predicted_label: str
    probability: float
    reconstruction_error: float
    in_distribution: bool


def rows_of(table: Any, indices: np.ndarray) -> list[Row]:
    """The :class:`Row` of each of ``indices`` (rows of the prediction ``table``), in order."""
    columns = ["path", "label", "probabilities", "reconstruction_error", "in_distribution"]
    picked = table.select(columns).take(np.asarray(indices, np.int64)).to_pylist()
    return [
        Row(r["path"], r["label"], max(r["probabilities"]), r[columns[3]], r[columns[4]])
        for r in picked
    ]


# --------------------------------------------------------------------------- the files


def write_suggestions(path: Path, rows: Sequence[Row], suggestions: Suggestions) -> None:
    """``suggestions.csv``: :data:`SUGGESTION_COLUMNS`, best first (rank 1)."""
    r = suggestions.ranking
    _write_csv(
        path,
        SUGGESTION_COLUMNS,
        [
            (row.path, rank, f"{score:.6g}", r.strategy, row.predicted_label)
            + (f"{row.probability:.6g}", f"{row.reconstruction_error:.6g}")
            + (str(row.in_distribution).lower(),)
            for rank, (row, score) in enumerate(zip(rows, r.scores), start=1)
        ],
    )


def write_ood(path: Path, rows: Sequence[Row]) -> None:
    """``out_of_distribution.csv``: :data:`OOD_COLUMNS`, largest reconstruction error first;
    just the header when nothing was left out."""
    ordered = sorted(rows, key=lambda r: -r.reconstruction_error)
    _write_csv(
        path,
        OOD_COLUMNS,
        [
            (r.path, f"{r.reconstruction_error:.6g}", r.predicted_label, f"{r.probability:.6g}")
            for r in ordered
        ],
    )


def write_labels(path: Path, labeled: Labeled, suggested: Sequence[str]) -> None:
    """``labels.csv``: the labeled rows, then each suggestion with an empty label (and split
    ``train`` when the labeled CSV has a ``split`` column). For findings the column is
    ``labels`` and an unlabeled suggestion holds ``?`` (an empty cell would mean "no
    finding")."""
    column = "labels" if labeled.multilabel else "label"
    header = ["path", column] + (["split"] if labeled.split is not None else [])
    old = [[p, lab] for p, lab in zip(labeled.paths, labeled.labels)]
    new = [[p, "?" if labeled.multilabel else ""] for p in suggested]
    if labeled.split is not None:
        old = [[*row, s] for row, s in zip(old, labeled.split)]
        new = [[*row, "train"] for row in new]
    _write_csv(path, header, old + new)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


# --------------------------------------------------------------------------- contact sheet


def thumbnails(rows_table: Any, ids: Sequence[str]) -> list[np.ndarray | None]:
    """Each image of ``ids`` decoded and shrunk to at most :data:`THUMB` pixels a side; None
    for one that cannot be read here.

    Args:
        rows_table: The pool's listing (:class:`medcae.data.Rows` ``.table``: ``id`` and
            ``path`` or ``data``).
        ids: Listing ids (the ``path`` of the prediction table).
    """
    where = {name: i for i, name in enumerate(rows_table.column("id").to_pylist())}
    column = "path" if "path" in rows_table.column_names else "data"
    cells = rows_table.column(column)
    return [_thumbnail(cells[where[i]].as_py(), i) if i in where else None for i in ids]


def _thumbnail(cell: str | bytes, name: str) -> np.ndarray | None:
    from PIL import Image

    from medcae.data import ImageDecodeError, decode_image

    try:
        data = Path(cell).read_bytes() if isinstance(cell, str) else cell
        image = Image.fromarray(decode_image(data, name, reduce_to=THUMB))
    except (OSError, ImageDecodeError):
        return None
    image.thumbnail((THUMB, THUMB))
    return np.asarray(image)


def contact_sheet(
    images: Sequence[np.ndarray | None], captions: Sequence[str], path: Path, title: str
) -> None:
    """A PNG grid of ``images`` (uint8 ``(H, W)`` or ``(H, W, 3)``; None: a blank cell marked
    unreadable), each above its caption, at most :data:`SHEET_MAX` of them.

    Raises:
        ValueError: No image, or not one caption per image.
    """
    from matplotlib.figure import Figure

    if not images or len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    n = min(len(images), SHEET_MAX)
    cols = min(n, SHEET_COLUMNS)
    grid = math.ceil(n / cols)
    fig = Figure(figsize=(2.0 * cols, 2.35 * grid + 0.5))
    axes = fig.subplots(grid, cols, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i < n:
            _cell(ax, images[i], captions[i])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _cell(ax: Any, image: np.ndarray | None, caption: str) -> None:
    if image is None:
        ax.text(0.5, 0.5, "unreadable here", ha="center", va="center", fontsize=8)
    else:
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    ax.set_title(caption, fontsize=9)

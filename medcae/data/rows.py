"""The listing API: every image of a source as one table row, with nothing decoded.

``list_rows`` and ``list_unlabeled_rows`` resolve sources exactly as ``load_dataset`` and
``load_unlabeled`` do, and return a ``pyarrow.Table`` that a distributed reader (Ray Data) can
shard: file paths for folders, globs and CSV; encoded bytes for Parquet cells and ``.npz``
arrays (PNG-encoded losslessly, so ``decode_image`` gives back the exact pixels).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcae.data.dataset import SPLITS, Dataset, Skipped
from medcae.data.decode import DataError, encode_png
from medcae.data.findings import NO_FINDING, check_splits
from medcae.data.listing import Listing
from medcae.data.npz import _load_npz, _npz_all_images
from medcae.data.sources import Source, _resolve, is_npz, list_labeled, resolve_unlabeled

UNLABELED = "unlabeled"


@dataclass
class Rows:
    """One row per image; nothing decoded (names and, for in-memory sources, encoded bytes).

    Attributes:
        name: Data set name (file/folder stem, MedMNIST name, ``'synthetic-lesions'`` for demo).
        label_names: Class names, label ``i`` is ``label_names[i]`` (``[]`` for unlabeled-only
            sources).
        table: ``pyarrow.Table`` with columns ``id`` (string: the file path, or
            ``f"{name}:{split}/{index:09d}"`` for in-memory rows, ``index`` counting the split's
            images in source order), ``split`` (string: ``'train'``, ``'val'``, ``'test'`` or
            ``'unlabeled'``), ``label`` (int64 class id, -1 for unlabeled rows), and exactly one
            of ``path`` (string: absolute file path to read; folders, CSV, globs) or ``data``
            (binary: encoded image bytes; ``.npz`` arrays PNG-encoded, Parquet cells).
        skipped: ``(where, reason)`` for rows dropped while listing (e.g. CSV rows whose file
            is missing).
        multilabel: ``label`` holds bitmasks of findings (:mod:`medcae.data.findings`) and
            ``label_names`` the findings.
    """

    name: str
    label_names: list[str]
    table: Any
    skipped: Skipped = field(default_factory=list)
    multilabel: bool = False

    def __len__(self) -> int:
        return int(self.table.num_rows)


def list_rows(
    source: Source,
    data_dir: str | None = None,
    *,
    seed: int = 0,
    download: bool = True,
    label_columns: Sequence[str] = (),
    no_finding: str = NO_FINDING,
) -> Rows:
    """List a labeled source without decoding it.

    Same resolution, label names and error messages as ``load_dataset``. The split of folder,
    CSV and Parquet sources without splits is the stratified seeded 70/15/15 split, computed
    from the labels alone: it equals ``load_dataset``'s whenever every image decodes.

    Args:
        source: An ``.npz`` path, a MedMNIST name, ``"demo"``, a class folder or
            ``train/ val/ test/`` folders, a ``.csv`` or a ``.parquet`` file.
        data_dir: Where named data sets live (see ``load_dataset``).
        seed: Seed of the stratified split.
        download: Download a named MedMNIST data set when it is missing.
        label_columns: A CSV's 0/1 finding columns (multi-label).
        no_finding: The name meaning "no finding" in a ``labels`` column (multi-label).

    Returns:
        The rows, ``N`` of them (see :class:`Rows`).

    Raises:
        DataError: As ``load_dataset``, and when no image is listed; for findings, one never
            seen in train or without a positive in val.
    """
    path, name = _resolve(source, data_dir, download)
    if is_npz(path):
        rows = _dataset_rows(_load_npz(path, None, name))
    else:
        listing = list_labeled(path, label_columns, no_finding)
        rows = _listing_rows(listing, listing.assignment(seed))
    if rows.multilabel:
        labels = rows.table.column("label").to_numpy()
        check_splits(labels, rows.table.column("split").to_pylist(), rows.label_names, str(path))
    return rows


def list_unlabeled_rows(source: Source, data_dir: str | None = None) -> Rows:
    """List an unlabeled source: every row gets ``split='unlabeled'`` and ``label=-1``.

    Args:
        source: A folder (recursively), a glob (``"scans/**/*.dcm"``), an ``.npz``, a
            ``.parquet`` with an ``image`` column, a ``.csv`` with a ``path`` column (its
            labels are ignored) or a data set name.
        data_dir: Where named data sets live.

    Returns:
        The rows, with ``label_names == []``.

    Raises:
        DataError: As ``load_unlabeled``, and when no image is listed.
    """
    found = resolve_unlabeled(source, data_dir)
    if isinstance(found, Listing):
        return _listing_rows(found, None)
    path, name = found
    images = _npz_all_images(path, None)
    ids = [f"{name}:{UNLABELED}/{i:09d}" for i in range(len(images))]
    labels = np.full(len(images), -1, np.int64)
    data = [encode_png(image) for image in images]
    table = _table(ids, [UNLABELED] * len(images), labels, "data", data)
    return Rows(name, [], table)


def _table(
    ids: Sequence[str], splits: Sequence[str], labels: np.ndarray, column: str, values: list
) -> Any:
    """``pyarrow.Table`` of ``id, split, label`` and ``column`` (``path`` or ``data``)."""
    import pyarrow as pa

    kind = pa.string() if column == "path" else pa.binary()
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "split": pa.array(splits, pa.string()),
            "label": pa.array(labels, pa.int64()),
            column: pa.array(values, kind),
        }
    )


def _split_ids(name: str, splits: Sequence[str]) -> list[str]:
    """``f"{name}:{split}/{index:09d}"``: ``index`` counts each split's rows from 0, and
    zero-padding makes sorting by id the same as sorting by index."""
    seen: dict[str, int] = {}
    ids = []
    for split in splits:
        ids.append(f"{name}:{split}/{seen.get(split, 0):09d}")
        seen[split] = seen.get(split, 0) + 1
    return ids


def _dataset_rows(dataset: Dataset) -> Rows:
    """Rows of an in-memory data set, every image PNG-encoded."""
    splits, labels, data = [], [], []
    for split in SPLITS:
        part = dataset.splits[split]
        assert part.labels is not None
        splits += [split] * len(part)
        labels.append(part.labels)
        data += [encode_png(image) for image in part.images]
    ids = _split_ids(dataset.name, splits)
    table = _table(ids, splits, np.concatenate(labels), "data", data)
    names = list(dataset.label_names)
    return Rows(dataset.name, names, table, list(dataset.skipped), dataset.multilabel)


def _listing_rows(listing: Listing, assignment: np.ndarray | None) -> Rows:
    """Rows of a listing; ``assignment`` None marks every row unlabeled."""
    if not len(listing):
        raise DataError(f"{listing.source}: no images found ({len(listing.skipped)} skipped)")
    if assignment is None or listing.labels is None:
        splits = [UNLABELED] * len(listing)
        labels = np.full(len(listing), -1, np.int64)
    else:
        splits = [SPLITS[i] for i in assignment]
        labels = listing.labels
    files = [item for item in listing.items if isinstance(item, Path)]
    if len(files) == len(listing):
        paths = [os.path.abspath(f) for f in files]
        table = _table(paths, splits, labels, "path", paths)
    else:  # Parquet cells
        table = _table(_split_ids(listing.name, splits), splits, labels, "data", listing.items)
    multilabel = listing.multilabel and assignment is not None
    return Rows(listing.name, list(listing.label_names), table, listing.skipped, multilabel)

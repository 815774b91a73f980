"""Table sources: Parquet (encoded image bytes per row) and CSV (``path,label[,split]``).

Both are listed without decoding a pixel. pyarrow is imported only when a Parquet file is read.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcae.data.dataset import _skip
from medcae.data.decode import DataError, ImageDecodeError
from medcae.data.findings import NO_FINDING, parse_columns, parse_findings
from medcae.data.listing import Listing
from medcae.data.splits import _parse_splits

_INT = re.compile(r"[+-]?\d+")
_CSV_EXPECTED = (
    "expected a header row naming the columns 'path' (relative to the CSV's folder, or "
    "absolute), 'label' (int or name) or 'labels' (findings separated by '|'), and "
    "optionally 'split' (train, val or test)"
)


def _encode_labels(values: Sequence[Any], path: Path) -> tuple[np.ndarray, list[str]]:
    """Map a label column to int64 ``(N,)`` ids; strings become sorted label names."""
    if values and all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        return np.array([index[v] for v in values], np.int64), names
    try:
        floats = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: column 'label' must hold all ints or all strings") from exc
    if floats.size and (np.any(floats != np.round(floats)) or floats.min() < 0):
        raise DataError(
            f"{path}: column 'label' must hold non-negative integers, "
            f"got values in {floats.min()}..{floats.max()}"
        )
    labels = floats.astype(np.int64)
    return labels, [str(i) for i in range(int(labels.max(initial=-1)) + 1)]


# --------------------------------------------------------------------------- .parquet


def _read_parquet(path: Path, required: Sequence[str]) -> Any:
    """Read a Parquet file into a ``pyarrow.Table`` holding the ``required`` columns."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise DataError(f"reading {path} needs pyarrow, which is not installed") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # ArrowInvalid, OSError, ...
        raise DataError(f"cannot read {path} as parquet: {exc}") from exc
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; found columns "
            f"{table.column_names}; expected a binary 'image' column with encoded "
            "image bytes, a 'label' column and optionally a 'split' column"
        )
    return table


def _row_bytes(value: Any) -> bytes:
    if isinstance(value, dict):  # Hugging Face ``Image`` feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if value is None:
        raise ImageDecodeError("no image bytes (null)")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"expected encoded image bytes, got {type(value).__name__}")
    return bytes(value)


def list_parquet(path: Path, labeled: bool, no_finding: str = NO_FINDING) -> Listing:
    """List a Parquet file: an ``image`` column, plus ``label`` (or ``labels``: findings
    separated by ``|``, multi-label) and ``split`` if labeled.

    Rows with a null label or a cell that holds no bytes are skipped, named ``file#row=i``.
    """
    multilabel = False
    if labeled:
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception:  # unreadable: _read_parquet says why
            names = []
        multilabel = "labels" in names and "label" not in names
    column = "labels" if multilabel else "label"
    table = _read_parquet(path, required=("image", column) if labeled else ("image",))
    cells = table.column("image").to_pylist()
    raw = table.column(column).to_pylist() if labeled else [None] * len(cells)
    if multilabel:
        raw = ["" if v is None else v for v in raw]  # an empty findings cell: no finding
    listing = Listing(source=str(path), name=path.stem, items=[], where=[])
    kept = []
    for row, cell in enumerate(cells):
        where = f"{path}#row={row}"
        if labeled and raw[row] is None:
            _skip(listing.skipped, where, "missing label (null)")
            continue
        try:
            listing.items.append(_row_bytes(cell))
        except ImageDecodeError as exc:
            _skip(listing.skipped, where, str(exc))
            continue
        listing.where.append(where)
        kept.append(row)
    if labeled and multilabel:
        listing.labels, listing.label_names = parse_findings(
            [str(raw[r]) for r in kept], listing.where, no_finding
        )
        listing.multilabel = True
    elif labeled:
        listing.labels, listing.label_names = _encode_labels([raw[r] for r in kept], path)
    if labeled:
        if "split" in table.column_names:
            split = table.column("split").to_pylist()
            listing.split = _parse_splits([split[r] for r in kept], path)
    return listing


# --------------------------------------------------------------------------- .csv


def _read_csv(path: Path, required: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The lower-cased header and the data rows of a CSV (blank lines dropped).

    Returns:
        ``(header, rows)``, each row ``{column: stripped cell}``.

    Raises:
        DataError: Unreadable file, no header, no data row, or a required column missing; the
            message names the file, the columns found and the columns expected.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            lines = [r for r in csv.reader(fh) if any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as CSV: {exc}") from exc
    found = [c.strip() for c in lines[0]] if lines else []
    header = [c.lower() for c in found]
    missing = [c for c in required if c not in header]
    if missing or len(lines) < 2:
        problem = f"missing column(s) {missing}" if missing else "no data rows"
        if not lines:
            problem = "empty file (no header row)"
        raise DataError(f"{path}: {problem}; found columns {found}; {_CSV_EXPECTED}")
    return header, [dict(zip(header, (cell.strip() for cell in line))) for line in lines[1:]]


def _csv_file(row: dict[str, str], base: Path, labeled: bool) -> Path | str:
    """The row's file as an absolute path, or the reason the row is skipped (``labeled``: a
    single-label row must have a label; a findings row may be empty)."""
    if not row.get("path"):
        return "empty 'path' cell"
    if labeled and row.get("labels") == "?":
        return "not labeled yet ('?' in 'labels')"
    if labeled and "label" in row and not row.get("label"):
        return "missing label (empty 'label' cell)"
    file = Path(os.path.abspath(base / os.path.expanduser(row["path"])))
    return file if file.is_file() else f"no such file: {file}"


def _encode_csv_labels(values: list[str], path: Path) -> tuple[np.ndarray, list[str]]:
    """All-integer cells are class ids; otherwise every cell is a class name."""
    if all(_INT.fullmatch(v) for v in values):
        return _encode_labels([int(v) for v in values], path)
    return _encode_labels(values, path)


def list_csv(
    path: Path,
    labeled: bool,
    label_columns: Sequence[str] = (),
    no_finding: str = NO_FINDING,
) -> Listing:
    """List a CSV of ``path,label[,split]`` rows (``label`` is ignored when unlabeled).

    Multi-label (:mod:`medcae.data.findings`): a ``labels`` column (instead of ``label``) of
    findings separated by ``|``, or 0/1 columns named by ``label_columns``.

    A row whose file is missing (or whose path or label is empty) is skipped and named
    ``file.csv#row=i``, ``i`` counting data rows from 0 as for Parquet. Nothing is decoded.

    Args:
        path: The CSV file; relative paths in it are relative to its folder.
        labeled: Require and read the ``label`` (and ``split``) columns.
        label_columns: The 0/1 finding columns.
        no_finding: The name meaning "no finding" in a ``labels`` column.

    Returns:
        The listing; files are absolute paths.
    """
    found = _read_csv(path, ("path",))[0] if labeled else []
    findings = labeled and (bool(label_columns) or ("labels" in found and "label" not in found))
    required = ("path",) if findings or not labeled else ("path", "label")
    header, rows = _read_csv(path, required)
    listing = Listing(source=str(path), name=path.stem, items=[], where=[])
    kept: list[dict[str, str]] = []
    for i, row in enumerate(rows):
        file = _csv_file(row, path.parent, labeled)
        if isinstance(file, str):
            _skip(listing.skipped, f"{path}#row={i}", file)
            continue
        listing.items.append(file)
        listing.where.append(f"{path}#row={i}")
        kept.append(row)
    if findings and label_columns:
        listing.labels, listing.label_names = parse_columns(
            kept, label_columns, path, listing.where
        )
    elif findings:
        cells = [r.get("labels", "") for r in kept]
        listing.labels, listing.label_names = parse_findings(cells, listing.where, no_finding)
    elif labeled:
        listing.labels, listing.label_names = _encode_csv_labels([r["label"] for r in kept], path)
    listing.multilabel = findings
    if labeled:
        if "split" in header:
            listing.split = _parse_splits([r.get("split", "") for r in kept], path)
    return listing

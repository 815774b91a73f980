"""Batch predictions as a table: the row schema, Predictor outputs to Arrow, and the files.

One row per image: ``path``, ``label`` (the class name, decided at the bundle's operating
point), ``probabilities`` (in the bundle's label order, calibrated), one ``p_<name>`` column per
class, ``threshold`` (the operating point's threshold on the positive class's probability, null
where the label is the most probable class), ``reconstruction_error`` and
``in_distribution``; with ``vectors`` (``medcae suggest``), also ``vector``: the classifier's
input vector. The files sit beside each other: ``preds.parquet``, ``preds.csv`` (with
``--csv``), ``preds.skipped.csv`` (``path,reason`` of every image that could not be read) and
``preds.log``. Each is written to a temporary name and renamed into place. Rows come in the
order of the listing (:mod:`medcae.distributed.predict` preserves it).

Ray-free: the Ray Data stage (:mod:`medcae.distributed.predict`) calls these per batch, and a
test or a notebook can call them on a list.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from medcae.data import DataError

if TYPE_CHECKING:
    from medcae.inference.predictor import Prediction

#: Rows buffered into one Parquet row group.
ROW_GROUP_ROWS = 65_536


def prediction_schema(
    label_names: Sequence[str], vectors: bool = False, findings: bool = False
) -> pa.Schema:
    """The schema of the prediction table for a bundle with these class names (and, with
    ``vectors``, a last column ``vector``: float32 lists, the classifier's input). A
    multi-label bundle (``findings``) adds a 0/1 column ``finding_<name>`` per finding: its
    decision at its own threshold (``label`` joins the present ones with ``|``)."""
    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("probabilities", pa.list_(pa.float64())),
            *((f"p_{name}", pa.float64()) for name in label_names),
            *((f"finding_{name}", pa.int8()) for name in (label_names if findings else ())),
            ("threshold", pa.float64()),
            ("reconstruction_error", pa.float64()),
            ("in_distribution", pa.bool_()),
            *([("vector", pa.list_(pa.float32()))] if vectors else []),
        ]
    )


def prediction_table(
    paths: Sequence[str],
    predictions: Sequence[Prediction],
    label_names: Sequence[str],
    vectors: np.ndarray | None = None,
) -> pa.Table:
    """One row per image from :meth:`medcae.inference.predictor.Predictor.predictions`.

    Args:
        paths: ``N`` image names (file paths, or the listing's ids of in-memory images).
        predictions: ``N`` predictions, in the same order.
        label_names: The bundle's class names: the order of ``probabilities``.
        vectors: ``(N, D)`` classifier input vectors (``Predictor.predict_arrays``'
            ``features``) for a ``vector`` column, or None for none.
    """
    if len(paths) != len(predictions):
        raise ValueError(f"{len(paths)} paths for {len(predictions)} predictions")
    if vectors is not None and len(vectors) != len(paths):
        raise ValueError(f"{len(paths)} paths for {len(vectors)} vectors")
    probs = [[p.probabilities[name] for name in label_names] for p in predictions]
    findings = bool(predictions) and predictions[0].findings is not None
    columns = {
        "path": [str(p) for p in paths],
        "label": [p.label for p in predictions],
        "probabilities": probs,
        **{f"p_{name}": [row[i] for row in probs] for i, name in enumerate(label_names)},
        **{
            f"finding_{name}": [int(p.findings[name]) for p in predictions]  # type: ignore[index]
            for name in (label_names if findings else ())
        },
        "threshold": [p.threshold for p in predictions],
        "reconstruction_error": [p.reconstruction_error for p in predictions],
        "in_distribution": [p.in_distribution for p in predictions],
    }
    if vectors is None:
        return pa.table(columns, schema=prediction_schema(label_names, findings=findings))
    x = np.asarray(vectors, np.float32)
    columns["vector"] = _vector_column(x.reshape(len(paths), -1) if len(paths) else x.reshape(0, 0))
    return pa.table(columns, schema=prediction_schema(label_names, True, findings))


def _vector_column(x: np.ndarray) -> pa.Array:
    """``(N, D)`` float32 as an Arrow list column, without a Python list per row."""
    offsets = np.arange(len(x) + 1, dtype=np.int32) * x.shape[1]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(x.ravel()))


def list_matrix(table: pa.Table, column: str, dtype: type = np.float32) -> np.ndarray:
    """A list column of equal-length rows (``vector``, ``probabilities``) as ``(N, D)``."""
    flat = table.column(column).combine_chunks().flatten().to_numpy(zero_copy_only=False)
    flat = flat.astype(dtype, copy=False)
    return flat.reshape(table.num_rows, -1) if table.num_rows else flat.reshape(0, 0)


@dataclass(frozen=True)
class OutputPaths:
    """The files of one batch prediction, beside each other.

    Attributes:
        parquet: The predictions (``preds.parquet``).
        csv: The same table as CSV (``preds.csv``), written with ``--csv``.
        skipped: ``path,reason`` of each image that could not be read (``preds.skipped.csv``).
        log: The run's log (``preds.log``).
    """

    parquet: Path
    csv: Path
    skipped: Path
    log: Path

    @classmethod
    def beside(cls, out: str | Path) -> OutputPaths:
        """The paths for ``--out``, checked: a ``.parquet`` file name in a writable folder.

        Raises:
            DataError: ``out`` is a folder, lacks the ``.parquet`` suffix, or its folder cannot
                be created or written.
        """
        path = Path(out).expanduser().absolute()
        if path.is_dir():
            raise DataError(f"--out {path} is a folder; give a file, e.g. {path / 'preds.parquet'}")
        if path.suffix.lower() != ".parquet":
            raise DataError(f"--out {path}: expected a .parquet file name, e.g. preds.parquet")
        _probe_writable(path.parent)
        stem = path.with_suffix("")
        return cls(
            path,
            stem.with_suffix(".csv"),
            stem.with_suffix(".skipped.csv"),
            stem.with_suffix(".log"),
        )


def _probe_writable(folder: Path) -> None:
    probe = folder / f".medcae-probe-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise DataError(f"cannot write the predictions to {folder}: {err.strerror or err}") from err


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``: renamed onto it when the block succeeds, removed
    when it fails, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(tables: Iterable[pa.Table], path: Path, schema: pa.Schema) -> int:
    """Stream ``tables`` into one Parquet file at ``path`` (atomically); returns the rows.

    Memory stays bounded by :data:`ROW_GROUP_ROWS` rows, whatever the number of images.
    """
    import pyarrow.parquet as pq

    rows, buffer = 0, []
    with atomic_file(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for table in tables:
            buffer.append(table.select(schema.names).cast(schema))
            rows += table.num_rows
            if sum(t.num_rows for t in buffer) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(buffer))
                buffer = []
        if buffer:
            writer.write_table(pa.concat_tables(buffer))
    return rows


def csv_view(table: pa.Table) -> pa.Table:
    """The table with ``probabilities`` as a JSON list (``[0.2, 0.8]``), which CSV can hold
    (and without ``vector``, which it cannot usefully hold)."""
    if "vector" in table.column_names:
        table = table.drop_columns(["vector"])
    probs = [json.dumps(p) for p in table.column("probabilities").to_pylist()]
    i = table.schema.get_field_index("probabilities")
    return table.set_column(i, "probabilities", pa.array(probs, pa.string()))


def write_predictions_csv(parquet: Path, path: Path) -> None:
    """The Parquet predictions as CSV at ``path`` (atomically), read back batch by batch."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    source = pq.ParquetFile(parquet)
    schema = csv_view(source.schema_arrow.empty_table()).schema
    with atomic_file(path) as tmp, pcsv.CSVWriter(tmp, schema) as writer:
        for batch in source.iter_batches():
            writer.write_table(csv_view(pa.Table.from_batches([batch])))


def write_skipped(path: Path, skipped: Sequence[tuple[str, str]]) -> None:
    """``path,reason`` rows at ``path`` (atomically); just the header when none was skipped,
    so a file left by an earlier run is never mistaken for this one's."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)

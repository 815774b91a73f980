"""From a user's ``source`` (path, name, ``"demo"`` or glob) to an ``.npz`` or a ``Listing``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from medcae.data.decode import DataError
from medcae.data.demo import (
    DEMO_DATASET_NAME,
    DEMO_NAME,
    FINDINGS_DATASET_NAME,
    FINDINGS_DEMO_NAME,
    _demo_path,
)
from medcae.data.findings import NO_FINDING
from medcae.data.folders import is_pattern, list_files, list_folder, list_glob
from medcae.data.listing import Listing
from medcae.data.medmnist import MEDMNIST, _fetch_medmnist, _medmnist_base
from medcae.data.tables import list_csv, list_parquet

Source = str | os.PathLike[str]


def _looks_like_path(source: str) -> bool:
    return (
        "/" in source
        or os.sep in source
        or source.startswith((".", "~"))
        or Path(source).suffix != ""
    )


def _resolve(source: Source, data_dir: str | None, download: bool) -> tuple[Path, str]:
    """Map ``source`` to an existing path and a data set name.

    Args:
        source: A file or folder, ``"demo"``, or a MedMNIST name (``"pneumoniamnist_64"``).
        data_dir: Where named data sets live (see ``load_dataset``).
        download: Download a missing MedMNIST file.

    Returns:
        ``(path, name)``: name is the file or folder stem, the MedMNIST name, or
        ``"synthetic-lesions"`` for the demo.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return path, (path.stem if path.is_file() else path.name)
    key = text.strip().lower()
    if key == DEMO_NAME:
        return _demo_path(data_dir), DEMO_DATASET_NAME
    if key == FINDINGS_DEMO_NAME:
        return _demo_path(data_dir, findings=True), FINDINGS_DATASET_NAME
    if _medmnist_base(key) in MEDMNIST:
        return _fetch_medmnist(key, data_dir, download), key
    if _looks_like_path(text):
        raise DataError(f"no such file or folder: {path}")
    raise DataError(
        f"no such file or folder: {text!r}, and it is not a known data set name. Expected a "
        f"path to a .npz/.csv/.parquet file or an image folder, {DEMO_NAME!r}, "
        f"{FINDINGS_DEMO_NAME!r}, or one of: "
        f"{', '.join(sorted(MEDMNIST))}"
    )


def _unsupported(path: Path) -> DataError:
    return DataError(
        f"unsupported file {path}: expected a .npz, .csv or .parquet file or a folder of images"
    )


def is_npz(path: Path) -> bool:
    """Whether ``path`` is read as a MedMNIST-style ``.npz`` (in memory, not listed)."""
    return path.suffix.lower() == ".npz" and not path.is_dir()


def list_labeled(
    path: Path, label_columns: Sequence[str] = (), no_finding: str = NO_FINDING
) -> Listing:
    """List a labeled folder, ``.csv`` or ``.parquet`` without decoding.

    Args:
        path: The source.
        label_columns: A CSV's 0/1 finding columns (multi-label).
        no_finding: The name meaning "no finding" in a ``labels`` column.

    Raises:
        DataError: Another kind of file, or the source's own errors (missing columns, ...).
    """
    suffix = path.suffix.lower()
    if label_columns and suffix != ".csv":
        raise DataError(f"--label-columns needs a .csv source, got {path}")
    if path.is_dir():
        return list_folder(path)
    if suffix == ".csv":
        return list_csv(path, labeled=True, label_columns=label_columns, no_finding=no_finding)
    if suffix == ".parquet":
        return list_parquet(path, labeled=True, no_finding=no_finding)
    raise _unsupported(path)


def resolve_unlabeled(source: Source, data_dir: str | None) -> Listing | tuple[Path, str]:
    """Resolve an unlabeled source.

    Args:
        source: A folder (every image file, recursively), a glob (``"scans/**/*.dcm"``), a
            ``.csv`` with a ``path`` column, a ``.parquet`` with an ``image`` column, an
            ``.npz`` or a data set name.
        data_dir: Where named data sets live.

    Returns:
        A listing, or ``(npz_path, name)`` for array sources.
    """
    text = os.fspath(source)
    if is_pattern(text) and not Path(text).expanduser().exists():
        return list_glob(text)
    path, name = _resolve(source, data_dir, download=True)
    suffix = path.suffix.lower()
    if path.is_dir():
        return list_files(path)
    if suffix == ".npz":
        return path, name
    if suffix == ".csv":
        return list_csv(path, labeled=False)
    if suffix == ".parquet":
        return list_parquet(path, labeled=False)
    raise _unsupported(path)

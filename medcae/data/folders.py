"""Listing image files: class folders, ``train/ val/ test/`` folders, flat folders and globs.

Only names are read here (and the first 132 bytes of suffix-less files, to spot DICOM); pixels
are decoded later, by :mod:`medcae.data.listing` or by the caller of ``list_rows``.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import numpy as np

from medcae.data.dataset import SPLITS
from medcae.data.decode import DataError
from medcae.data.listing import Listing

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"})
_GLOB_CHARS = frozenset("*?[")


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _image_files(root: Path) -> list[Path]:
    """All image files under ``root`` (recursively, sorted; hidden files skipped).

    Files with an image suffix count, and so do other files that start like DICOM
    (suffix-less or UID-named DICOM files).
    """
    files = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or _is_hidden(path, root):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or _has_dicom_magic(path):
            files.append(path)
    return files


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _file_listing(
    source: Path,
    files: list[Path],
    labels: list[int] | None = None,
    split: list[int] | None = None,
    label_names: list[str] | None = None,
) -> Listing:
    """A listing of files, each named by its own path in messages."""
    return Listing(
        source=str(source),
        name=source.name,
        items=list(files),
        where=[str(f) for f in files],
        labels=None if labels is None else np.array(labels, np.int64),
        split=None if split is None else np.array(split, np.int64),
        label_names=list(label_names or []),
    )


def list_folder(root: Path) -> Listing:
    """List a labeled folder: one sub-folder per class, or ``train/ val/ test/`` of those.

    Args:
        root: The folder.

    Returns:
        A labeled listing; ``split`` is set for the ``train/ val/ test/`` layout only.

    Raises:
        DataError: No class sub-folders, or an incomplete split layout.
    """
    subdirs = _subdirs(root)
    if any(d.name.lower() in SPLITS for d in subdirs):
        return _list_split_folders(root, subdirs)
    if not subdirs:
        raise DataError(
            f"{root}: no class sub-folders; labeled data needs one sub-folder per "
            f"class (e.g. {root / 'normal'}/*.png); for unlabeled images use "
            "load_unlabeled()"
        )
    if len(subdirs) == 1:
        logger.warning("%s has a single class sub-folder (%s)", root, subdirs[0].name)
    files = [(path, label) for label, d in enumerate(subdirs) for path in _image_files(d)]
    return _file_listing(
        root,
        [path for path, _ in files],
        [label for _, label in files],
        label_names=[d.name for d in subdirs],
    )


def _list_split_folders(root: Path, subdirs: list[Path]) -> Listing:
    by_split = {d.name.lower(): d for d in subdirs if d.name.lower() in SPLITS}
    missing = [s for s in SPLITS if s not in by_split]
    if missing:
        raise DataError(
            f"{root}: found split folders {sorted(by_split)} but not {missing}; "
            "a split layout needs train/, val/ and test/ (or put one sub-folder "
            "per class directly in the folder and let medcae split it)"
        )
    names = sorted({d.name for s in SPLITS for d in _subdirs(by_split[s])})
    files = [
        (path, names.index(d.name), i)
        for i, s in enumerate(SPLITS)
        for d in _subdirs(by_split[s])
        for path in _image_files(d)
    ]
    return _file_listing(
        root,
        [f[0] for f in files],
        [f[1] for f in files],
        split=[f[2] for f in files],
        label_names=names,
    )


def list_files(root: Path) -> Listing:
    """List every image file under ``root``, recursively, without labels."""
    return _file_listing(root, _image_files(root))


def is_pattern(text: str) -> bool:
    """Whether ``text`` holds glob characters (``*``, ``?`` or ``[``)."""
    return any(c in _GLOB_CHARS for c in text)


def list_glob(pattern: str) -> Listing:
    """List the files a glob matches (``**`` recurses; relative to the working directory).

    Args:
        pattern: For example ``"scans/**/*.dcm"``; ``~`` is expanded. Hidden files match only
            a pattern that names them.

    Returns:
        An unlabeled listing of the matching files, sorted; folders are left out.

    Raises:
        DataError: The pattern matches no file.
    """
    expanded = os.path.expanduser(pattern)
    files = sorted(Path(p) for p in glob.glob(expanded, recursive=True))
    files = [p for p in files if p.is_file()]
    if not files:
        raise DataError(
            f"no files match the pattern {pattern!r} (relative to {Path.cwd()}); "
            "expected a glob such as 'scans/**/*.dcm', a folder or a file"
        )
    listing = _file_listing(_glob_root(expanded), files)
    listing.source = pattern
    return listing


def _glob_root(pattern: str) -> Path:
    """The folder a pattern starts in: its leading parts without glob characters."""
    parts = Path(pattern).parts
    first = next((i for i, part in enumerate(parts) if is_pattern(part)), len(parts))
    return Path(*parts[:first]).resolve() if first else Path.cwd()

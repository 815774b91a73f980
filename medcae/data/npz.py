"""Reading MedMNIST-style ``.npz`` files: ``<split>_images`` / ``<split>_labels`` arrays."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from medcae.data.dataset import DEFAULT_SIZE, SPLITS, Dataset, ImageSet, to_uniform
from medcae.data.decode import DataError
from medcae.data.findings import encode
from medcae.data.medmnist import MEDMNIST, _medmnist_base


def _open_npz(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as a .npz file: {exc}") from exc


def _npz_get(npz: Any, key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read key {key!r}: {exc}") from exc


def _check_images(images: np.ndarray, where: str) -> np.ndarray:
    """Validate an image stack; return uint8 ``(N, H, W)`` or ``(N, H, W, 3)``."""
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise DataError(
            f"{where}: expected images (N, H, W) or (N, H, W, 3), got shape {images.shape}"
        )
    if images.dtype == np.uint8:
        return images
    if images.size and (
        not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255
    ):
        raise DataError(f"{where}: expected uint8 images in 0..255, got {images.dtype}")
    return images.astype(np.uint8)


def _check_labels(labels: np.ndarray, count: int, where: str) -> np.ndarray:
    """Validate labels ``(N,)`` or ``(N, 1)``; return int64 ``(N,)``. Labels ``(N, F)`` with
    ``F > 1`` are findings (multi-label): 0/1 only, returned as bitmasks
    (:func:`medcae.data.findings.encode`)."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim == 2 and len(labels) == count:
        if not np.isin(labels, (0, 1)).all():
            bad = np.unique(labels[~np.isin(labels, (0, 1))])[:5].tolist()
            raise DataError(f"{where}: multi-label labels must be 0 or 1, got values {bad}")
        return encode(labels)
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(
            f"{where}: expected labels of shape ({count},), ({count}, 1) or ({count}, F) "
            f"findings, got {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.number) or np.any(labels != np.round(labels)):
        raise DataError(f"{where}: expected integer class labels, got {labels.dtype}")
    return labels.astype(np.int64)


def _uniform_batches(batches: list[np.ndarray], size: int | None) -> list[np.ndarray]:
    """Give image stacks a common size and channel count (see :func:`to_uniform`)."""
    rgb = any(b.ndim == 4 for b in batches)
    if size is None and len({b.shape[1:3] for b in batches if len(b)}) > 1:
        size = DEFAULT_SIZE
    out = []
    for batch in batches:
        if rgb and batch.ndim == 3:
            batch = np.repeat(batch[..., None], 3, axis=3)
        if size is not None and batch.shape[1:3] != (size, size):
            shape = (0, size, size) + batch.shape[3:]
            batch = to_uniform(list(batch), size) if len(batch) else np.zeros(shape, np.uint8)
        out.append(batch)
    return out


def _npz_label_names(
    npz: Any, path: Path, name: str, labels: list[np.ndarray], findings: int = 0
) -> list[str]:
    """Class (or, with ``findings``, finding) names: the file's ``label_names``, MedMNIST's,
    or the ids."""
    names = None
    if "label_names" in npz.files:
        names = [str(v) for v in _npz_get(npz, "label_names", path).ravel()]
    elif MEDMNIST.get(_medmnist_base(name.lower())) is not None:
        names = list(MEDMNIST[_medmnist_base(name.lower())])
    if findings:
        if names is not None and len(names) != findings:
            raise DataError(f"{path}: {findings} finding columns but {len(names)} label names")
        return names or [f"finding_{i}" for i in range(findings)]
    if names is not None:
        return names
    top = max((int(lab.max()) for lab in labels if lab.size), default=-1)
    return [str(i) for i in range(top + 1)]


def _check_label_range(labels: list[np.ndarray], num_classes: int, where: str) -> None:
    values = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise DataError(
            f"{where}: labels must be in 0..{num_classes - 1}, got {values.min()}..{values.max()}"
        )


def _load_npz(path: Path, size: int | None, name: str) -> Dataset:
    """Read a labeled ``.npz`` with ``{train,val,test}_{images,labels}`` keys."""
    expected = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels")]
    with _open_npz(path) as npz:
        missing = [k for k in expected if k not in npz.files]
        if missing:
            raise DataError(
                f"{path}: missing keys {missing}; found keys {sorted(npz.files)}, "
                f"expected {expected}"
            )
        images = [
            _check_images(_npz_get(npz, f"{s}_images", path), f"{path}[{s}_images]") for s in SPLITS
        ]
        labels = [
            _check_labels(_npz_get(npz, f"{s}_labels", path), len(im), f"{path}[{s}_labels]")
            for s, im in zip(SPLITS, images)
        ]
        widths = {
            _npz_get(npz, f"{s}_labels", path).reshape(len(im), -1).shape[1]
            for s, im in zip(SPLITS, images)
        }
        multilabel = max(widths) > 1
        if multilabel and len(widths) > 1:
            raise DataError(f"{path}: the splits' labels have different widths {sorted(widths)}")
        label_names = _npz_label_names(npz, path, name, labels, max(widths) if multilabel else 0)
    if not multilabel:
        _check_label_range(labels, len(label_names), str(path))
    images = _uniform_batches(images, size)
    splits = {s: ImageSet(im, lab) for s, im, lab in zip(SPLITS, images, labels)}
    return Dataset(name, splits, label_names, multilabel=multilabel)


def _image_keys(files: list[str]) -> list[str]:
    """``images``, else the split image keys first, then any other ``*_images`` keys."""
    if "images" in files:
        return ["images"]
    splits = [f"{s}_images" for s in SPLITS if f"{s}_images" in files]
    others = [k for k in files if k.endswith("_images") and k[: -len("_images")] not in SPLITS]
    return splits + sorted(others)


def _npz_all_images(path: Path, size: int | None) -> np.ndarray:
    """All images of an ``.npz``, labels ignored; uint8 ``(N, H, W)`` or ``(N, H, W, 3)``."""
    with _open_npz(path) as npz:
        keys = _image_keys(list(npz.files))
        if not keys:
            raise DataError(
                f"{path}: no image keys; found keys {sorted(npz.files)}, "
                "expected 'images' or '<split>_images'"
            )
        batches = [_check_images(_npz_get(npz, k, path), f"{path}[{k}]") for k in keys]
    return np.concatenate(_uniform_batches(batches, size))

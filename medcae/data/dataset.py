"""In-memory data sets (``ImageSet``, ``Dataset``) and stacking images with ``to_uniform``."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from medcae.data.decode import DataError, scale_to_uint8

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_SIZE = 128

#: ``(where, reason)`` for every file or row that could not be read.
Skipped = list[tuple[str, str]]


@dataclass
class ImageSet:
    """A stack of same-sized images with optional labels.

    Attributes:
        images: uint8 ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` (RGB).
        labels: int64 ``(N,)`` in ``0..K-1``, or None for unlabeled images.
    """

    images: np.ndarray
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(f"ImageSet: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Dataset:
    """A labeled data set with train/val/test splits.

    Attributes:
        name: Short name (data set name or file/folder stem).
        splits: ``{"train": ImageSet, "val": ImageSet, "test": ImageSet}``.
        label_names: Class names; label ``i`` is ``label_names[i]``.
        skipped: ``(path, reason)`` for every file or row that could not be read.
        multilabel: Labels are bitmasks of findings (:mod:`medcae.data.findings`) and
            ``label_names`` the findings.
    """

    name: str
    splits: dict[str, ImageSet]
    label_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    multilabel: bool = False

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def fingerprint(self) -> str:
        """SHA-1 hex digest of all split images and labels (content, dtypes and shapes)."""
        digest = hashlib.sha1()
        for split in sorted(self.splits):
            part = self.splits[split]
            for tag, arr in (("images", part.images), ("labels", part.labels)):
                digest.update(f"{split}/{tag}:".encode())
                if arr is None:
                    digest.update(b"none")
                    continue
                arr = np.ascontiguousarray(arr)
                digest.update(f"{arr.dtype.str}{arr.shape}".encode())
                digest.update(arr.data)
        return digest.hexdigest()


def _skip(skipped: Skipped, where: str, reason: str) -> None:
    """Log one unreadable file or row and record it in ``skipped``."""
    logger.warning("skipping %s: %s", where, reason)
    skipped.append((where, reason))


def _as_image_array(image: Any, index: int) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (1, 4):
        arr = arr[..., 0] if arr.shape[2] == 1 else arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise DataError(
            f"image {index}: expected an (H, W) or (H, W, 3) array, got shape {arr.shape}"
        )
    return arr if arr.dtype == np.uint8 else scale_to_uint8(arr)


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 ``(H, W)`` or ``(H, W, 3)`` bilinearly to ``(size, size[, 3])``."""
    if arr.shape[:2] == (size, size):
        return arr
    resized = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def to_uniform(images: Sequence[np.ndarray], size: int | None = None) -> np.ndarray:
    """Stack decoded images into one uint8 array of identical shape.

    If any image is RGB, all become RGB (grayscale repeated to 3 channels); else the result
    is grayscale ``(N, H, W)``. Images are resized (bilinear) to ``(size, size)`` when
    ``size`` is given, or to ``DEFAULT_SIZE`` when their sizes differ.

    Args:
        images: Arrays ``(H, W)`` or ``(H, W, 3)`` (``(H, W, 1)``/``(H, W, 4)`` accepted);
            non-uint8 arrays are min-max scaled to 0..255.
        size: Target side length, or None to keep a common size.

    Returns:
        uint8 ``(N, H, W)`` or ``(N, H, W, 3)``.
    """
    if size is not None and int(size) < 1:
        raise DataError(f"image size must be a positive integer, got {size}")
    arrays = [_as_image_array(img, i) for i, img in enumerate(images)]
    if not arrays:
        side = int(size or DEFAULT_SIZE)
        return np.zeros((0, side, side), np.uint8)
    if any(a.ndim == 3 for a in arrays):
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays]
    if size is None and len({a.shape[:2] for a in arrays}) > 1:
        size = DEFAULT_SIZE
    if size is not None:
        arrays = [_resize(a, int(size)) for a in arrays]
    return np.stack(arrays)

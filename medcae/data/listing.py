"""A source listed but not decoded (``Listing``), and decoding a listing into images.

Folders, globs, CSV and Parquet sources are first listed (file paths or encoded bytes, labels,
an optional split column), then either decoded here into a :class:`Dataset` or turned into
``Rows`` by :mod:`medcae.data.rows` without decoding anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medcae.data.dataset import SPLITS, Dataset, ImageSet, Skipped, _resize, _skip, to_uniform
from medcae.data.decode import DataError, ImageDecodeError, decode_image
from medcae.data.findings import decode, iterative_split
from medcae.data.splits import _stratified_split

#: One listed image: a file to read, or its encoded bytes.
Item = Path | bytes


@dataclass
class Listing:
    """Images of one source, listed without decoding.

    Attributes:
        source: The file, folder or glob pattern that was listed.
        name: Data set name (file or folder stem).
        items: ``N`` files (``Path``) or encoded images (``bytes``).
        where: ``N`` names for messages (the file path, or ``file.csv#row=3``).
        labels: int64 ``(N,)`` class ids, or None for an unlabeled source.
        split: int64 ``(N,)`` split ids (0 train, 1 val, 2 test) given by the source, or None.
        label_names: Class names; label ``i`` is ``label_names[i]`` (``[]`` when unlabeled).
        skipped: ``(where, reason)`` for rows dropped while listing.
        multilabel: ``labels`` are bitmasks of findings (:mod:`medcae.data.findings`).
    """

    source: str
    name: str
    items: list[Item]
    where: list[str]
    labels: np.ndarray | None = None
    split: np.ndarray | None = None
    label_names: list[str] = field(default_factory=list)
    skipped: Skipped = field(default_factory=list)
    multilabel: bool = False

    def __len__(self) -> int:
        return len(self.items)

    def assignment(self, seed: int) -> np.ndarray:
        """int64 ``(N,)`` split ids: the source's own, else the stratified seeded 70/15/15 split
        (for findings, iterative stratification)."""
        if self.split is not None:
            return self.split
        if self.labels is None:
            raise DataError(f"{self.source}: an unlabeled source has no train/val/test split")
        if self.multilabel:
            return iterative_split(decode(self.labels, len(self.label_names)), seed)
        return _stratified_split(self.labels, seed)


def _decode_item(item: Item, where: str) -> np.ndarray:
    if isinstance(item, Path):
        return decode_image(item.read_bytes(), str(item))
    return decode_image(item, where)


def decode_listing(listing: Listing, size: int | None) -> tuple[list[int], list[np.ndarray]]:
    """Decode every listed image; unreadable ones are logged and added to ``listing.skipped``.

    Args:
        listing: The listed source.
        size: Resize each image to ``(size, size)`` right after decoding, or None.

    Returns:
        ``(kept, images)``: indices into the listing of the readable images, and the images,
        uint8 ``(H, W)`` or ``(H, W, 3)``.
    """
    kept: list[int] = []
    images: list[np.ndarray] = []
    for index, (item, where) in enumerate(zip(listing.items, listing.where)):
        try:
            image = _decode_item(item, where)
        except (ImageDecodeError, OSError) as exc:
            _skip(listing.skipped, where, str(exc))
            continue
        kept.append(index)
        images.append(_resize(image, size) if size else image)
    return kept, images


def _no_images(listing: Listing) -> DataError:
    return DataError(f"{listing.source}: no readable images found ({len(listing.skipped)} skipped)")


def load_listing(listing: Listing, seed: int, size: int | None) -> Dataset:
    """Decode a labeled listing and cut it into train/val/test.

    Sources without a split column get the stratified seeded split of all listed images
    (the same as :func:`medcae.data.list_rows`), then undecodable ones are dropped.

    Args:
        listing: A labeled listing (``labels`` set).
        seed: Seed of the stratified split.
        size: Resize every image to ``(size, size)``, or None.

    Returns:
        The data set; ``skipped`` holds the rows dropped while listing and decoding.
    """
    assert listing.labels is not None, "load_listing needs a labeled listing"
    kept, images = decode_listing(listing, size)
    if not images:
        raise _no_images(listing)
    labels = listing.labels[kept]
    # split before dropping undecodable rows, as list_rows does
    assignment = listing.assignment(seed)[kept]
    stacked = to_uniform(images, size)
    splits = {
        s: ImageSet(stacked[assignment == i], labels[assignment == i]) for i, s in enumerate(SPLITS)
    }
    return Dataset(
        listing.name, splits, list(listing.label_names), listing.skipped, listing.multilabel
    )


def load_listing_unlabeled(listing: Listing, size: int | None) -> tuple[ImageSet, Skipped]:
    """Decode a listing's images, ignoring its labels.

    Returns:
        ``(ImageSet(uint8 (N, H, W[, 3]), labels=None), skipped)``.
    """
    _, images = decode_listing(listing, size)
    if not images:
        raise _no_images(listing)
    return ImageSet(to_uniform(images, size)), listing.skipped

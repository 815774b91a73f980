"""Loading data sets into memory: ``load_dataset`` (labeled splits) and ``load_unlabeled``."""

from __future__ import annotations

import logging

from medcae.data.dataset import Dataset, ImageSet, Skipped
from medcae.data.listing import load_listing, load_listing_unlabeled
from medcae.data.npz import _load_npz, _npz_all_images
from medcae.data.sources import Source, _resolve, is_npz, list_labeled, resolve_unlabeled

logger = logging.getLogger(__name__)


def load_dataset(
    source: Source,
    data_dir: str | None = None,
    *,
    seed: int = 0,
    image_size: int | None = None,
    download: bool = True,
) -> Dataset:
    """Load a labeled data set with train/val/test splits.

    Args:
        source: A MedMNIST-style ``.npz`` path, a MedMNIST name (``"pneumoniamnist"``,
            optionally with a size suffix like ``"pneumoniamnist_64"``), ``"demo"``, an image
            folder (class sub-folders, optionally under ``train/ val/ test/``), a ``.csv`` of
            ``path,label[,split]`` rows, or a ``.parquet`` file with ``image`` and ``label``
            (and optional ``split``) columns.
        data_dir: Where named data sets live (default ``$MEDCAE_DATA_DIR`` or ``~/.medmnist``;
            for ``"demo"``: ``~/.cache/medcae``).
        seed: Seed for the stratified 70/15/15 split of sources without splits.
        image_size: Resize every image to ``(image_size, image_size)``.
        download: Download a named MedMNIST data set when it is missing.

    Returns:
        The data set; unreadable files/rows are listed in ``Dataset.skipped``.

    Raises:
        DataError: Missing path, unknown name, missing keys/columns, no images, ...
    """
    path, name = _resolve(source, data_dir, download)
    if is_npz(path):
        dataset = _load_npz(path, image_size, name)
    else:
        dataset = load_listing(list_labeled(path), seed, image_size)
    sizes = {s: len(part) for s, part in dataset.splits.items()}
    logger.info(
        "loaded %s: %s, %d classes, %d skipped",
        dataset.name,
        sizes,
        dataset.num_classes,
        len(dataset.skipped),
    )
    return dataset


def load_unlabeled(
    source: Source, *, image_size: int | None = None, data_dir: str | None = None
) -> tuple[ImageSet, Skipped]:
    """Load images without labels (labels in the source, if any, are ignored).

    Args:
        source: A folder (all image files, recursively), a glob such as ``"scans/**/*.dcm"``
            (relative to the working directory, or absolute), an ``.npz`` (key ``images`` or
            all ``*_images`` keys), a ``.csv`` with a ``path`` column, a ``.parquet`` with an
            ``image`` column, or a data set name.
        image_size: Resize every image to ``(image_size, image_size)``.
        data_dir: Where named data sets live (see :func:`load_dataset`).

    Returns:
        ``(ImageSet(images, labels=None), skipped)`` with ``(path, reason)`` per skipped file.

    Raises:
        DataError: Missing path, a glob that matches nothing, no readable image, ...
    """
    found = resolve_unlabeled(source, data_dir)
    if isinstance(found, tuple):
        return ImageSet(_npz_all_images(found[0], image_size)), []
    return load_listing_unlabeled(found, image_size)

"""Image decoding and data set loading for medcae.

Data sets come from MedMNIST-style ``.npz`` files (by path or by name), folders of images
(one sub-folder per class, optionally under ``train/ val/ test/``), ``.parquet`` files with
encoded image bytes, or the built-in synthetic demo data set (generated offline).

This module imports only NumPy, Pillow and the standard library at import time; pydicom and
pyarrow are imported lazily where they are needed. It never imports Ray.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import re
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SIZE",
    "DEMO_NAME",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "MEDMNIST",
    "MEDMNIST_URL",
    "SPLITS",
    "DataError",
    "Dataset",
    "ImageDecodeError",
    "ImageSet",
    "decode_image",
    "download_file",
    "load_dataset",
    "load_unlabeled",
    "make_demo_dataset",
    "to_uniform",
]

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
MAX_PIXELS = 100_000_000
DEFAULT_SIZE = 128
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"})
DEMO_NAME = "demo"
DEMO_DATASET_NAME = "synthetic-lesions"
DEMO_FILENAME = "medcae-demo.npz"
DEMO_LABEL_NAMES = ("normal", "nodule", "ring")
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"

_ORGAN_LABELS = [
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
]
#: MedMNIST 2D single-label data sets and their label names (from MedMNIST's ``INFO``).
MEDMNIST: dict[str, list[str]] = {
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "tissuemnist": [
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ],
    "organamnist": _ORGAN_LABELS,
    "organcmnist": _ORGAN_LABELS,
    "organsmnist": _ORGAN_LABELS,
}
_SPLIT_ALIASES = {
    "train": 0,
    "training": 0,
    "val": 1,
    "valid": 1,
    "validation": 1,
    "test": 2,
    "testing": 2,
}
_PIXEL_KEYS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

Skipped = list[tuple[str, str]]


class DataError(ValueError):
    """Bad input data: missing file, unknown name, missing keys, bad budget, ..."""


class ImageDecodeError(DataError):
    """One image could not be decoded."""


class ImageTooLargeError(ImageDecodeError):
    """An image declares more pixels than allowed (a possible decompression bomb)."""


class NoPixelDataError(ImageDecodeError):
    """A DICOM file holds no pixel data."""


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
    """

    name: str
    splits: dict[str, ImageSet]
    label_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

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


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode one encoded image (PNG, JPEG, BMP, TIFF, GIF via Pillow; DICOM via pydicom).

    Args:
        data: The encoded file content.
        source: Where the bytes came from (file path or ``file.parquet#row=3``); used in
            error messages, and a ``.dcm`` suffix selects the DICOM decoder.

    Returns:
        uint8 ``(H, W)`` for grayscale or ``(H, W, 3)`` for colour images.

    Raises:
        ImageDecodeError: Empty, truncated, unknown-format or oversized (more than
            ``MAX_PIXELS`` pixels) images, and DICOM files without pixel data.
    """
    if not data:
        raise ImageDecodeError(f"cannot decode {source}: empty data (0 bytes)")
    data = bytes(data)
    if data[128:132] == b"DICM" or str(source).lower().endswith(".dcm"):
        return _decode_dicom(data, source)
    return _decode_pil(data, source)


def _check_pixel_count(count: int, source: str) -> None:
    if count > MAX_PIXELS:
        raise ImageTooLargeError(
            f"refusing to decode {source}: {count} pixels is more than "
            f"MAX_PIXELS={MAX_PIXELS} (possible decompression bomb)"
        )


def _check_pil_size(img: Image.Image, source: str) -> None:
    """Apply ``MAX_PIXELS`` and Pillow's own bomb limit before any pixel is decoded."""
    count = img.width * img.height
    _check_pixel_count(count, source)
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit and count > pil_limit:
        raise ImageTooLargeError(
            f"refusing to decode {source}: {count} pixels is more than "
            f"Pillow's MAX_IMAGE_PIXELS={pil_limit} (decompression bomb?)"
        )


def _decode_pil(data: bytes, source: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pil_size(img, source)
            img.load()
            return _pil_to_array(img)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLargeError(f"refusing to decode {source}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"cannot decode {source}: not a recognised image format "
            "(expected PNG, JPEG, BMP, TIFF, GIF or DICOM)"
        ) from exc
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError, ...
        raise ImageDecodeError(f"cannot decode {source}: {type(exc).__name__}: {exc}") from exc


def _pil_to_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        return _scale_to_uint8(np.asarray(img, dtype=np.float64))
    if mode in ("1", "L", "LA", "La"):
        return np.array(img.convert("L"), dtype=np.uint8)
    if mode in ("P", "PA"):
        rgb = np.array(img.convert("RGBA").convert("RGB"), dtype=np.uint8)
        gray = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        return rgb[..., 0].copy() if gray else rgb
    return np.array(img.convert("RGB"), dtype=np.uint8)


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric array to uint8 0..255 (a constant image becomes 0)."""
    arr = np.nan_to_num(np.asarray(arr, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if arr.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _decode_dicom(data: bytes, source: str) -> np.ndarray:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, ValueError, ...
        raise ImageDecodeError(f"cannot read DICOM {source}: {exc}") from exc
    if len(ds) == 0:
        raise ImageDecodeError(f"cannot read DICOM {source}: no DICOM data elements found")
    if not any(key in ds for key in _PIXEL_KEYS):
        raise NoPixelDataError(f"DICOM {source} has no pixel data (no PixelData element)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_pixel_count(int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * frames, source)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing codec, truncated data, bad attributes, ...
        raise ImageDecodeError(f"cannot decode DICOM pixel data of {source}: {exc}") from exc
    if frames > 1:
        arr = arr[frames // 2]
    return _dicom_to_uint8(arr, ds)


def _dicom_to_uint8(arr: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:
        return arr if arr.dtype == np.uint8 else _scale_to_uint8(arr)
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    out = _dicom_window(values, ds)
    return 255 - out if photometric == "MONOCHROME1" else out


def _first_number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str):  # pydicom MultiValue
        return _first_number(value[0]) if len(value) else None
    return float(value)


def _dicom_window(values: np.ndarray, ds: Any) -> np.ndarray:
    """WindowCenter/Width (linear clip) when present, else a VOI LUT, else min-max."""
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        lo = center - width / 2
        return np.rint(np.clip((values - lo) / width, 0.0, 1.0) * 255).astype(np.uint8)
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi_lut

        try:
            values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        except Exception as exc:  # malformed LUT: fall back to min-max
            logger.debug("ignoring unusable VOI LUT: %s", exc)
    return _scale_to_uint8(values)


def _as_image_array(image: Any, index: int) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (1, 4):
        arr = arr[..., 0] if arr.shape[2] == 1 else arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise DataError(
            f"image {index}: expected an (H, W) or (H, W, 3) array, got shape {arr.shape}"
        )
    return arr if arr.dtype == np.uint8 else _scale_to_uint8(arr)


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
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


# --------------------------------------------------------------------------- sources


def load_dataset(
    source: str | os.PathLike,
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
            folder (class sub-folders, optionally under ``train/ val/ test/``) or a
            ``.parquet`` file with ``image`` and ``label`` (and optional ``split``) columns.
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
    suffix = path.suffix.lower()
    if path.is_dir():
        dataset = _load_folder(path, seed, image_size)
    elif suffix == ".npz":
        dataset = _load_npz(path, image_size, name)
    elif suffix == ".parquet":
        dataset = _load_parquet(path, seed, image_size)
    else:
        raise DataError(
            f"unsupported file {path}: expected a .npz or .parquet file or a folder of images"
        )
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
    source: str | os.PathLike, *, image_size: int | None = None, data_dir: str | None = None
) -> tuple[ImageSet, Skipped]:
    """Load images without labels (labels in the source, if any, are ignored).

    Args:
        source: A folder (all image files, recursively), an ``.npz`` (key ``images`` or all
            ``*_images`` keys), a ``.parquet`` with an ``image`` column, or a data set name.
        image_size: Resize every image to ``(image_size, image_size)``.
        data_dir: Where named data sets live (see :func:`load_dataset`).

    Returns:
        ``(ImageSet(images, labels=None), skipped)`` with ``(path, reason)`` per skipped file.
    """
    path, _ = _resolve(source, data_dir, download=True)
    skipped: Skipped = []
    suffix = path.suffix.lower()
    if path.is_dir():
        images = [img for _, img in _decode_files(_image_files(path), image_size, skipped)]
    elif suffix == ".npz":
        return ImageSet(_npz_all_images(path, image_size)), skipped
    elif suffix == ".parquet":
        table = _read_parquet(path, required=("image",))
        column = table.column("image").to_pylist()
        images = [img for _, img in _decode_rows(column, path, image_size, skipped)]
    else:
        raise DataError(
            f"unsupported file {path}: expected a .npz or .parquet file or a folder of images"
        )
    if not images:
        raise DataError(f"{path}: no readable images found ({len(skipped)} skipped)")
    return ImageSet(to_uniform(images, image_size)), skipped


def _medmnist_base(name: str) -> str:
    match = re.fullmatch(r"([a-z]+?)(?:_(?:28|64|128|224))?", name)
    return match.group(1) if match else name


def _looks_like_path(source: str) -> bool:
    return (
        "/" in source
        or os.sep in source
        or source.startswith((".", "~"))
        or Path(source).suffix != ""
    )


def _resolve(source: str | os.PathLike, data_dir: str | None, download: bool) -> tuple[Path, str]:
    """Map ``source`` to an existing path and a data set name."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        return path, (path.stem if path.is_file() else path.name)
    key = text.strip().lower()
    if key == DEMO_NAME:
        return _demo_path(data_dir), DEMO_DATASET_NAME
    if _medmnist_base(key) in MEDMNIST:
        return _fetch_medmnist(key, data_dir, download), key
    if _looks_like_path(text):
        raise DataError(f"no such file or folder: {path}")
    raise DataError(
        f"no such file or folder: {text!r}, and it is not a known data set name. Expected a "
        f"path to a .npz/.parquet file or an image folder, {DEMO_NAME!r}, or one of: "
        f"{', '.join(sorted(MEDMNIST))}"
    )


def _demo_path(data_dir: str | None) -> Path:
    root = Path(data_dir).expanduser() if data_dir else Path.home() / ".cache" / "medcae"
    path = root / DEMO_FILENAME
    if not path.exists():
        logger.info("generating the demo data set %r at %s", DEMO_DATASET_NAME, path)
        make_demo_dataset(path)
    return path


def _fetch_medmnist(name: str, data_dir: str | None, download: bool) -> Path:
    root = data_dir or os.environ.get("MEDCAE_DATA_DIR") or Path.home() / ".medmnist"
    path = Path(root).expanduser() / f"{name}.npz"
    if path.exists():
        return path
    url = MEDMNIST_URL.format(name=name)
    if not download:
        raise DataError(
            f"data set {name!r} not found at {path} and download=False; "
            "put the .npz there or pass a path"
        )
    try:
        download_file(url, path)
    except DataError as exc:
        raise DataError(
            f"data set {name!r} not found at {path} and download from {url} "
            f"failed: {exc}; put the .npz there or pass a path"
        ) from exc
    return path


# --------------------------------------------------------------------------- .npz


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
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != count:
        raise DataError(
            f"{where}: expected labels of shape ({count},) or ({count}, 1), got "
            f"{labels.shape} (multi-label data is not supported)"
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


def _npz_label_names(npz: Any, path: Path, name: str, labels: list[np.ndarray]) -> list[str]:
    if "label_names" in npz.files:
        return [str(v) for v in _npz_get(npz, "label_names", path).ravel()]
    known = MEDMNIST.get(_medmnist_base(name.lower()))
    if known is not None:
        return list(known)
    top = max((int(lab.max()) for lab in labels if lab.size), default=-1)
    return [str(i) for i in range(top + 1)]


def _check_label_range(labels: list[np.ndarray], num_classes: int, where: str) -> None:
    values = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise DataError(
            f"{where}: labels must be in 0..{num_classes - 1}, got {values.min()}..{values.max()}"
        )


def _load_npz(path: Path, size: int | None, name: str) -> Dataset:
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
        label_names = _npz_label_names(npz, path, name, labels)
    _check_label_range(labels, len(label_names), str(path))
    images = _uniform_batches(images, size)
    splits = {s: ImageSet(im, lab) for s, im, lab in zip(SPLITS, images, labels)}
    return Dataset(name, splits, label_names)


def _npz_all_images(path: Path, size: int | None) -> np.ndarray:
    with _open_npz(path) as npz:
        keys = (
            ["images"]
            if "images" in npz.files
            else (
                [f"{s}_images" for s in SPLITS if f"{s}_images" in npz.files]
                + sorted(
                    k
                    for k in npz.files
                    if k.endswith("_images") and k[: -len("_images")] not in SPLITS
                )
            )
        )
        if not keys:
            raise DataError(
                f"{path}: no image keys; found keys {sorted(npz.files)}, "
                "expected 'images' or '<split>_images'"
            )
        batches = [_check_images(_npz_get(npz, k, path), f"{path}[{k}]") for k in keys]
    return np.concatenate(_uniform_batches(batches, size))


# --------------------------------------------------------------------------- folders


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


def _skip(skipped: Skipped, where: str, reason: str) -> None:
    logger.warning("skipping %s: %s", where, reason)
    skipped.append((where, reason))


def _decode_files(
    files: Iterable[Path], size: int | None, skipped: Skipped
) -> list[tuple[int, np.ndarray]]:
    """Decode files; return ``(index, image)`` for the readable ones, log the others."""
    out = []
    for index, path in enumerate(files):
        try:
            image = decode_image(path.read_bytes(), str(path))
        except (ImageDecodeError, OSError) as exc:
            _skip(skipped, str(path), str(exc))
            continue
        out.append((index, _resize(image, size) if size else image))
    return out


def _split_counts(n: int) -> tuple[int, int, int]:
    """Train/val/test counts for ``n`` samples of one class (>= 1 each where possible)."""
    n_val = max(1, int(n * SPLIT_FRACTIONS[1] + 0.5)) if n >= 3 else 0
    n_test = max(1, int(n * SPLIT_FRACTIONS[2] + 0.5)) if n >= 2 else 0
    return n - n_val - n_test, n_val, n_test


def _stratified_split(labels: np.ndarray, seed: int) -> np.ndarray:
    """Split index per sample (0 train, 1 val, 2 test), stratified 70/15/15 and seeded."""
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(labels), np.int64)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train, n_val, _ = _split_counts(len(idx))
        assignment[idx[n_train : n_train + n_val]] = 1
        assignment[idx[n_train + n_val :]] = 2
    return assignment


def _assemble(
    where: Path,
    images: list[np.ndarray],
    labels: np.ndarray,
    assignment: np.ndarray,
    label_names: list[str],
    skipped: Skipped,
    size: int | None,
) -> Dataset:
    """Stack decoded images and cut them into splits by ``assignment`` (0/1/2)."""
    if not images:
        raise DataError(f"{where}: no readable images found ({len(skipped)} skipped)")
    stacked = to_uniform(images, size)
    splits = {
        s: ImageSet(stacked[assignment == i], labels[assignment == i]) for i, s in enumerate(SPLITS)
    }
    name = where.stem if where.is_file() else where.name
    return Dataset(name, splits, list(label_names), skipped)


def _load_folder(root: Path, seed: int, size: int | None) -> Dataset:
    subdirs = _subdirs(root)
    if any(d.name.lower() in SPLITS for d in subdirs):
        return _load_split_folders(root, subdirs, size)
    if not subdirs:
        raise DataError(
            f"{root}: no class sub-folders; labeled data needs one sub-folder per "
            f"class (e.g. {root / 'normal'}/*.png); for unlabeled images use "
            "load_unlabeled()"
        )
    if len(subdirs) == 1:
        logger.warning("%s has a single class sub-folder (%s)", root, subdirs[0].name)
    files = [(path, label) for label, d in enumerate(subdirs) for path in _image_files(d)]
    skipped: Skipped = []
    decoded = _decode_files([path for path, _ in files], size, skipped)
    labels = np.array([files[i][1] for i, _ in decoded], np.int64)
    images = [img for _, img in decoded]
    assignment = _stratified_split(labels, seed)
    return _assemble(root, images, labels, assignment, [d.name for d in subdirs], skipped, size)


def _load_split_folders(root: Path, subdirs: list[Path], size: int | None) -> Dataset:
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
    skipped: Skipped = []
    decoded = _decode_files([f[0] for f in files], size, skipped)
    labels = np.array([files[i][1] for i, _ in decoded], np.int64)
    assignment = np.array([files[i][2] for i, _ in decoded], np.int64)
    return _assemble(root, [img for _, img in decoded], labels, assignment, names, skipped, size)


# --------------------------------------------------------------------------- .parquet


def _read_parquet(path: Path, required: Sequence[str]) -> Any:
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


def _decode_rows(
    values: list[Any],
    path: Path,
    size: int | None,
    skipped: Skipped,
    rows: Iterable[int] | None = None,
) -> list[tuple[int, np.ndarray]]:
    """Decode parquet image cells (all, or only ``rows``); return ``(row, image)`` pairs."""
    out = []
    for row in range(len(values)) if rows is None else rows:
        where = f"{path}#row={row}"
        try:
            image = decode_image(_row_bytes(values[row]), where)
        except ImageDecodeError as exc:
            _skip(skipped, where, str(exc))
            continue
        out.append((row, _resize(image, size) if size else image))
    return out


def _encode_labels(values: list[Any], path: Path) -> tuple[np.ndarray, list[str]]:
    """Map a label column to int64 ids; strings become sorted label names."""
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


def _parse_splits(values: list[Any], path: Path) -> np.ndarray:
    keys = [str(v).strip().lower() for v in values]
    bad = sorted({v for v in keys if v not in _SPLIT_ALIASES})
    if bad:
        raise DataError(f"{path}: column 'split' has values {bad[:5]}; expected train, val or test")
    return np.array([_SPLIT_ALIASES[v] for v in keys], np.int64)


def _load_parquet(path: Path, seed: int, size: int | None) -> Dataset:
    table = _read_parquet(path, required=("image", "label"))
    raw_labels = table.column("label").to_pylist()
    skipped: Skipped = []
    for row in (i for i, v in enumerate(raw_labels) if v is None):
        _skip(skipped, f"{path}#row={row}", "missing label (null)")
    labeled = [i for i, v in enumerate(raw_labels) if v is not None]
    decoded = _decode_rows(table.column("image").to_pylist(), path, size, skipped, labeled)
    rows = [r for r, _ in decoded]
    labels, label_names = _encode_labels([raw_labels[r] for r in rows], path)
    if "split" in table.column_names:
        split_values = table.column("split").to_pylist()
        assignment = _parse_splits([split_values[r] for r in rows], path)
    else:
        assignment = _stratified_split(labels, seed)
    return _assemble(
        path, [im for _, im in decoded], labels, assignment, label_names, skipped, size
    )


# --------------------------------------------------------------------------- download


def download_file(url: str, dest: str | Path, md5: str | None = None, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest`` atomically (via ``dest + ".part"``).

    Args:
        url: Any URL urllib can open (``https://``, ``file://``, ...).
        dest: Destination file; parent folders are created.
        md5: Expected MD5 hex digest, or None to skip the check.
        timeout: Socket timeout in seconds.

    Returns:
        ``dest`` as a Path.

    Raises:
        DataError: The download failed or the MD5 did not match (``.part`` is removed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    logger.info("downloading %s to %s", url, dest)
    try:
        digest = _stream_to(url, part, timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        part.unlink(missing_ok=True)
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DataError(f"download of {url} failed: {reason}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if md5 is not None and digest != md5.lower():
        part.unlink(missing_ok=True)
        raise DataError(f"MD5 mismatch for {url}: expected {md5.lower()}, got {digest}")
    os.replace(part, dest)
    return dest


def _stream_to(url: str, part: Path, timeout: float) -> str:
    """Copy the URL's content into ``part`` in 1 MiB chunks; return its MD5 hex digest."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as fh:
        while chunk := response.read(1 << 20):
            fh.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- demo data


def make_demo_dataset(
    dest: str | Path,
    *,
    seed: int = 0,
    n_train: int = 600,
    n_val: int = 150,
    n_test: int = 300,
    size: int = 64,
) -> Path:
    """Generate the offline demo data set ``synthetic-lesions`` as a MedMNIST-style ``.npz``.

    Grayscale ``size x size`` chest-like images (vignetted body, two darker lung fields, rib
    texture, smooth random low-frequency field, noise) in three balanced classes:
    0 ``normal`` (no lesion), 1 ``nodule`` (one or two bright blurred blobs) and 2 ``ring``
    (a blurred annulus around a darker cavity). Lesion contrast varies down to barely
    visible, so the task is learnable but not trivial.

    Args:
        dest: Output ``.npz`` path (written atomically).
        seed: Seed; the same seed gives the same file content.
        n_train: Number of training images.
        n_val: Number of validation images.
        n_test: Number of test images.
        size: Image side length in pixels (>= 16).

    Returns:
        ``dest`` as a Path.
    """
    if size < 16 or min(n_train, n_val, n_test) < 0:
        raise DataError(
            f"make_demo_dataset: need size >= 16 and non-negative counts, got "
            f"size={size}, n_train={n_train}, n_val={n_val}, n_test={n_test}"
        )
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, count in zip(SPLITS, (n_train, n_val, n_test)):
        labels = rng.permutation(np.arange(count) % len(DEMO_LABEL_NAMES))
        arrays[f"{split}_images"] = _synth_images(labels, size, rng)
        arrays[f"{split}_labels"] = labels.astype(np.int64)[:, None]
    arrays["label_names"] = np.array(DEMO_LABEL_NAMES)
    dest = Path(dest)
    _atomic_savez(dest, arrays)
    return dest


def _atomic_savez(dest: Path, arrays: dict[str, np.ndarray]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """``(n, 1, 1)`` float32 uniform draws, ready to broadcast over images."""
    return rng.uniform(lo, hi, n).astype(np.float32)[:, None, None]


def _synth_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    image = _synth_background(n, size, rng, yy, xx)
    image += _synth_lesions(labels, size, rng, yy, xx)
    image += rng.standard_normal((n, size, size), dtype=np.float32) * _uniform(rng, 0.02, 0.05, n)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _smooth_field(n: int, size: int, rng: np.random.Generator, coarse: int = 6) -> np.ndarray:
    """Random low-frequency field: coarse Gaussian noise, bilinearly upsampled."""
    grid = rng.standard_normal((n, coarse, coarse)).astype(np.float32)
    pos = np.linspace(0, coarse - 1, size, dtype=np.float32)
    low = np.minimum(pos.astype(int), coarse - 2)
    frac = pos - low
    interp = np.zeros((size, coarse), np.float32)
    interp[np.arange(size), low] = 1 - frac
    interp[np.arange(size), low + 1] = frac
    return np.einsum("ij,njk,lk->nil", interp, grid, interp)


def _synth_background(
    n: int, size: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    body = (0.62 + _uniform(rng, -0.08, 0.08, n)) * (1 - 0.45 * (xx**2 + yy**2))
    lungs = np.zeros((n, size, size), np.float32)
    for side in (-1.0, 1.0):
        cx, cy = side * (0.42 + _uniform(rng, -0.05, 0.05, n)), _uniform(rng, -0.12, 0.02, n)
        rx, ry = 0.28 * _uniform(rng, 0.9, 1.1, n), 0.58 * _uniform(rng, 0.9, 1.1, n)
        dist = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        lungs += 0.5 - 0.5 * np.tanh((dist - 1) * 4)
    ribs = 0.03 * np.sin(yy * _uniform(rng, 14, 20, n) + _uniform(rng, 0, 2 * np.pi, n))
    depth = _uniform(rng, 0.18, 0.30, n)
    return body - lungs * (depth - ribs) + 0.05 * _smooth_field(n, size, rng)


def _synth_lesions(
    labels: np.ndarray, size: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    n, px = len(labels), 2.0 / size
    out = np.zeros((n, size, size), np.float32)
    for blob in range(2):
        side = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
        cx = side * (0.42 + _uniform(rng, -0.14, 0.14, n))
        cy = _uniform(rng, -0.45, 0.30, n)
        dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / px
        contrast = _uniform(rng, 0.06, 0.40, n)
        if blob == 0:
            radius, width = _uniform(rng, 2.5, 6.5, n), _uniform(rng, 0.7, 1.4, n)
            ring = np.exp(-(((dist - radius) / width) ** 2) / 2)
            cavity = 0.35 * np.exp(-((dist / (0.6 * radius)) ** 2) / 2)
            is_ring = (labels == 2)[:, None, None]
            out += contrast * np.where(is_ring, ring - cavity, 0)
        sigma = _uniform(rng, 1.8, 3.8, n)
        second = (rng.random(n) < 0.35) if blob else np.ones(n, bool)
        weight = ((labels == 1) & second)[:, None, None]
        out += contrast * weight * np.exp(-((dist / sigma) ** 2) / 2)
    return out

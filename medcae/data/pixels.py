"""What every decoder shares: the decode errors, an image's declared size, the limits checked
against it, and the array helpers that shrink and scale decoded pixels.

The lowest floor of :mod:`medcae.data`: NumPy and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Bad input data: missing file, unknown name, missing keys, bad budget, ..."""


class ImageDecodeError(DataError):
    """One image could not be decoded."""


class ImageTooLargeError(ImageDecodeError):
    """An image declares more pixels or bytes than allowed (a possible decompression bomb)."""


class NoPixelDataError(ImageDecodeError):
    """A DICOM file holds no pixel data."""


class NonFinitePixelsError(ImageDecodeError):
    """An image holds NaN or infinite pixel values (float TIFF, float DICOM)."""


@dataclass(frozen=True)
class ImageHeader:
    """The size of an encoded image, read from its headers alone.

    Attributes:
        format: Lower-case format name: ``"png"``, ``"jpeg"``, ``"dicom"``, ``"tiff"``, ...
        width: Columns of one frame.
        height: Rows of one frame.
        frames: Frames that decoding holds: 1 for Pillow formats (the first frame is
            decoded), ``NumberOfFrames`` for DICOM.
        samples: Samples per pixel as stored (1 gray or palette, 3 RGB, 4 RGBA / CMYK, ...).
        bytes_per_sample: Bytes of one decoded sample (1, 2, 4 or 8).
    """

    format: str
    width: int
    height: int
    frames: int
    samples: int
    bytes_per_sample: int

    @property
    def pixels(self) -> int:
        """``width * height * frames``."""
        return self.width * self.height * self.frames

    @property
    def nbytes(self) -> int:
        """Decoded size in bytes: ``pixels * samples * bytes_per_sample``."""
        return self.pixels * self.samples * self.bytes_per_sample


@dataclass(frozen=True)
class DecodeLimits:
    """The limits one decode call applies, and the names its error messages give them."""

    pixels: int
    pixels_name: str
    nbytes: int
    nbytes_name: str


def as_bytes(data: bytes, source: str) -> bytes:
    if not data:
        raise ImageDecodeError(f"cannot decode {source}: empty data (0 bytes)")
    return bytes(data)


def is_dicom(data: bytes, source: str) -> bool:
    return data[128:132] == b"DICM" or str(source).lower().endswith(".dcm")


def describe(header: ImageHeader) -> str:
    return (
        f"{header.format} {header.width}x{header.height}, {header.frames} frame(s) x "
        f"{header.samples} sample(s) x {header.bytes_per_sample} byte(s)"
    )


def check_limits(header: ImageHeader, source: str, limits: DecodeLimits) -> None:
    """Refuse an image whose header declares more pixels or bytes than allowed."""
    if header.pixels > limits.pixels:
        raise ImageTooLargeError(
            f"refusing to decode {source}: {header.pixels} pixels is more than "
            f"{limits.pixels_name}={limits.pixels} ({describe(header)}; possible "
            "decompression bomb)"
        )
    if header.nbytes > limits.nbytes:
        raise ImageTooLargeError(
            f"refusing to decode {source}: {header.nbytes} decoded bytes is more than "
            f"{limits.nbytes_name}={limits.nbytes} ({describe(header)}; possible "
            "decompression bomb)"
        )


def reduce_factor(height: int, width: int, reduce_to: int | None) -> int:
    """``min(height, width) // reduce_to`` when that is at least 2, else 1 (no reduction)."""
    if reduce_to is None:
        return 1
    k = min(height, width) // reduce_to
    return k if k >= 2 else 1


def block_mean(arr: np.ndarray, k: int) -> np.ndarray:
    """Rounded mean of ``k x k`` blocks of ``(H, W[, C])``, in the array's own dtype.

    Integers are summed in an int64/uint64 accumulator and divided with rounding (half up);
    floats are averaged in float64. The last ``H % k`` rows and ``W % k`` columns are dropped.
    """
    h, w = arr.shape[0] // k, arr.shape[1] // k
    blocks = arr[: h * k, : w * k].reshape(h, k, w, k, *arr.shape[2:])
    if arr.dtype.kind == "f":
        return blocks.mean(axis=(1, 3), dtype=np.float64).astype(arr.dtype)
    acc = np.uint64 if arr.dtype.kind in "ub" else np.int64
    sums = blocks.sum(axis=3, dtype=acc).sum(axis=1, dtype=acc)
    return ((sums + acc(k * k // 2)) // acc(k * k)).astype(arr.dtype)


def require_finite(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise NonFinitePixelsError(
            f"cannot use {source}: {bad} of {arr.size} pixel values are NaN or infinite"
        )
    return arr


def scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max scale any numeric array to uint8 0..255 (a constant image becomes 0)."""
    arr = np.nan_to_num(np.asarray(arr, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if arr.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)

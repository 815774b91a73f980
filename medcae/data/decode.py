"""Decoding one encoded image (Pillow formats and DICOM) into a uint8 array, and back to PNG.

The lowest floor of :mod:`medcae.data`: it imports only NumPy, Pillow and the standard library
(pydicom lazily), and nothing else from the package.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

MAX_PIXELS = 100_000_000
_PIXEL_KEYS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DataError(ValueError):
    """Bad input data: missing file, unknown name, missing keys, bad budget, ..."""


class ImageDecodeError(DataError):
    """One image could not be decoded."""


class ImageTooLargeError(ImageDecodeError):
    """An image declares more pixels than allowed (a possible decompression bomb)."""


class NoPixelDataError(ImageDecodeError):
    """A DICOM file holds no pixel data."""


class NonFinitePixelsError(ImageDecodeError):
    """An image holds NaN or infinite pixel values (float TIFF, float DICOM)."""


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode one encoded image (PNG, JPEG, BMP, TIFF, GIF via Pillow; DICOM via pydicom).

    Args:
        data: The encoded file content.
        source: Where the bytes came from (file path or ``file.parquet#row=3``); used in
            error messages, and a ``.dcm`` suffix selects the DICOM decoder.

    Returns:
        uint8 ``(H, W)`` for grayscale or ``(H, W, 3)`` for colour images. EXIF orientation
        is applied; an alpha channel is dropped (the colour channels are kept as they are,
        not composited); of a multi-frame image (DICOM, animated GIF/TIFF) the middle frame
        of DICOM and the first frame of the others is used.

    Raises:
        ImageDecodeError: Empty, truncated, unknown-format or oversized (more than
            ``MAX_PIXELS`` pixels) images, DICOM files without pixel data
            (:class:`NoPixelDataError`) or with malformed header fields, and NaN or infinite
            pixel values (:class:`NonFinitePixelsError`).
    """
    if not data:
        raise ImageDecodeError(f"cannot decode {source}: empty data (0 bytes)")
    data = bytes(data)
    if data[128:132] == b"DICM" or str(source).lower().endswith(".dcm"):
        return _decode_dicom(data, source)
    return _decode_pil(data, source)


def encode_png(image: np.ndarray) -> bytes:
    """Encode one image losslessly as PNG, so that :func:`decode_image` gives it back exactly.

    Args:
        image: uint8 ``(H, W)`` (grayscale) or ``(H, W, 3)`` (RGB).

    Returns:
        The PNG file content (zlib level 1: fast, still lossless).
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(
        buf, format="PNG", compress_level=1
    )
    return buf.getvalue()


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
            return _pil_to_array(ImageOps.exif_transpose(img) or img, source)
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


def _require_finite(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise NonFinitePixelsError(
            f"cannot use {source}: {bad} of {arr.size} pixel values are NaN or infinite"
        )
    return arr


def _pil_to_array(img: Image.Image, source: str) -> np.ndarray:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        return _scale_to_uint8(_require_finite(np.asarray(img, dtype=np.float64), source))
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
    try:
        if not any(key in ds for key in _PIXEL_KEYS):
            raise NoPixelDataError(f"DICOM {source} has no pixel data (no PixelData element)")
        frames = _header_int(ds, "NumberOfFrames", 1, source)
        rows = _header_int(ds, "Rows", 0, source)
        cols = _header_int(ds, "Columns", 0, source)
        samples = _header_int(ds, "SamplesPerPixel", 1, source)
        _check_pixel_count(rows * cols * frames * samples, source)
        try:
            arr = ds.pixel_array
        except Exception as exc:  # missing codec, truncated data, bad attributes, ...
            raise ImageDecodeError(f"cannot decode DICOM pixel data of {source}: {exc}") from exc
        if frames > 1 and arr.ndim >= 3 and arr.shape[0] == frames:
            arr = arr[frames // 2]
        return _dicom_to_uint8(_require_finite(np.asarray(arr), source), ds)
    except ImageDecodeError:
        raise
    except Exception as exc:  # a header value of the wrong type or shape, an unusable LUT, ...
        raise ImageDecodeError(
            f"cannot decode DICOM {source}: malformed header ({type(exc).__name__}: {exc})"
        ) from exc


def _header_int(ds: Any, key: str, default: int, source: str) -> int:
    """A non-negative integer header field, or a clear error naming it."""
    value = ds.get(key, default)
    try:
        out = int(value if value not in (None, "") else default)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(
            f"cannot decode DICOM {source}: header {key} is {str(value)[:40]!r}, "
            "expected a whole number"
        ) from exc
    if out < 0:
        raise ImageDecodeError(f"cannot decode DICOM {source}: header {key} is negative ({out})")
    return out


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

"""Decoding one encoded image (Pillow formats and DICOM) into a uint8 array, and back to PNG.

Every image is sized from its headers before any pixel is decoded (:func:`read_header`), and
refused when it is larger than the caller allows, so that a few hostile bytes cannot make the
process allocate gigabytes:

- *pixels* are ``width * height * frames``, where *frames* are the frames decoding holds: 1
  for Pillow formats (only the first frame of an animated GIF or multi-page TIFF is decoded),
  ``NumberOfFrames`` for DICOM (the whole pixel data is held, the middle frame is kept);
- *bytes* are ``pixels * samples * bytes_per_sample``: an alpha channel counts (it is read,
  then dropped), as does every sample of a 16-bit, 32-bit or float image.

A DICOM file must also hold the pixel data its header declares: native pixel data of exactly
the declared length (plus one byte of padding), encapsulated frames whose JPEG / JPEG 2000
codestreams declare the same size and whose count matches ``NumberOfFrames``, RLE frames with
one segment per sample byte; and a deflated DICOM is inflated under a bound rather than
whole. High-bit-depth images can be shrunk by an integer factor in their own integer type
(``reduce_to``) before they are converted to floating point, so that a 16-bit scan never
exists at full size as float64.

Pillow formats are decoded here, DICOM in :mod:`medcae.data.dicom`; the errors, the header and
the array helpers both use live in :mod:`medcae.data.pixels`. With those two, the floor of
:mod:`medcae.data`: NumPy, Pillow and the standard library (pydicom lazily), nothing else.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from medcae.data.dicom import (
    DEFLATE_ROOM,
    check_dicom_pixel_data,
    decode_dicom,
    dicom_errors,
    dicom_header,
    read_dicom,
)
from medcae.data.pixels import (
    DataError,
    DecodeLimits,
    ImageDecodeError,
    ImageHeader,
    ImageTooLargeError,
    NonFinitePixelsError,
    NoPixelDataError,
    as_bytes,
    block_mean,
    check_limits,
    is_dicom,
    reduce_factor,
    require_finite,
    scale_to_uint8,
)

__all__ = [
    "DataError",
    "ImageDecodeError",
    "ImageHeader",
    "ImageTooLargeError",
    "NoPixelDataError",
    "NonFinitePixelsError",
    "decode_image",
    "encode_png",
    "read_header",
    "scale_to_uint8",
]

logger = logging.getLogger(__name__)

MAX_PIXELS = 100_000_000
MAX_DECODED_BYTES = 512 * 1024**2


def read_header(data: bytes, source: str = "<bytes>") -> ImageHeader:
    """Size of an encoded image from its headers alone; no pixel data is decoded.

    A DICOM file is also checked against its pixel data (native length, encapsulated frame
    count and codestream sizes), so the header returned is the one decoding will honour. A
    deflated DICOM is inflated under ``MAX_DECODED_BYTES`` plus 16 MiB.

    Args:
        data: The encoded file content.
        source: Where the bytes came from; used in error messages, and a ``.dcm`` suffix
            selects the DICOM reader.

    Returns:
        The format, frame size, frame count and sample layout.

    Raises:
        ImageDecodeError: Anything unreadable (subclasses as in :func:`decode_image`),
            including :class:`ImageTooLargeError` for images Pillow refuses to open (more
            than twice ``PIL.Image.MAX_IMAGE_PIXELS``) and deflated DICOM bombs.
    """
    data = as_bytes(data, source)
    if is_dicom(data, source):
        ds = read_dicom(data, source, MAX_DECODED_BYTES + DEFLATE_ROOM)
        with dicom_errors(source):
            header = dicom_header(ds, source)
            check_dicom_pixel_data(ds, header, source)
        return header
    with _pil_errors(source), Image.open(io.BytesIO(data)) as img:
        return _pil_header(img)


def decode_image(
    data: bytes,
    source: str = "<bytes>",
    *,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
    reduce_to: int | None = None,
) -> np.ndarray:
    """Decode one encoded image (PNG, JPEG, BMP, TIFF, GIF via Pillow; DICOM via pydicom).

    The header is read first (:func:`read_header`) and the image refused before any pixel
    is decoded when it declares more than ``max_pixels`` pixels or ``max_bytes`` decoded
    bytes (see the module docstring for what is counted); Pillow's own
    ``MAX_IMAGE_PIXELS`` check applies as well.

    Args:
        data: The encoded file content.
        source: Where the bytes came from (file path or ``file.parquet#row=3``); used in
            error messages, and a ``.dcm`` suffix selects the DICOM decoder.
        max_pixels: Most pixels (``width * height * frames``) to decode; None: the module's
            ``MAX_PIXELS``, read at call time.
        max_bytes: Most decoded bytes (pixels x samples x bytes per sample); None: the
            module's ``MAX_DECODED_BYTES``, read at call time. A deflated DICOM may inflate
            to at most this plus 16 MiB.
        reduce_to: When given and both sides are at least ``2 * reduce_to``, the image is
            shrunk by the integer factor ``k = min(H, W) // reduce_to`` with a rounded block
            mean over ``k x k`` blocks (the last ``H % k`` rows and ``W % k`` columns are
            dropped), giving ``(H // k, W // k)``. It happens in the image's own type, before
            any float conversion: for 16/32-bit and float images and DICOM (after the palette
            lookup, before the modality LUT, windowing and min-max scaling; min-max then uses
            the range of the reduced image) with NumPy in an int64/uint64 accumulator, for
            8-bit Pillow images with ``PIL.Image.reduce`` (the same rounded mean). None:
            full size.

    Returns:
        uint8 ``(H, W)`` for grayscale or ``(H, W, 3)`` for colour images. EXIF orientation
        is applied; an alpha channel is dropped (the colour channels are kept as they are,
        not composited); of a multi-frame image (DICOM, animated GIF/TIFF) the middle frame
        of DICOM (only that frame is decoded) and the first frame of the others is used.

    Raises:
        ImageDecodeError: Empty, truncated or unknown-format images, oversized ones
            (:class:`ImageTooLargeError`), DICOM files without pixel data
            (:class:`NoPixelDataError`), with malformed header fields or with pixel data that
            does not match the header, and NaN or infinite pixel values
            (:class:`NonFinitePixelsError`).
        ValueError: ``reduce_to`` is not a positive number.
    """
    if reduce_to is not None and reduce_to < 1:
        raise ValueError(f"reduce_to must be a positive number of pixels, got {reduce_to}")
    data = as_bytes(data, source)
    limits = DecodeLimits(
        MAX_PIXELS if max_pixels is None else max_pixels,
        "MAX_PIXELS" if max_pixels is None else "max_pixels",
        MAX_DECODED_BYTES if max_bytes is None else max_bytes,
        "MAX_DECODED_BYTES" if max_bytes is None else "max_bytes",
    )
    if is_dicom(data, source):
        return decode_dicom(data, source, limits, reduce_to)
    return _decode_pil(data, source, limits, reduce_to)


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


# --------------------------------------------------------------------------- Pillow


@contextmanager
def _pil_errors(source: str) -> Iterator[None]:
    """Turn whatever Pillow raises into the project's decode errors."""
    try:
        yield
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


def _pil_header(img: Image.Image) -> ImageHeader:
    try:
        mode = ImageMode.getmode(img.mode)
        samples, nbytes = len(mode.bands), np.dtype(mode.typestr).itemsize
    except (KeyError, TypeError, ValueError):  # a mode Pillow cannot describe
        samples, nbytes = len(img.getbands()), 1
    fmt = (img.format or "unknown").lower()
    return ImageHeader(fmt, img.width, img.height, 1, samples, nbytes)


def _check_pil_limit(img: Image.Image, source: str) -> None:
    """Pillow's own bomb limit, applied even below twice the limit (where Pillow only warns)."""
    count = img.width * img.height
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit and count > pil_limit:
        raise ImageTooLargeError(
            f"refusing to decode {source}: {count} pixels is more than "
            f"Pillow's MAX_IMAGE_PIXELS={pil_limit} (decompression bomb?)"
        )


def _decode_pil(
    data: bytes, source: str, limits: DecodeLimits, reduce_to: int | None
) -> np.ndarray:
    with _pil_errors(source), Image.open(io.BytesIO(data)) as img:
        check_limits(_pil_header(img), source, limits)
        _check_pil_limit(img, source)
        img.load()
        if img.getexif().get(0x0112, 1) in range(2, 9):  # EXIF Orientation other than 1
            img = ImageOps.exif_transpose(img)
        k = reduce_factor(img.height, img.width, reduce_to)
        return _pil_to_array(img, source, k)


def _pil_reduce(img: Image.Image, k: int) -> Image.Image:
    """Rounded ``k x k`` block mean of an 8-bit image, dropping the partial last blocks."""
    if k == 1:
        return img
    return img.reduce(k, box=(0, 0, img.width // k * k, img.height // k * k))


def _pil_to_array(img: Image.Image, source: str, k: int) -> np.ndarray:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        arr = require_finite(np.asarray(img), source)  # uint16, int32 or float32
        return scale_to_uint8(block_mean(arr, k) if k > 1 else arr)
    if mode in ("1", "L", "LA", "La"):
        return np.array(_pil_reduce(img.convert("L"), k), dtype=np.uint8)
    if mode in ("P", "PA"):
        rgb = np.array(_pil_reduce(img.convert("RGBA").convert("RGB"), k), dtype=np.uint8)
        gray = (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        return rgb[..., 0].copy() if gray else rgb
    return np.array(_pil_reduce(img.convert("RGB"), k), dtype=np.uint8)

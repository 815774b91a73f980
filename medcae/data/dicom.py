"""DICOM decoding (pydicom, imported lazily) under the limits of :mod:`medcae.data.pixels`.

The header is checked against the pixel data before any pixel is decoded: native pixel data
of exactly the declared length (plus one byte of padding), encapsulated frames whose JPEG /
JPEG 2000 codestreams declare the same size and whose count matches ``NumberOfFrames``, RLE
frames with one segment per sample byte. A deflated file is inflated under a bound. Only the
middle frame of a multi-frame file is decoded; it is shrunk in its own integer type
(``reduce_to``) before the modality LUT and windowing convert it to floating point.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from medcae.data.pixels import (
    DecodeLimits,
    ImageDecodeError,
    ImageHeader,
    ImageTooLargeError,
    NoPixelDataError,
    block_mean,
    check_limits,
    describe,
    reduce_factor,
    require_finite,
    scale_to_uint8,
)

logger = logging.getLogger(__name__)

DEFLATE_ROOM = 16 * 1024**2  # inflated bytes allowed on top of max_bytes for other elements
_INFLATE_IN = 64 * 1024
_INFLATE_OUT = 1024**2
_HEADER_PREFIX = 256 * 1024  # inflated bytes read for the header elements of a deflated set
_PIXEL_KEYS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_FLOAT_BYTES = {"FloatPixelData": 4, "DoubleFloatPixelData": 8}
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_RLE = "1.2.840.10008.1.2.5"  # RLE Lossless
_META_SCAN = 64 * 1024
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # F7: JPEG-LS SOF55
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"


# --------------------------------------------------------------------------- DICOM: reading


def read_dicom(data: bytes, source: str, inflate_limit: int) -> Any:
    """Parse a DICOM file; a deflated one is inflated to at most ``inflate_limit`` bytes."""
    import pydicom

    meta, body_start = _peek_file_meta(data)
    try:
        if meta is not None and str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
            ds = _read_deflated(data, meta, body_start, source, inflate_limit)
        elif meta is None and _DEFLATED.encode() in data[:_META_SCAN]:
            raise ImageDecodeError(
                f"cannot read DICOM {source}: it names the deflated transfer syntax, "
                "but its file meta information is unreadable"
            )
        else:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except ImageDecodeError:
        raise
    except Exception as exc:  # pydicom raises InvalidDicomError, EOFError, ValueError, ...
        raise ImageDecodeError(f"cannot read DICOM {source}: {exc}") from exc
    if len(ds) == 0:
        raise ImageDecodeError(f"cannot read DICOM {source}: no DICOM data elements found")
    return ds


def _peek_file_meta(data: bytes) -> tuple[Any, int]:
    """The file meta group as ``pydicom.dcmread(force=True)`` reads it, and where it ends.

    Returns ``(None, 0)`` when it cannot be read (then pydicom's own reader reports why).
    """
    from pydicom.filereader import read_dataset

    start = 132 if data[128:132] == b"DICM" else 0
    for implicit in (False, True):  # pydicom retries an unreadable meta as implicit VR
        fp = io.BytesIO(data)
        fp.seek(start)
        try:
            meta = read_dataset(
                fp, implicit, True, stop_when=lambda tag, vr, length: tag >> 16 != 2
            )
            for elem in meta:  # values are converted lazily; force them as pydicom does
                _ = elem.value
            return meta, fp.tell()
        except NotImplementedError:
            continue
        except Exception:  # noqa: BLE001 - unreadable meta: pydicom's reader says why
            return None, 0
    return None, 0


def _read_deflated(data: bytes, meta: Any, body_start: int, source: str, limit: int) -> Any:
    """Inflate a deflated DICOM data set under ``limit`` bytes and parse it."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    body = memoryview(data)[body_start:]
    size = _inflated_size(body, limit, source)
    inflated = zlib.decompress(body, -zlib.MAX_WBITS, max(size, 1)) if size else b""
    fp = DicomBytesIO(inflated)
    ds = read_dataset(fp, is_implicit_VR=False, is_little_endian=True)
    preamble = data[:128] if data[128:132] == b"DICM" else None
    return FileDataset(
        fp,
        ds,
        preamble=preamble,
        file_meta=FileMetaDataset(meta),
        is_implicit_VR=False,
        is_little_endian=True,
    )


def _inflated_size(body: memoryview, limit: int, source: str) -> int:
    """Bytes that a raw deflate stream inflates to, counted in 1 MiB pieces, up to ``limit``.

    As soon as the first ``_HEADER_PREFIX`` inflated bytes are in, the image's header elements
    are read from them: a data set whose header declares more pixel bytes than ``limit`` is
    refused then, and one that declares fewer may inflate to at most its declared pixel bytes
    plus ``DEFLATE_ROOM`` (its pixel data must match its header anyway). A bomb therefore costs
    the inflation of its first piece, not of ``limit`` bytes.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, prefix, checked = 0, bytearray(), False

    def count(piece: bytes) -> int:
        nonlocal limit, checked
        if not checked:
            prefix.extend(piece[: _HEADER_PREFIX - len(prefix)])
            if len(prefix) >= _HEADER_PREFIX or inflater.eof:
                checked = True
                declared = _declared_pixel_bytes(bytes(prefix))
                if declared is not None and declared > limit:
                    raise ImageTooLargeError(
                        f"refusing to decode {source}: its deflated data set declares "
                        f"{declared} bytes of pixel data, more than the limit of {limit}"
                    )
                if declared is not None:
                    limit = min(limit, declared + DEFLATE_ROOM)
        if total + len(piece) > limit:
            raise ImageTooLargeError(
                f"refusing to decode {source}: its deflated data set inflates to more than "
                f"{limit} bytes (the decoded-bytes limit, or its declared pixel bytes, plus "
                f"{DEFLATE_ROOM} bytes for the other elements; a zip bomb?)"
            )
        return len(piece)

    for start in range(0, len(body), _INFLATE_IN):
        pending: bytes | memoryview = body[start : start + _INFLATE_IN]
        while pending and not inflater.eof:
            total += count(inflater.decompress(pending, _INFLATE_OUT))
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    while not inflater.eof:  # output still held inside zlib after the last input
        piece = inflater.decompress(b"", _INFLATE_OUT)
        if not piece:
            raise ImageDecodeError(
                f"cannot read DICOM {source}: its deflated data set is truncated "
                f"({total} bytes inflated before the data ended)"
            )
        total += count(piece)
    return total


def _declared_pixel_bytes(prefix: bytes) -> int | None:
    """Pixel bytes that the header elements at the start of an inflated data set declare
    (rows x columns x frames x samples x bytes per sample), or None when they cannot be read."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset

    try:
        ds = read_dataset(
            DicomBytesIO(prefix),
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=lambda tag, vr, length: tag >= 0x7FE00008,  # the pixel data elements
        )
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = max(int(ds.get("NumberOfFrames", 1) or 1), 1)
        samples = max(int(ds.get("SamplesPerPixel", 1) or 1), 1)
        nbytes = max((int(ds.get("BitsAllocated", 8) or 8) + 7) // 8, 1)
    except Exception:  # a truncated or odd prefix: the full parse decides, under the limit
        return None
    if rows <= 0 or cols <= 0:
        return None
    return rows * cols * frames * samples * nbytes


# --------------------------------------------------------------------------- DICOM: header


@contextmanager
def dicom_errors(source: str) -> Iterator[None]:
    """Turn a header value of the wrong type or shape into an ImageDecodeError naming it."""
    try:
        yield
    except ImageDecodeError:
        raise
    except Exception as exc:  # a header value of the wrong type or shape, an unusable LUT, ...
        raise ImageDecodeError(
            f"cannot decode DICOM {source}: malformed header ({type(exc).__name__}: {exc})"
        ) from exc


def _pixel_key(ds: Any, source: str) -> str:
    for key in _PIXEL_KEYS:
        if key in ds:
            return key
    raise NoPixelDataError(f"DICOM {source} has no pixel data (no PixelData element)")


def dicom_header(ds: Any, source: str) -> ImageHeader:
    key = _pixel_key(ds, source)
    rows = _positive_int(ds, "Rows", 0, source)
    cols = _positive_int(ds, "Columns", 0, source)
    samples = _positive_int(ds, "SamplesPerPixel", 1, source)
    frames = _header_int(ds, "NumberOfFrames", 1, source) or 1  # 0 means 1, as in pydicom
    return ImageHeader("dicom", cols, rows, frames, samples, _bytes_per_sample(ds, key, source))


def _bytes_per_sample(ds: Any, key: str, source: str) -> int:
    if key in _FLOAT_BYTES:
        return _FLOAT_BYTES[key]
    bits = _header_int(ds, "BitsAllocated", 0, source)
    if bits != 1 and (bits % 8 or not 8 <= bits <= 64):
        raise ImageDecodeError(
            f"cannot decode DICOM {source}: header BitsAllocated is {bits}, "
            "expected 1 or a multiple of 8 up to 64"
        )
    return max(1, bits // 8)


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


def _positive_int(ds: Any, key: str, default: int, source: str) -> int:
    out = _header_int(ds, key, default, source)
    if out == 0:
        raise ImageDecodeError(
            f"cannot decode DICOM {source}: header {key} is missing or 0, "
            "expected a positive whole number"
        )
    return out


# --------------------------------------------------------------------------- DICOM: pixel data


def _transfer_syntax(ds: Any) -> Any:
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(value)) if value else None


def check_dicom_pixel_data(ds: Any, header: ImageHeader, source: str) -> None:
    """Refuse pixel data that does not hold what the header declares (before decoding)."""
    key = _pixel_key(ds, source)
    ts = _transfer_syntax(ds)
    if key == "PixelData" and ts is not None and _is_encapsulated(ts, source):
        _check_fragments(ds, header, ts, source)
    else:
        _check_native_length(ds, key, header, source)


def _is_encapsulated(ts: Any, source: str) -> bool:
    try:
        return bool(ts.is_encapsulated)
    except ValueError as exc:  # not a transfer syntax pydicom knows
        raise ImageDecodeError(
            f"cannot decode DICOM {source}: unsupported transfer syntax {str(ts)[:64]!r}"
        ) from exc


def _check_native_length(ds: Any, key: str, header: ImageHeader, source: str) -> None:
    samples = header.pixels * header.samples
    if key == "PixelData" and int(ds.get("BitsAllocated", 0) or 0) == 1:
        expected = -(-samples // 8)  # bit-packed
    else:
        expected = samples * header.bytes_per_sample
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if key == "PixelData" and photometric == "YBR_FULL_422":
        expected = expected // 3 * 2  # two chroma samples shared by each pair of pixels
    actual = len(ds[key].value or b"")
    if not expected <= actual <= expected + 1:
        raise ImageDecodeError(
            f"cannot decode DICOM {source}: {key} holds {actual} bytes, but the header "
            f"({describe(header)}) needs {expected} (plus at most 1 byte of padding)"
        )


def _check_fragments(ds: Any, header: ImageHeader, ts: Any, source: str) -> None:
    """Count the encapsulated frames and check each frame's declared codestream size."""
    from pydicom.encaps import generate_fragmented_frames

    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    found = 0
    try:
        frames = generate_fragmented_frames(
            ds.PixelData, number_of_frames=header.frames, extended_offsets=extended
        )
        for fragments in frames:
            if found == header.frames:
                found += 1  # one too many is enough to know
                break
            _check_frame(fragments, found, header, ts, source)
            found += 1
    except ImageDecodeError:
        raise
    except Exception as exc:  # pydicom: bad item tags, lengths past the end, ...
        raise ImageDecodeError(
            f"cannot decode DICOM {source}: malformed encapsulated pixel data "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if found != header.frames:
        held = f"more than {header.frames}" if found > header.frames else str(found)
        raise ImageDecodeError(
            f"cannot decode DICOM {source}: header NumberOfFrames is {header.frames}, but "
            f"the encapsulated pixel data holds {held} frame(s)"
        )


def _check_frame(
    fragments: tuple[bytes, ...], index: int, header: ImageHeader, ts: Any, source: str
) -> None:
    """Compare one frame's codestream header with Columns x Rows x SamplesPerPixel.

    JPEG (incl. lossless and JPEG-LS) and JPEG 2000 (codestream or JP2) frames are
    recognised by their first bytes; RLE frames by the transfer syntax. Other codestreams
    are left to pydicom.
    """
    head = fragments[0] if len(fragments) == 1 else b"".join(fragments)
    where = f"cannot decode DICOM {source}: frame {index}"
    if str(ts) == _RLE:
        _check_rle_segments(head, header, where)
        return
    if head[:2] == b"\xff\xd8":
        kind, size = "JPEG", _jpeg_size(head)
    elif head[:4] == _J2K_SOC_SIZ:
        kind, size = "JPEG 2000", _j2k_size(head, 0)
    elif head[:12] == _JP2_SIGNATURE:
        kind, size = "JP2", _jp2_size(head)
    else:
        return
    if size is None:
        raise ImageDecodeError(f"{where} is a {kind} codestream without a readable frame header")
    if size != (header.width, header.height, header.samples):
        width, height, components = size
        raise ImageDecodeError(
            f"{where} is a {kind} codestream of {width}x{height} pixels x {components} "
            f"component(s), but the header declares Columns x Rows {header.width}x"
            f"{header.height} x SamplesPerPixel {header.samples}"
        )


def _check_rle_segments(head: bytes, header: ImageHeader, where: str) -> None:
    expected = header.samples * header.bytes_per_sample
    segments = int.from_bytes(head[:4], "little") if len(head) >= 64 else None
    if segments != expected:
        got = "no 64-byte RLE header" if segments is None else f"{segments} RLE segment(s)"
        raise ImageDecodeError(
            f"{where} has {got}, but the header needs {expected} "
            "(SamplesPerPixel x bytes per sample)"
        )


def _jpeg_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's SOF marker segment, or None."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        pos += 2
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any SOF
            return None
        if marker in _JPEG_SOF:
            if pos + 8 > len(data):
                return None
            height = int.from_bytes(data[pos + 3 : pos + 5], "big")
            width = int.from_bytes(data[pos + 5 : pos + 7], "big")
            return width, height, data[pos + 7]
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return None
        pos += length
    return None


def _j2k_size(data: bytes, start: int) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG 2000 codestream's SIZ marker, or None."""
    if data[start : start + 4] != _J2K_SOC_SIZ or len(data) < start + 42:
        return None

    def u32(offset: int) -> int:
        return int.from_bytes(data[start + offset : start + offset + 4], "big")

    width, height = u32(8) - u32(16), u32(12) - u32(20)
    return width, height, int.from_bytes(data[start + 40 : start + 42], "big")


def _jp2_size(data: bytes) -> tuple[int, int, int] | None:
    """The size declared by the codestream in a JP2 file's ``jp2c`` box, or None."""
    pos = 0
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        box = data[pos + 4 : pos + 8]
        header = 8
        if length == 1:  # 64-bit length follows
            length, header = int.from_bytes(data[pos + 8 : pos + 16], "big"), 16
        if box == b"jp2c":
            return _j2k_size(data, pos + header)
        if length == 0 or length < header:  # last box, or malformed
            return None
        pos += length
    return None


# --------------------------------------------------------------------------- DICOM: decoding


def decode_dicom(
    data: bytes, source: str, limits: DecodeLimits, reduce_to: int | None
) -> np.ndarray:
    ds = read_dicom(data, source, limits.nbytes + DEFLATE_ROOM)
    with dicom_errors(source):
        header = dicom_header(ds, source)
        check_limits(header, source, limits)
        check_dicom_pixel_data(ds, header, source)
        arr = require_finite(_dicom_frame(ds, header, source), source)
        return _dicom_to_uint8(arr, ds, reduce_to)


def _dicom_frame(ds: Any, header: ImageHeader, source: str) -> np.ndarray:
    """The only frame, or the middle one of a multi-frame file (decoding only that frame)."""
    from pydicom.pixels import pixel_array

    try:
        if header.frames > 1:
            return np.asarray(pixel_array(ds, index=header.frames // 2))
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # missing codec, truncated data, bad attributes, ...
        raise ImageDecodeError(f"cannot decode DICOM pixel data of {source}: {exc}") from exc


def _dicom_to_uint8(arr: np.ndarray, ds: Any, reduce_to: int | None) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    k = reduce_factor(arr.shape[0], arr.shape[1], reduce_to) if arr.ndim >= 2 else 1
    if k > 1:
        arr = block_mean(arr, k)
    if arr.ndim == 3:
        return arr if arr.dtype == np.uint8 else scale_to_uint8(arr)
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
    return scale_to_uint8(values)

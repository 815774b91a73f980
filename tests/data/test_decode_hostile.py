"""Hostile images: malformed DICOM headers, NaN pixels, EXIF orientation, random bytes, bombs.

Every failure is one of the project's decode errors (a 4xx on the endpoint), never anything
else; the property-based tests search for counterexamples instead of listing them. Images that
declare more than allowed are refused from their headers (checked with ``tracemalloc``), DICOM
pixel data must match its header, and ``reduce_to`` shrinks images in their own integer type.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from helpers import (
    MB,
    deflated_bomb,
    dicom,
    encapsulated_dicom,
    encode,
    file_meta,
    image_dataset,
    native_dicom,
    save_dicom,
    with_jpeg_size,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medcae.data import (
    MAX_DECODED_BYTES,
    ImageDecodeError,
    ImageHeader,
    ImageTooLargeError,
    NonFinitePixelsError,
    NoPixelDataError,
    decode_image,
    read_header,
)
from medcae.data import decode as decode_module
from medcae.serving.api import Limits, RequestError, decode_request_image


def _seq(*items):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    return Sequence([Dataset() for _ in items])


MALFORMED = {
    "non-numeric Rows": dict(Rows=("LO", "abcd")),
    "non-numeric NumberOfFrames": dict(NumberOfFrames=("LO", "x")),
    "negative NumberOfFrames": dict(NumberOfFrames=("IS", "-3")),
    "non-numeric WindowCenter": dict(WindowCenter=("LO", "abc"), WindowWidth=("DS", "100")),
    "sequence WindowCenter": dict(WindowCenter=("SQ", _seq(1)), WindowWidth=("DS", "100")),
    "text RescaleSlope": dict(RescaleSlope=("LO", "steep"), RescaleIntercept=("DS", "0")),
    "palette without its LUT": dict(PhotometricInterpretation=("CS", "PALETTE COLOR")),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_dicom_headers_are_decode_errors_and_400s(case):
    blob = dicom(**MALFORMED[case])
    with pytest.raises(ImageDecodeError, match="DICOM"):
        decode_image(blob, "scan.dcm")
    with pytest.raises(RequestError) as err:
        decode_request_image(blob, Limits())
    assert (err.value.status, err.value.code) == (400, "corrupt_image"), err.value.detail


def test_frame_count_counts_towards_the_pixel_limit_before_decoding():
    with pytest.raises(ImageTooLargeError, match="pixels is more than"):
        decode_image(dicom(NumberOfFrames=("IS", "99999999")), "scan.dcm")


def test_nan_and_infinite_pixels_are_refused_with_422():
    px = np.linspace(0, 1, 64, dtype=np.float32)
    assert decode_image(dicom(px), "f.dcm").dtype == np.uint8  # finite floats decode
    for bad in (np.nan, np.inf, -np.inf):
        px2 = px.copy()
        px2[5] = bad
        with pytest.raises(NonFinitePixelsError, match="1 of 64 pixel values are NaN or inf"):
            decode_image(dicom(px2), "f.dcm")
        with pytest.raises(RequestError) as err:
            decode_request_image(dicom(px2), Limits())
        assert (err.value.status, err.value.code) == (422, "non_finite_pixels")


def test_dicom_without_pixels_is_still_its_own_error():
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.PatientName = "x"
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)
    with pytest.raises(NoPixelDataError):
        decode_image(buf.getvalue(), "empty.dcm")


def test_exif_orientation_is_applied():
    """A camera JPEG stored landscape with 'rotate 90' decodes as the portrait it shows."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = 255  # a white band on the left of the stored pixels
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), "photo.jpg")
    assert out.shape[:2] == (40, 20)  # portrait, as displayed
    assert out[:10].mean() > 200 and out[-10:].mean() < 50  # the band is now on top


def test_alpha_is_dropped_and_multiframe_takes_the_first_frame():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # red, fully transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (8, 8, 3) and (out[..., 0] == 200).all()  # colour kept, alpha dropped
    frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="TIFF", save_all=True, append_images=frames[1:])
    assert (decode_image(buf.getvalue()) == 10).all()


# --------------------------------------------------------------------------- builders


def rle_dicom(pixels: np.ndarray, *, header_bits: int | None = None) -> bytes:
    """``(rows, cols)`` uint8/uint16 RLE Lossless; ``header_bits`` then overrides BitsAllocated."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    bits = pixels.dtype.itemsize * 8
    ds = image_dataset(*pixels.shape, bits=bits)
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless)
    if header_bits is not None:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = header_bits, header_bits, header_bits - 1
    return save_dicom(ds, RLELossless)


def with_j2k_size(j2k: bytes, width: int, height: int) -> bytes:
    """A JPEG 2000 codestream or JP2 file whose SIZ marker declares another size."""
    start = j2k.index(b"jp2c") + 4 if j2k[:4] != b"\xff\x4f\xff\x51" else 0
    siz = start + 8  # SOC, SIZ, Lsiz, Rsiz, then Xsiz and Ysiz
    return j2k[:siz] + struct.pack(">II", width, height) + j2k[siz + 8 :]


def png_declaring(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit grayscale PNG with the given IHDR size and IDAT content."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def peak_memory(fn, *args, **kwargs) -> tuple[int, float, BaseException | None]:
    """Peak traced bytes, seconds (not asserted: the machine is shared), and the exception
    (if any) of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    error = None
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - returned for the caller to check
        error = exc
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, seconds, error


def block_mean(image: np.ndarray, k: int) -> np.ndarray:
    """Reference: mean of ``k x k`` blocks in float64 (partial blocks dropped)."""
    h, w = image.shape[0] // k, image.shape[1] // k
    blocks = image[: h * k, : w * k].reshape(h, k, w, k, *image.shape[2:])
    return blocks.mean(axis=(1, 3))


def blocky_16bit(height: int, width: int, k: int, seed: int = 0) -> np.ndarray:
    """uint16 with ±500 noise in every ``k x k`` block, and its extremes in whole blocks.

    Min-max scaling after a reduction uses the reduced image's range; with the extremes in
    whole blocks that range is the full image's, so reducing first and scaling first agree.
    """
    rng = np.random.default_rng(seed)
    small = rng.integers(1000, 59000, (-(-height // k), -(-width // k)))
    image = np.kron(small, np.ones((k, k), np.int64))[:height, :width]
    image += rng.integers(-500, 501, image.shape)
    image[:k, :k], image[:k, k : 2 * k] = 0, 60000
    return image.astype(np.uint16)


# --------------------------------------------------------------------------- read_header


HEADERS = {
    "png gray": (encode(np.zeros((7, 9), np.uint8)), ImageHeader("png", 9, 7, 1, 1, 1)),
    "png rgba": (encode(np.zeros((7, 9, 4), np.uint8)), ImageHeader("png", 9, 7, 1, 4, 1)),
    "png 16-bit": (encode(np.zeros((7, 9), np.uint16)), ImageHeader("png", 9, 7, 1, 1, 2)),
    "jpeg rgb": (encode(np.zeros((7, 9, 3), np.uint8), "JPEG"), ImageHeader("jpeg", 9, 7, 1, 3, 1)),
    "tiff float": (
        encode(Image.fromarray(np.zeros((7, 9), np.float32), "F"), "TIFF"),
        ImageHeader("tiff", 9, 7, 1, 1, 4),
    ),
    "gif palette": (encode(np.zeros((7, 9), np.uint8), "GIF"), ImageHeader("gif", 9, 7, 1, 1, 1)),
    "dicom 3 frames": (
        native_dicom(np.zeros((3, 7, 9), np.uint16)),
        ImageHeader("dicom", 9, 7, 3, 1, 2),
    ),
    "dicom float": (dicom(np.zeros(64, np.float32)), ImageHeader("dicom", 8, 8, 1, 1, 4)),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_read_header_sizes_images_without_decoding(case):
    blob, expected = HEADERS[case]
    header = read_header(blob, "x")
    assert header == expected
    assert header.pixels == expected.width * expected.height * expected.frames
    assert header.nbytes == header.pixels * expected.samples * expected.bytes_per_sample


def test_read_header_refuses_unreadable_bytes():
    for blob, name in ((b"", "x.png"), (b"not an image", "x.png"), (b"\0" * 300, "x.dcm")):
        with pytest.raises(ImageDecodeError, match=name):
            read_header(blob, name)


# --------------------------------------------------------------------------- limits


def test_limits_name_the_source_the_count_and_the_limit(monkeypatch):
    png16 = encode(np.zeros((16, 16), np.uint16))  # 256 pixels, 512 bytes
    assert decode_image(png16, "ok.png", max_pixels=256, max_bytes=512).shape == (16, 16)
    with pytest.raises(ImageTooLargeError, match=r"a\.png: 256 pixels is more than max_pixels=255"):
        decode_image(png16, "a.png", max_pixels=255)
    with pytest.raises(ImageTooLargeError, match=r"b\.png: 512 decoded bytes .* max_bytes=511"):
        decode_image(png16, "b.png", max_bytes=511)
    rgba = encode(np.zeros((16, 16, 4), np.uint8))  # the alpha channel counts: 1024 bytes
    with pytest.raises(ImageTooLargeError, match="1024 decoded bytes"):
        decode_image(rgba, "c.png", max_bytes=1000)
    monkeypatch.setattr(decode_module, "MAX_PIXELS", 100)  # module limits are read per call
    with pytest.raises(ImageTooLargeError, match="256 pixels is more than MAX_PIXELS=100"):
        decode_image(png16)
    with pytest.raises(ImageTooLargeError, match="MAX_PIXELS=100"):
        decode_image(native_dicom(np.zeros((11, 11), np.uint16)))
    monkeypatch.setattr(decode_module, "MAX_PIXELS", 10**8)
    monkeypatch.setattr(decode_module, "MAX_DECODED_BYTES", 500)
    with pytest.raises(ImageTooLargeError, match="512 decoded bytes .* MAX_DECODED_BYTES=500"):
        decode_image(png16)


def test_jpeg_of_700_bytes_declaring_9000x9000_is_refused_from_its_header():
    jpeg = with_jpeg_size(encode(np.zeros((16, 16), np.uint8), "JPEG"), 9000, 9000)
    assert len(jpeg) < 1000
    assert read_header(jpeg) == ImageHeader("jpeg", 9000, 9000, 1, 1, 1)
    peak, _, err = peak_memory(decode_image, jpeg, "bomb.jpg", max_pixels=16_000_000)
    assert type(err) is ImageTooLargeError and "81000000 pixels" in str(err)
    assert peak < 2 * MB  # an 81 Mpx frame would be 81 MB: refused before decoding
    rgb = with_jpeg_size(encode(np.zeros((16, 16, 3), np.uint8), "JPEG"), 9000, 9000)
    peak, _, err = peak_memory(decode_image, rgb, "bomb.jpg", max_bytes=64 * MB)
    assert type(err) is ImageTooLargeError and "243000000 decoded bytes" in str(err)
    assert peak < 2 * MB


def test_png_of_10kb_declaring_9000x9000_is_refused_from_its_header():
    idat = zlib.compress(np.random.default_rng(0).bytes(10_000))
    png = png_declaring(9000, 9000, idat)
    assert 10_000 <= len(png) < 11_000
    peak, _, err = peak_memory(decode_image, png, "bomb.png", max_pixels=16_000_000)
    assert type(err) is ImageTooLargeError and "max_pixels=16000000" in str(err)
    assert peak < 2 * MB


def test_multiframe_dicom_counts_every_frame():
    frames = np.zeros((100, 64, 64), np.uint16)  # 409600 pixels, 819200 bytes
    blob = native_dicom(frames)
    with pytest.raises(ImageTooLargeError, match="819200 decoded bytes .* max_bytes=500000"):
        decode_image(blob, "mf.dcm", max_bytes=500_000)
    with pytest.raises(ImageTooLargeError, match="409600 pixels .* max_pixels=400000"):
        decode_image(blob, "mf.dcm", max_pixels=400_000)
    one = native_dicom(frames[0])
    assert decode_image(one, "one.dcm", max_bytes=500_000, max_pixels=400_000).shape == (64, 64)


def test_dicom_multiframe_decodes_the_middle_frame():
    frames = np.zeros((3, 4, 4), np.uint16)
    for k in range(3):
        frames[k].flat[k] = 1000
    expected = np.zeros((4, 4), np.uint8)
    expected.flat[1] = 255
    np.testing.assert_array_equal(decode_image(native_dicom(frames), "mf.dcm"), expected)


# --------------------------------------------------------------------------- DICOM vs its data


@pytest.mark.parametrize("extra", [-2, 2, 100])
def test_native_pixel_data_must_have_the_declared_length(extra):
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    blob = native_dicom(pixels, pixel_data=bytes(128 + extra))
    for fn in (read_header, decode_image):
        with pytest.raises(ImageDecodeError, match=f"holds {128 + extra} bytes.* needs 128") as e:
            fn(blob, "short.dcm")
        assert type(e.value) is ImageDecodeError


def test_odd_length_pixel_data_may_carry_one_padding_byte():
    pixels = np.arange(9, dtype=np.uint8).reshape(3, 3)  # 9 bytes, written padded to 10
    assert decode_image(native_dicom(pixels), "odd.dcm").shape == (3, 3)


def test_jpeg_fragment_must_match_the_header_size():
    from pydicom.uid import JPEGBaseline8Bit

    gradient = np.tile(np.arange(0, 160, 16, dtype=np.uint8), (10, 1))
    jpeg = encode(gradient, "JPEG", quality=95)
    ok = decode_image(encapsulated_dicom([jpeg], 10, 10, JPEGBaseline8Bit), "ok.dcm")
    assert (
        ok.shape == (10, 10)
        and np.abs(ok.astype(int) - gradient.astype(int) * 255 // 144).max() <= 8
    )
    smuggled = encapsulated_dicom([with_jpeg_size(jpeg, 9000, 9000)], 10, 10, JPEGBaseline8Bit)
    for fn in (read_header, decode_image):
        peak, _, err = peak_memory(fn, smuggled, "smuggled.dcm")
        assert type(err) is ImageDecodeError, err
        assert "9000x9000 pixels" in str(err) and "10x10" in str(err)
        assert peak < 2 * MB
    rgb = encode(np.zeros((10, 10, 3), np.uint8), "JPEG")  # 3 components for 1 sample
    with pytest.raises(ImageDecodeError, match="3 component"):
        decode_image(encapsulated_dicom([rgb], 10, 10, JPEGBaseline8Bit), "rgb.dcm")


@pytest.mark.parametrize("jp2", [False, True], ids=["codestream", "jp2"])
def test_jpeg2000_frame_must_match_the_header_size(jp2):
    from pydicom.uid import JPEG2000Lossless

    image = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (12, 1))  # 16 x 12
    j2k = encode(image, "JPEG2000", no_jp2=not jp2)
    ok = decode_image(encapsulated_dicom([j2k], 12, 16, JPEG2000Lossless), "ok.dcm")
    np.testing.assert_array_equal(ok, np.rint(image * (255 / 225)).astype(np.uint8))
    for blob in (
        encapsulated_dicom([j2k], 10, 10, JPEG2000Lossless),
        encapsulated_dicom([with_j2k_size(j2k, 9000, 9000)], 12, 16, JPEG2000Lossless),
    ):
        with pytest.raises(ImageDecodeError, match="JP(EG )?2.* codestream of") as err:
            decode_image(blob, "j2k.dcm")
        assert type(err.value) is ImageDecodeError


def test_encapsulated_frame_count_must_match_number_of_frames():
    from pydicom.uid import JPEGBaseline8Bit

    frames = [
        encode(np.rot90(np.tile(np.arange(0, 160, 16, dtype=np.uint8), (10, 1)), k), "JPEG")
        for k in range(3)
    ]
    good = encapsulated_dicom(frames, 10, 10, JPEGBaseline8Bit, has_bot=False)
    middle = encapsulated_dicom(frames[1:2], 10, 10, JPEGBaseline8Bit)
    np.testing.assert_array_equal(decode_image(good, "mf.dcm"), decode_image(middle, "one.dcm"))
    cases = {
        "holds 2 frame": encapsulated_dicom(
            frames[:2], 10, 10, JPEGBaseline8Bit, number_of_frames=3
        ),
        "more than 2": encapsulated_dicom(frames, 10, 10, JPEGBaseline8Bit, number_of_frames=2),
        "fewer fragments": encapsulated_dicom(
            frames[:2], 10, 10, JPEGBaseline8Bit, has_bot=False, number_of_frames=3
        ),
    }
    for message, blob in cases.items():
        with pytest.raises(ImageDecodeError, match=message) as err:
            decode_image(blob, "frames.dcm")
        assert type(err.value) is ImageDecodeError


def test_rle_segments_must_match_samples_and_bytes():
    pixels = (np.arange(12 * 16).reshape(12, 16) * 300).astype(np.uint16)
    np.testing.assert_array_equal(
        decode_image(rle_dicom(pixels), "rle.dcm"), decode_image(native_dicom(pixels), "n.dcm")
    )
    eight_bit = rle_dicom(pixels.astype(np.uint8), header_bits=16)  # 1 segment, 2 needed
    with pytest.raises(ImageDecodeError, match="1 RLE segment.* needs 2") as err:
        decode_image(eight_bit, "rle.dcm")
    assert type(err.value) is ImageDecodeError


# --------------------------------------------------------------------------- deflated DICOM


def test_deflated_dicom_decodes_like_the_uncompressed_one():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    pixels = np.repeat(np.arange(40, dtype=np.uint16)[:, None] * 100, 30, axis=1)
    pixels[5:9, 3:7] = 9000
    deflated = native_dicom(pixels, DeflatedExplicitVRLittleEndian)
    assert len(deflated) < len(native_dicom(pixels)) - pixels.nbytes // 2  # really compressed
    assert read_header(deflated, "d.dcm") == ImageHeader("dicom", 30, 40, 1, 1, 2)
    np.testing.assert_array_equal(
        decode_image(deflated, "d.dcm"), decode_image(native_dicom(pixels), "n.dcm")
    )


def test_deflated_bomb_is_refused_before_it_is_inflated():
    bomb = deflated_bomb(4096, 4096)  # 33 KB inflating to 32 MiB
    assert len(bomb) < 40_000
    peak, _, err = peak_memory(decode_image, bomb, "bomb.dcm", max_bytes=MB)
    assert type(err) is ImageTooLargeError and "declares 33554432 bytes of pixel data" in str(err)
    assert peak < 4 * MB  # refused from its header, in the first piece


def test_deflated_bomb_with_a_lying_header_stops_at_its_declared_size():
    bomb = deflated_bomb(4096, 4096, declare=(64, 64))  # says 8 KiB, inflates to 32 MiB
    peak, _, err = peak_memory(decode_image, bomb, "bomb.dcm")
    assert type(err) is ImageTooLargeError and "inflates to more than" in str(err)
    assert str(64 * 64 * 2 + 16 * MB) in str(err)  # its declared pixel bytes + 16 MiB
    assert peak < 4 * MB


def test_deflated_bomb_at_the_default_limit_stays_small_in_memory():
    bomb = deflated_bomb(4096, 4096, frames=17)  # 555 KB inflating to 544 MiB
    peak, _, err = peak_memory(decode_image, bomb, "bomb.dcm")
    assert type(err) is ImageTooLargeError, err
    assert str(MAX_DECODED_BYTES + 16 * MB) in str(err) and "declares" in str(err)
    assert peak < 4 * MB  # not 544 MiB of inflation
    peak, _, err = peak_memory(read_header, bomb, "bomb.dcm")
    assert type(err) is ImageTooLargeError and peak < 4 * MB


def test_truncated_deflated_dicom_is_a_decode_error():
    bomb = deflated_bomb(64, 64)
    with pytest.raises(ImageDecodeError, match="truncated") as err:
        decode_image(bomb[:-10], "cut.dcm")
    assert type(err.value) is ImageDecodeError


# --------------------------------------------------------------------------- reduce_to


def test_reduce_to_shrinks_16bit_png_and_dicom_before_float_conversion():
    image = blocky_16bit(768, 1024, 6)  # reduce_to=112: k = 768 // 112 = 6
    for blob, name in ((encode(image), "x.png"), (native_dicom(image), "x.dcm")):
        full = decode_image(blob, name)
        reduced = decode_image(blob, name, reduce_to=112)
        assert reduced.shape == (128, 170) and reduced.dtype == np.uint8
        assert np.abs(reduced - block_mean(full, 6)).max() <= 1, name


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "I;16", "F"])
def test_reduce_to_is_a_block_mean_for_every_mode(mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        img = Image.fromarray(blocky_16bit(300, 250, 5))
    elif mode == "F":
        img = Image.fromarray(blocky_16bit(300, 250, 5).astype(np.float32), "F")
    else:
        img = Image.fromarray(rng.integers(0, 256, (300, 250, 3), dtype=np.uint8)).convert(mode)
    blob = encode(img, "TIFF" if mode == "F" else "PNG")
    full = decode_image(blob, "x")
    reduced = decode_image(blob, "x", reduce_to=50)  # k = 250 // 50 = 5
    assert reduced.shape[:2] == (60, 50) and reduced.ndim == full.ndim
    assert np.abs(reduced - block_mean(full, 5)).max() <= 1


def test_reduce_to_needs_both_sides_at_least_twice_the_target():
    image = blocky_16bit(768, 1024, 6)
    for blob in (encode(image), native_dicom(image)):
        full = decode_image(blob, "x.dcm" if blob[128:132] == b"DICM" else "x.png")
        for reduce_to in (385, 1000):  # 768 // 385 = 1: nothing to do
            np.testing.assert_array_equal(decode_image(blob, "x", reduce_to=reduce_to), full)
    with pytest.raises(ValueError, match="reduce_to"):
        decode_image(encode(image), reduce_to=0)


def test_reduce_to_takes_the_middle_frame_then_reduces():
    frames = np.stack([blocky_16bit(256, 256, 4, seed=s) for s in range(3)])
    reduced = decode_image(native_dicom(frames), "mf.dcm", reduce_to=64)
    middle = decode_image(native_dicom(frames[1]), "one.dcm")
    assert reduced.shape == (64, 64)
    assert np.abs(reduced - block_mean(middle, 4)).max() <= 1


def test_reduce_to_lowers_peak_memory_of_a_large_16bit_dicom():
    yy, xx = np.mgrid[0:2048, 0:2048]
    blob = native_dicom(((yy * 7 + xx * 13) % 4096).astype(np.uint16))  # 8 MiB of pixels
    full_peak, _, err = peak_memory(decode_image, blob, "big.dcm")
    assert err is None
    reduced_peak, _, err = peak_memory(decode_image, blob, "big.dcm", reduce_to=128)
    assert err is None
    assert reduced_peak < full_peak / 2, (reduced_peak, full_peak)  # no full-size float64


# --------------------------------------------------------------------------- property tests


def _only_decode_errors(blob: bytes, name: str) -> None:
    """read_header and decode_image either succeed or raise one of the project's errors."""
    try:
        read_header(blob, name)
    except ImageDecodeError:
        pass
    try:
        out = decode_image(blob, name, max_bytes=64 * MB)
    except ImageDecodeError:
        return
    assert out.dtype == np.uint8 and out.ndim in (2, 3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.sampled_from(["x.png", "x.dcm", "x"]))
def test_random_bytes_raise_only_decode_errors(blob, name):
    _only_decode_errors(blob, name)


_VALUES = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**31), 2**31),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: f"{f}"[:16]),
)
_FIELDS = st.sampled_from(
    [
        "Rows",
        "Columns",
        "NumberOfFrames",
        "SamplesPerPixel",
        "BitsAllocated",
        "WindowCenter",
        "WindowWidth",
        "RescaleSlope",
        "RescaleIntercept",
        "PhotometricInterpretation",
        "PixelRepresentation",
    ]
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_FIELDS, _VALUES, min_size=1, max_size=3))
def test_random_dicom_header_values_raise_only_decode_errors(fields):
    """Any header field replaced by any text or number (written as LO, so it survives)."""
    blob = dicom(**{k: ("LO", str(v)[:64]) for k, v in fields.items()})
    _only_decode_errors(blob, "scan.dcm")


_SMALL_JPEG = encode(np.tile(np.arange(0, 128, 16, dtype=np.uint8), (8, 1)), "JPEG")
_SMALL_J2K = encode(np.tile(np.arange(0, 128, 16, dtype=np.uint8), (8, 1)), "JPEG2000", no_jp2=True)
_FRAGMENTS = st.one_of(
    st.binary(min_size=1, max_size=80),
    st.binary(max_size=40).map(lambda b: b"\xff\xd8" + b),
    st.binary(max_size=60).map(lambda b: b"\xff\x4f\xff\x51" + b),
    st.binary(max_size=60).map(lambda b: struct.pack("<I", len(b) % 4) + bytes(60) + b),
    st.sampled_from([_SMALL_JPEG, _SMALL_J2K, with_jpeg_size(_SMALL_JPEG, 4000, 4000)]),
    st.integers(1, 60).map(lambda n: _SMALL_JPEG[:n]),
)
_TRANSFER_SYNTAXES = st.sampled_from(
    [
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.1",  # explicit VR little endian
        "1.2.840.10008.1.2.2",  # explicit VR big endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.70",  # JPEG lossless
        "1.2.840.10008.1.2.4.80",  # JPEG-LS (no decoder installed)
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.5",  # RLE
        "1.2.3.4.5",  # not a transfer syntax
    ]
)
_PIXEL_HEADER = st.fixed_dictionaries(
    {
        "rows": st.one_of(st.just(8), st.integers(1, 300)),  # the real fragments are 8x8
        "cols": st.one_of(st.just(8), st.integers(1, 300)),
        "bits": st.sampled_from([8, 8, 16, 16, 1, 32, 64, 12, 0]),
        "samples": st.sampled_from([1, 1, 1, 3, 4, 0]),
        "frames": st.sampled_from([1, 1, 2, 3, 0]),
    }
)


def _pixel_dataset(header: dict, transfer_syntax: str, pixel_data: bytes, encapsulated: bool):
    """File meta naming ``transfer_syntax``, then a data set however inconsistent with it.

    The data set is written as explicit VR little endian (implicit for the implicit syntax),
    and deflated for the deflated syntax, which pydicom's own writer would refuse to do.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = image_dataset(header["rows"], header["cols"], bits=max(header["bits"], 1))
    ds.BitsAllocated, ds.SamplesPerPixel = header["bits"], header["samples"]
    ds.NumberOfFrames = header["frames"]
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = encapsulated
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, transfer_syntax == "1.2.840.10008.1.2"
    write_dataset(body, ds)
    data = body.getvalue()
    if transfer_syntax == "1.2.840.10008.1.2.1.99":
        deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflate.compress(data) + deflate.flush()
    return file_meta(transfer_syntax) + data


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    _TRANSFER_SYNTAXES,
    _PIXEL_HEADER,
    st.lists(_FRAGMENTS, min_size=1, max_size=4),
    st.booleans(),
    st.booleans(),
)
def test_random_pixel_data_and_transfer_syntax_raise_only_decode_errors(
    transfer_syntax, header, fragments, has_bot, encapsulated
):
    """Any transfer syntax with native bytes or encapsulated fragments, any pixel header."""
    from pydicom.encaps import encapsulate

    if encapsulated:
        pixel_data = encapsulate(fragments, has_bot=has_bot)
    else:
        pixel_data = b"".join(fragments)
        pixel_data += b"\0" * (len(pixel_data) % 2)
    blob = _pixel_dataset(header, transfer_syntax, pixel_data, encapsulated)
    _only_decode_errors(blob, "scan.dcm")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.booleans())
def test_random_deflated_data_sets_raise_only_decode_errors(body, compress):
    """Random bytes, raw or deflated, after file meta that names the deflated syntax."""
    if compress:
        deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = deflate.compress(body) + deflate.flush()
    _only_decode_errors(file_meta("1.2.840.10008.1.2.1.99") + body, "x")

"""Hostile images: malformed DICOM headers, NaN pixels, EXIF orientation, random bytes.

Every failure is one of the project's decode errors (a 4xx on the endpoint), never anything
else; the property-based tests search for counterexamples instead of listing them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medcae.data import (
    ImageDecodeError,
    ImageTooLargeError,
    NonFinitePixelsError,
    NoPixelDataError,
    decode_image,
)
from medcae.service import Limits, RequestError, decode_request_image


def dicom(float_pixels: np.ndarray | None = None, **fields: tuple[str, object]) -> bytes:
    """An 8x8 12-bit MONOCHROME2 DICOM; ``fields`` add or override elements as (VR, value)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns = 8, 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if float_pixels is None:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (np.arange(64, dtype=np.uint16) * 50).tobytes()
        ds["PixelData"].VR = "OW"  # explicit: the writer then never reads BitsAllocated
    else:
        ds.BitsAllocated = 32
        ds.FloatPixelData = float_pixels.astype("<f4").tobytes()
    for keyword, (vr, value) in fields.items():
        ds.add_new(keyword, vr, value)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


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


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048), st.sampled_from(["x.png", "x.dcm", "x"]))
def test_random_bytes_raise_only_decode_errors(blob, name):
    try:
        out = decode_image(blob, name)
    except ImageDecodeError:
        return
    assert out.dtype == np.uint8 and out.ndim in (2, 3)


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
    try:
        out = decode_image(blob, "scan.dcm")
    except ImageDecodeError:
        return
    assert out.dtype == np.uint8 and out.ndim in (2, 3)

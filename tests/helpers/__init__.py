"""Helpers shared by test modules (not fixtures): the repository root, a free port, image,
DICOM and data-set builders, ``medcae`` in a subprocess, and ``medcae serve`` under the reaper.

``tests/conftest.py`` sits at the root of ``tests/``, so pytest puts that folder on
``sys.path`` and ``import helpers`` works from every test folder.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

MB = 1024**2
SC_UID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage

#: The running Serve app of the ``server`` fixture (tests/conftest.py): its limits, its key and
#: the one origin it allows.
LIMITS = {
    "max_image_bytes": 300_000,
    "max_pixels": 4_000_000,
    "max_decoded_bytes": 12_000_000,
    "max_request_decoded_bytes": 20_000_000,
    "max_batch_images": 4,
    "body_timeout_s": 2.0,
}
API_KEY = "test-key-0123"
ORIGIN = "https://viewer.example.org"


def free_port() -> int:
    """A loopback port that was free a moment ago (and is closed again now). Another process
    can take it before the server binds it: a caller that starts a server on it retries on a
    fresh port when the server could not bind (:func:`port_taken`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    """Something listens on (or is bound to) loopback ``port`` now. Connections of a server
    that just stopped (TIME_WAIT) do not count, as they do not stop a new server binding it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


#: Attempts at starting a server on a port picked free (see :func:`free_port`).
PORT_ATTEMPTS = 3


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port held bound but not listening while the block runs: a connection to it
    is refused, and no other process can start listening on it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# --------------------------------------------------------------------------- images


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    """One image (a PIL image or an array) encoded by Pillow."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    """``arr`` as a PNG file."""
    return encode(arr, "PNG")


def noise_png(seed: int, size: int = 16, mode: str = "L") -> bytes:
    shape = (size, size) if mode == "L" else (size, size, 3)
    return encode(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def bomb_png(side: int = 30_000) -> bytes:
    """A few-hundred-byte PNG that declares side x side pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A baseline JPEG whose SOF0 header declares another size (its scan data is unchanged)."""
    sof = jpeg.index(b"\xff\xc0")
    return jpeg[: sof + 5] + struct.pack(">HH", height, width) + jpeg[sof + 9 :]


# --------------------------------------------------------------------------- DICOM


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    slope: float = 2,
    intercept: float = -100,
    with_pixels: bool = True,
) -> bytes:
    """A small 16-bit Explicit VR Little Endian DICOM file (multi-frame if pixels is 3-D)."""
    from pydicom.dataset import Dataset as DicomDataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "CT", pixels.shape[-2], pixels.shape[-1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


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


def image_dataset(rows: int, cols: int, *, bits: int = 16, samples: int = 1, frames: int = 1):
    """A pydicom Dataset with the image pixel module filled in (no pixel data yet)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def save_dicom(ds, transfer_syntax: str) -> bytes:
    """``ds`` as a DICOM file whose file meta names ``transfer_syntax``."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC_UID
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def native_dicom(
    pixels: np.ndarray,
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    pixel_data: bytes | None = None,
) -> bytes:
    """uint8/uint16 ``(rows, cols)`` or ``(frames, rows, cols)`` as native (uncompressed) DICOM.

    ``pixel_data`` replaces the pixel bytes (to make them disagree with the header).
    """
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    ds = image_dataset(*pixels.shape[-2:], bits=pixels.dtype.itemsize * 8, frames=frames)
    ds.PixelData = pixels.tobytes() if pixel_data is None else pixel_data
    ds["PixelData"].VR = "OW" if pixels.dtype.itemsize == 2 else "OB"
    return save_dicom(ds, transfer_syntax)


def encapsulated_dicom(
    frames: list[bytes],
    rows: int,
    cols: int,
    transfer_syntax: str,
    *,
    samples: int = 1,
    bits: int = 8,
    has_bot: bool = True,
    number_of_frames: int | None = None,
) -> bytes:
    """Encoded frames (JPEG, JPEG 2000, RLE, ...) encapsulated in a DICOM file."""
    from pydicom.encaps import encapsulate

    n = len(frames) if number_of_frames is None else number_of_frames
    ds = image_dataset(rows, cols, bits=bits, samples=samples, frames=n)
    ds.PixelData = encapsulate(frames, has_bot=has_bot)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return save_dicom(ds, transfer_syntax)


def file_meta(transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the file meta group naming ``transfer_syntax``."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC_UID
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, meta)
    return fp.getvalue()


def deflated_bomb(
    rows: int, cols: int, frames: int = 1, declare: tuple[int, int] | None = None
) -> bytes:
    """A deflated DICOM whose zero pixel data inflates to ``rows * cols * frames * 2`` bytes;
    ``declare`` puts another (rows, cols) in its header (a header that lies)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, image_dataset(*(declare or (rows, cols)), frames=frames))
    size = rows * cols * frames * 2
    pixel_element = b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<I", size)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflate.compress(body.getvalue() + pixel_element)]
    zeros = bytes(4 * MB)
    for _ in range(size // len(zeros)):
        parts.append(deflate.compress(zeros))
    parts += [deflate.compress(bytes(size % len(zeros))), deflate.flush()]
    return file_meta(DeflatedExplicitVRLittleEndian) + b"".join(parts)


# --------------------------------------------------------------------------- data sets on disk


def write_npz(path: Path, sizes=(12, 4, 6), shape=(8, 8), classes: int = 2, **extra) -> Path:
    from medcae import data

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(data.SPLITS, sizes):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % classes).astype(np.uint8)[:, None]
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def write_class_folder(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{i}.png").write_bytes(noise_png(len(cls) * 100 + i))
    return root


def write_parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def write_maps_parquet(folder: Path, maps: np.ndarray, files: int = 3) -> list[Path]:
    """``maps`` ``(N, C, h, w)`` as Parquet files shaped like the feature store's: a
    list-of-float column carrying Ray's tensor extension name and the map shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    field = pa.field(
        "maps",
        pa.large_list(pa.float32()),
        metadata={
            b"ARROW:extension:name": b"ray.data.arrow_tensor_v2",
            b"ARROW:extension:metadata": json.dumps(list(maps.shape[1:])).encode(),
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, part in enumerate(np.array_split(maps, files)):
        col = pa.array([row.ravel() for row in part], pa.large_list(pa.float32()))
        path = folder / f"{i}.parquet"
        pq.write_table(pa.Table.from_arrays([col], schema=pa.schema([field])), path)
        out.append(path)
    return out


# --------------------------------------------------------------------------- subprocesses


def medcae_subprocess(
    *args: str, timeout: float = 120, ray_imported_ok: bool = False
) -> subprocess.CompletedProcess:
    """``medcae`` in a fresh interpreter that fails the command if Ray started.

    By default it asserts, when the command failed, that Ray was never even imported. With
    ``ray_imported_ok`` (a job whose module imports Ray before it checks its input), Ray is
    imported first and ``ray.init`` made to raise, so any start of Ray fails the command.
    """
    if ray_imported_ok:
        code = (
            "import sys, ray, ray._private.worker as w\n"
            "def _no(*a, **k):\n    raise AssertionError('ray.init was called')\n"
            "ray.init = w.init = _no\n"
            "from medcae.cli.main import main; sys.exit(main(sys.argv[1:]))"
        )
    else:
        code = (
            "import sys; from medcae.cli.main import main; rc = main(sys.argv[1:]); "
            "assert rc == 0 or 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)"
        )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def serve_reaped(cmd, tmp_path, cwd, env, during, stop="SIGINT", timeout=400):
    """``medcae serve`` as a user starts it, with its own local Ray, under the reaper: once
    ``/healthz`` answered 200, ``during(base_url)`` runs against it, then ``stop`` ends it;
    nothing it started may outlive it. Returns what ``during`` returned."""
    import shutil
    import tempfile

    from helpers.reaper import run_reaped

    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        ray_tmp = tempfile.mkdtemp(prefix="mcs", dir="/tmp")  # short: Ray's socket paths
        try:
            run, report = run_reaped(
                [*cmd, "--port", str(port)],
                tmp_path / f"reaper{attempt}.json",
                health_url=f"{base}/healthz",
                stop_signal=stop,
                during=lambda base=base: during(base),
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=cwd,
                env={**env, "RAY_TMPDIR": ray_tmp},  # its own Ray, not the session's
            )
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        if report["served"] or not port_taken(port):
            break  # served, or failed for another reason than its port
    assert report["served"] is True, run.stdout[-2000:] + run.stderr[-3000:]
    assert report["left"] == [], report  # nothing it started outlives it
    assert report["rc"] == 0, run.stderr[-3000:]
    return report["during"]


def chromium():
    """Headless Chromium driven through chromedriver (Debian's chromium, chromium-driver)."""
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip(
            "needs Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; .ci/run installs them)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _proxy_up(port: int) -> bool:
    """Serve's proxy answers its health check on ``port``."""
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _serve_answers(port: int, timeout: float = 60.0) -> bool:
    """Serve's proxy, not some other server, answers on ``port`` with the medcae route."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            routes = httpx.get(f"http://127.0.0.1:{port}/-/routes", timeout=5).json()
            if routes.get("/") == "medcae":
                return True
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        time.sleep(0.5)
    return False


def start_serve(app) -> int:
    """``app`` as the Serve application ``medcae`` at ``/`` on a free loopback port of the
    session's Ray; returns the port. The caller ends it with ``serve.shutdown()``."""
    from ray import serve

    for _ in range(PORT_ATTEMPTS):  # the port can be taken between picking and binding
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(app, name="medcae", route_prefix="/")
            if _serve_answers(port):
                return port
        except Exception:  # noqa: BLE001 - retried only when the proxy could not bind
            if not port_taken(port) or _proxy_up(port):
                raise  # the port was free, or Serve's own proxy holds it: the app failed
        serve.shutdown()
    raise RuntimeError(f"Serve did not start on a free port in {PORT_ATTEMPTS} attempts")

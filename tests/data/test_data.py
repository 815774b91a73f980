"""Tests for medcae.data: decoding, sources, splits, download and the demo data set."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    dicom_bytes,
    encode,
    noise_png,
    write_class_folder,
    write_npz,
    write_parquet,
)
from PIL import Image

from medcae import data
from medcae.data import DataError, ImageDecodeError, decode, medmnist
from medcae.data.splits import _split_counts, _stratified_split

# --------------------------------------------------------------------------- helpers


def png_header_only(width: int, height: int) -> bytes:
    """A tiny 1-bit PNG that declares a huge size (its pixel data is never read)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- .npz and names


def test_npz_round_trip(tmp_path):
    path = write_npz(tmp_path / "tiny.npz")
    ds = data.load_dataset(str(path))
    raw = np.load(path)
    assert ds.name == "tiny" and ds.label_names == ["0", "1"] and ds.num_classes == 2
    for split in data.SPLITS:
        part = ds.splits[split]
        assert part.labels.shape == (len(part),) and part.labels.dtype == np.int64
        np.testing.assert_array_equal(part.images, raw[f"{split}_images"])
        np.testing.assert_array_equal(part.labels, raw[f"{split}_labels"][:, 0])


def test_npz_label_names_and_resize(tmp_path):
    path = write_npz(tmp_path / "x.npz", label_names=np.array(["cat", "dog"]))
    ds = data.load_dataset(path, image_size=5)
    assert ds.label_names == ["cat", "dog"]
    assert ds.splits["val"].images.shape == (4, 5, 5)


def test_npz_missing_keys_lists_found_keys(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros(2))
    with pytest.raises(DataError, match="partial.npz") as info:
        data.load_dataset(path)
    message = str(info.value)
    assert "'train_images'" in message and "'val_images'" in message and "found keys" in message


@pytest.mark.parametrize(
    "source, expected",
    [
        ("nosuchdataset", "pneumoniamnist"),  # unknown name: lists known names
        ("nosuchdataset", "expected a path"),
        ("/definitely/not/here.npz", "no such file or folder: /definitely/not/here.npz"),
        ("some/folder", "no such file or folder"),
    ],
)
def test_unknown_name_and_missing_path(source, expected):
    with pytest.raises(DataError, match="(?i)" + expected.replace(".", r"\.")):
        data.load_dataset(source)


@pytest.mark.parametrize("how", ["argument", "env"])
def test_name_lookup_in_data_dir(tmp_path, monkeypatch, how):
    write_npz(tmp_path / "pneumoniamnist.npz")
    monkeypatch.setenv("MEDCAE_DATA_DIR", str(tmp_path) if how == "env" else "/nonexistent")
    ds = data.load_dataset(
        "pneumoniamnist", str(tmp_path) if how == "argument" else None, download=False
    )
    assert ds.name == "pneumoniamnist" and ds.label_names == ["normal", "pneumonia"]


# --------------------------------------------------------------------------- download


@pytest.mark.parametrize("good_md5", [True, False])
def test_download_file_md5(tmp_path, good_md5):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello medcae" * 1000)
    md5 = hashlib.md5(src.read_bytes()).hexdigest() if good_md5 else "0" * 32
    dest = tmp_path / "out" / "dest.bin"
    if good_md5:
        assert data.download_file(src.as_uri(), dest, md5=md5) == dest
        assert dest.read_bytes() == src.read_bytes()
    else:
        with pytest.raises(DataError, match="expected 0{32}, got [0-9a-f]{32}"):
            data.download_file(src.as_uri(), dest, md5=md5)
        assert not dest.exists() and not Path(str(dest) + ".part").exists()


def test_load_by_name_downloads_when_missing(tmp_path, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    write_npz(server / "breastmnist.npz")
    monkeypatch.setattr(medmnist, "MEDMNIST_URL", server.as_uri() + "/{name}.npz")
    cache = tmp_path / "cache"
    ds = data.load_dataset("breastmnist", str(cache))
    assert (cache / "breastmnist.npz").exists()
    assert ds.label_names == ["malignant", "normal, benign"] and len(ds.splits["train"]) == 12


def test_failed_download_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(medmnist, "MEDMNIST_URL", (tmp_path / "gone").as_uri() + "/{name}.npz")
    with pytest.raises(DataError, match="not found at .*download from .* failed") as info:
        data.load_dataset("dermamnist", str(tmp_path / "cache"))
    assert "pass a path" in str(info.value)


# --------------------------------------------------------------------------- folders


def test_class_folder_skips_corrupt_files(tmp_path):
    root = write_class_folder(tmp_path / "xray", {"normal": 4, "pneumonia": 4})
    corrupt, truncated = root / "pneumonia" / "corrupt.png", root / "normal" / "truncated.png"
    corrupt.write_bytes(os.urandom(300))
    truncated.write_bytes(noise_png(7, size=64)[:600])
    (root / "normal" / "notes.txt").write_text("not an image")
    (root / "pneumonia" / "IM0001").write_bytes(dicom_bytes(np.arange(4).reshape(2, 2)))
    ds = data.load_dataset(root, image_size=16)
    assert sorted(p for p, _ in ds.skipped) == sorted([str(corrupt), str(truncated)])
    assert ds.label_names == ["normal", "pneumonia"] and ds.name == "xray"
    labels = np.concatenate([ds.splits[s].labels for s in data.SPLITS])
    assert np.bincount(labels).tolist() == [4, 5]
    rows = data.list_rows(root)  # one split answer: assigned before undecodable files drop
    listed = dict(zip(rows.table.column("id").to_pylist(), rows.table.column("split").to_pylist()))
    for split in data.SPLITS:
        assert set(ds.splits[split].labels) <= {0, 1}
        assert ds.splits[split].images.shape[1:] == (16, 16)
        assert len(ds.splits[split]) == sum(
            1 for p, s in listed.items() if s == split and p not in (str(corrupt), str(truncated))
        )


def test_split_folder_layout(tmp_path):
    counts = {"train": 3, "val": 1, "test": 2}
    for split, n in counts.items():
        write_class_folder(tmp_path / "ds" / split, {"b": n, "a": n})
    ds = data.load_dataset(tmp_path / "ds")
    assert ds.label_names == ["a", "b"]
    for split, n in counts.items():
        assert len(ds.splits[split]) == 2 * n
        assert np.bincount(ds.splits[split].labels).tolist() == [n, n]


def test_split_folder_layout_missing_split(tmp_path):
    write_class_folder(tmp_path / "ds" / "train", {"a": 2})
    write_class_folder(tmp_path / "ds" / "test", {"a": 2})
    with pytest.raises(DataError, match=r"not \['val'\]"):
        data.load_dataset(tmp_path / "ds")


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(noise_png(i))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="one sub-folder per class"):
        data.load_dataset(tmp_path)
    images, skipped = data.load_unlabeled(tmp_path)
    assert images.labels is None and images.images.shape == (3, 16, 16)
    assert [p for p, _ in skipped] == [str(tmp_path / "bad.jpg")]


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, (1, 0, 0)),
        (2, (1, 0, 1)),
        (3, (1, 1, 1)),
        (20, (14, 3, 3)),
        (100, (70, 15, 15)),
    ],
)
def test_split_counts(n, expected):
    assert _split_counts(n) == expected


def test_stratified_split_is_seeded_and_covers_classes():
    labels = np.repeat(np.arange(3), 10)
    first = _stratified_split(labels, seed=1)
    np.testing.assert_array_equal(first, _stratified_split(labels, seed=1))
    assert not np.array_equal(first, _stratified_split(labels, seed=2))
    for split in range(3):
        assert set(labels[first == split]) == {0, 1, 2}


# --------------------------------------------------------------------------- decoding


def _mode_image(mode: str, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(3)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8), "RGBA").convert(
        mode
    )


@pytest.mark.parametrize(
    "mode, ndim",
    [
        ("L", 2),
        ("1", 2),
        ("LA", 2),
        ("RGB", 3),
        ("RGBA", 3),
        ("P", 3),
        ("CMYK", 3),
        ("I;16", 2),
    ],
)
def test_decode_modes(mode, ndim):
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    out = data.decode_image(encode(_mode_image(mode, (9, 7)), fmt))
    assert out.dtype == np.uint8 and out.ndim == ndim and out.shape[:2] == (7, 9)
    if mode == "I;16":
        assert out.min() == 0 and out.max() == 255


def test_decode_gray_palette_gif_stays_gray():
    gif = encode(np.tile(np.arange(0, 250, 50, dtype=np.uint8), (3, 1)), "GIF")
    np.testing.assert_array_equal(data.decode_image(gif), np.tile([0, 50, 100, 150, 200], (3, 1)))


def test_decode_jpeg_and_16bit_tiff_scaling():
    assert data.decode_image(noise_png(1, mode="RGB")).shape == (16, 16, 3)
    jpeg = encode(np.full((8, 8, 3), 200, np.uint8), "JPEG")
    assert abs(int(data.decode_image(jpeg).mean()) - 200) <= 2
    grad = Image.fromarray(np.linspace(1000, 3000, 16, dtype=np.float32).reshape(4, 4), "F")
    out = data.decode_image(encode(grad, "TIFF"))
    assert out[0, 0] == 0 and out[-1, -1] == 255 and np.all(np.diff(out.ravel()) >= 0)


def test_to_uniform_mixed_sizes_and_modes():
    shapes = {"L": (20, 20), "RGB": (30, 20), "RGBA": (16, 16), "P": (20, 20), "I;16": (24, 24)}
    decoded = [data.decode_image(encode(_mode_image(m, s))) for m, s in shapes.items()]
    out = data.to_uniform(decoded)
    assert out.shape == (5, data.DEFAULT_SIZE, data.DEFAULT_SIZE, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, ..., 0], out[0, ..., 2])  # gray repeated
    assert data.to_uniform(decoded, size=12).shape == (5, 12, 12, 3)
    gray = [np.zeros((6, 5), np.uint8), np.ones((6, 5), np.uint8)]
    assert data.to_uniform(gray).shape == (2, 6, 5)


STORED = np.array([[0, 150], [200, 300]])  # modality LUT (x2 - 100): [[-100, 200], [300, 500]]


@pytest.mark.parametrize(
    "photometric, window, expected",
    [
        ("MONOCHROME2", None, [[0, 128], [170, 255]]),  # min-max over -100..500
        ("MONOCHROME2", (200, 200), [[0, 128], [255, 255]]),  # window 100..300 after rescale
        ("MONOCHROME1", None, [[255, 127], [85, 0]]),  # inverted
        ("MONOCHROME1", (200, 200), [[255, 127], [0, 0]]),
    ],
)
def test_dicom_rescale_window_and_inversion(photometric, window, expected):
    out = data.decode_image(dicom_bytes(STORED, photometric, window), "x")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_dicom_multiframe_takes_middle_frame():
    frames = np.zeros((3, 2, 2), np.uint16)
    for k in range(3):
        frames[k].flat[k] = 1000
    out = data.decode_image(dicom_bytes(frames, slope=1, intercept=0))
    np.testing.assert_array_equal(out, [[0, 255], [0, 0]])


def test_dicom_without_pixel_data():
    with pytest.raises(ImageDecodeError, match="no pixel data"):
        data.decode_image(dicom_bytes(STORED, with_pixels=False), "scan.dcm")


@pytest.mark.parametrize(
    "payload",
    [
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n",
        os.urandom(512),
        b"",
        noise_png(5, size=64)[:300],
    ],
)
def test_undecodable_bytes(payload):
    with pytest.raises(ImageDecodeError, match="thing.png"):
        data.decode_image(payload, "thing.png")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width, height", [(20000, 20000), (11000, 10000), (9600, 9600)])
def test_decompression_bomb_header(width, height):
    with pytest.raises(ImageDecodeError, match="(?i)bomb|refusing"):
        data.decode_image(png_header_only(width, height), "bomb.png")


def test_max_pixels_guard(monkeypatch):
    monkeypatch.setattr(decode, "MAX_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="MAX_PIXELS=100"):
        data.decode_image(noise_png(1))
    with pytest.raises(ImageDecodeError, match="MAX_PIXELS=100"):
        data.decode_image(dicom_bytes(np.zeros((11, 11), np.uint16)))


# --------------------------------------------------------------------------- parquet


def test_parquet_string_labels_and_split_column(tmp_path):
    labels = ["pneumonia", "normal"] * 4
    splits = ["train"] * 4 + ["val", "val", "test", "test"]
    path = write_parquet(
        tmp_path / "x.parquet",
        {"image": [noise_png(i) for i in range(8)], "label": labels, "split": splits},
    )
    ds = data.load_dataset(path)
    assert ds.label_names == ["normal", "pneumonia"] and ds.name == "x"
    assert [len(ds.splits[s]) for s in data.SPLITS] == [4, 2, 2]
    assert ds.splits["train"].labels.tolist() == [1, 0, 1, 0]


def test_parquet_bad_row_is_skipped(tmp_path):
    images = [noise_png(i) for i in range(9)]
    images[2] = b"garbage"
    path = write_parquet(tmp_path / "y.parquet", {"image": images, "label": [0, 1, 2] * 3})
    ds = data.load_dataset(path, seed=3)
    assert [p for p, _ in ds.skipped] == [f"{path}#row=2"]
    assert sum(len(part) for part in ds.splits.values()) == 8 and ds.num_classes == 3


def test_parquet_without_image_column(tmp_path):
    path = write_parquet(tmp_path / "z.parquet", {"pixels": [b"x"], "label": [0]})
    with pytest.raises(DataError, match=r"found columns \['pixels', 'label'\]"):
        data.load_dataset(path)


# --------------------------------------------------------------------------- unlabeled


@pytest.mark.parametrize("kind, count", [("npz", 22), ("parquet", 3), ("classes", 4)])
def test_load_unlabeled_sources(tmp_path, kind, count):
    if kind == "npz":
        source = write_npz(tmp_path / "u.npz")
    elif kind == "parquet":
        source = write_parquet(
            tmp_path / "u.parquet", {"image": [noise_png(i) for i in range(count)]}
        )
    else:
        source = write_class_folder(tmp_path / "u", {"a": 1, "b": 3})
    images, skipped = data.load_unlabeled(str(source), image_size=6)
    assert images.labels is None and skipped == []
    assert images.images.shape == (count, 6, 6) and len(images) == count


# --------------------------------------------------------------------------- demo, fingerprint


def test_demo_dataset_deterministic_and_balanced(tmp_path):
    kwargs = dict(n_train=30, n_val=6, n_test=9, size=32)
    a = data.load_dataset(data.make_demo_dataset(tmp_path / "a.npz", seed=1, **kwargs))
    b = data.load_dataset(data.make_demo_dataset(tmp_path / "b.npz", seed=1, **kwargs))
    c = data.load_dataset(data.make_demo_dataset(tmp_path / "c.npz", seed=2, **kwargs))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.label_names == ["normal", "nodule", "ring"] and a.num_classes == 3
    assert a.splits["train"].images.shape == (30, 32, 32)
    assert np.bincount(a.splits["train"].labels).tolist() == [10, 10, 10]
    assert np.bincount(a.splits["test"].labels).tolist() == [3, 3, 3]
    assert not list(tmp_path.glob("*.tmp"))


def test_load_demo_by_name_generates_once(tmp_path):
    ds = data.load_dataset(data.DEMO_NAME, str(tmp_path))
    path = tmp_path / "medcae-demo.npz"
    assert path.exists() and ds.name == "synthetic-lesions"
    assert [len(ds.splits[s]) for s in data.SPLITS] == [600, 150, 300]
    assert ds.splits["train"].images.shape[1:] == (64, 64)
    mtime = path.stat().st_mtime_ns
    assert data.load_dataset("demo", str(tmp_path)).fingerprint() == ds.fingerprint()
    assert path.stat().st_mtime_ns == mtime


def test_fingerprint_changes_with_one_pixel(tmp_path):
    ds = data.load_dataset(write_npz(tmp_path / "f.npz"))
    before = ds.fingerprint()
    assert data.load_dataset(tmp_path / "f.npz").fingerprint() == before
    ds.splits["test"].images[0, 0, 0] ^= 1
    assert ds.fingerprint() != before

"""Tests for the CSV and glob sources and the listing API (medcae.data.rows)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from helpers import noise_png, write_class_folder, write_npz, write_parquet

from medcae import data
from medcae.data import DataError, decode_image, list_rows, list_unlabeled_rows


def write_pngs(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    """Small random grayscale PNGs ``folder/name`` (folders created)."""
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(noise_png(seed + i, size=8))
        paths.append(path)
    return paths


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def decoded(rows: data.Rows, split: str) -> list[np.ndarray]:
    """Decode the images of one split of ``rows`` (path or data column)."""
    part = rows.table.filter(rows.table.column("split").to_numpy(zero_copy_only=False) == split)
    if "data" in part.column_names:
        return [decode_image(b) for b in part.column("data").to_pylist()]
    return [decode_image(Path(p).read_bytes(), p) for p in part.column("path").to_pylist()]


# --------------------------------------------------------------------------- CSV


@pytest.mark.parametrize(
    "absolute, labels, expected_names",
    [
        (False, ["cat", "dog"], ["cat", "dog"]),
        (True, ["dog", "cat"], ["cat", "dog"]),
        (False, ["1", "0"], ["0", "1"]),
        (True, ["0", "2"], ["0", "1", "2"]),
    ],
)
def test_csv_paths_and_labels_without_split(tmp_path, absolute, labels, expected_names):
    files = write_pngs(tmp_path / "imgs", [f"sub/{i}.png" for i in range(20)])
    names = [str(f) if absolute else f"imgs/sub/{f.name}" for f in files]
    csv = write_csv(
        tmp_path / "labels.csv", "path,label", [f"{n},{labels[i % 2]}" for i, n in enumerate(names)]
    )
    ds = data.load_dataset(str(csv), seed=4)
    assert ds.name == "labels" and ds.label_names == expected_names and ds.skipped == []
    assert [len(ds.splits[s]) for s in data.SPLITS] == [12, 4, 4]  # 10 per class
    assert ds.splits["train"].images.shape == (12, 8, 8)
    for split in data.SPLITS:
        assert len(set(ds.splits[split].labels)) == 2


def test_csv_split_column_aliases_and_row_order(tmp_path):
    files = write_pngs(tmp_path, [f"{i}.png" for i in range(6)])
    splits = ["training", "Train", "valid", "validation", "testing", " test "]
    csv = write_csv(
        tmp_path / "x.csv",
        "Path, Label ,Split",
        [f"{f.name},{'ab'[i % 2]},{s}" for i, (f, s) in enumerate(zip(files, splits))],
    )
    ds = data.load_dataset(csv)
    assert [len(ds.splits[s]) for s in data.SPLITS] == [2, 2, 2]
    assert ds.label_names == ["a", "b"] and ds.splits["val"].labels.tolist() == [0, 1]
    np.testing.assert_array_equal(ds.splits["test"].images[1], decode_image(files[5].read_bytes()))


def test_csv_missing_and_corrupt_files_are_skipped(tmp_path):
    files = write_pngs(tmp_path, [f"{i}.png" for i in range(6)])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [f"{f.name},{i % 2}" for i, f in enumerate(files)]
    rows[2] = "gone.png,0"
    rows.append("bad.png,1")
    rows.append(f"{files[0].name},")
    csv = write_csv(tmp_path / "y.csv", "path,label", rows)
    ds = data.load_dataset(csv)
    where = [w for w, _ in ds.skipped]
    assert where == [f"{csv}#row=2", f"{csv}#row=7", f"{csv}#row=6"]
    assert str(tmp_path / "gone.png") in ds.skipped[0][1] and "no such file" in ds.skipped[0][1]
    assert "label" in ds.skipped[1][1] and "bad.png" in ds.skipped[2][1]
    assert sum(len(part) for part in ds.splits.values()) == 5


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "file,label\na.png,0\n",
            r"missing column\(s\) \['path'\]; found columns \['file', 'label'\]",
        ),
        ("path\na.png\n", r"missing column\(s\) \['label'\]; found columns \['path'\]"),
        ("a.png,0\nb.png,1\n", r"found columns \['a.png', '0'\]"),
        ("", r"empty file .*found columns \[\]"),
        ("\n\n", r"empty file"),
        ("path,label\n", r"no data rows; found columns \['path', 'label'\]"),
    ],
)
def test_csv_bad_header_names_file_and_columns(tmp_path, text, expected):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(DataError, match=expected) as info:
        data.load_dataset(csv)
    assert str(csv) in str(info.value) and "'path'" in str(info.value)
    with pytest.raises(DataError, match=expected):
        list_rows(csv)


def test_csv_bad_split_value(tmp_path):
    (f,) = write_pngs(tmp_path, ["a.png"])
    csv = write_csv(tmp_path / "s.csv", "path,label,split", [f"{f.name},0,holdout"])
    with pytest.raises(DataError, match=r"'split' has values \['holdout'\]"):
        data.load_dataset(csv)


def test_csv_as_unlabeled_source(tmp_path):
    files = write_pngs(tmp_path, [f"{i}.png" for i in range(3)])
    files = [files[2], files[0], files[1]]  # the CSV's own order, not sorted
    csv = write_csv(tmp_path / "u.csv", "path", [f.name for f in files] + ["missing.png"])
    images, skipped = data.load_unlabeled(csv)
    assert images.images.shape == (3, 8, 8) and images.labels is None
    assert [w for w, _ in skipped] == [f"{csv}#row=3"]
    rows = list_unlabeled_rows(csv)
    assert rows.table.column("path").to_pylist() == [str(f) for f in files]  # kept as written
    assert rows.label_names == [] and set(rows.table.column("label").to_pylist()) == {-1}


# --------------------------------------------------------------------------- globs


@pytest.mark.parametrize("absolute", [False, True])
def test_unlabeled_glob_recursive(tmp_path, monkeypatch, absolute):
    write_pngs(tmp_path / "scans", ["a.png", "p1/b.png", "p1/deep/c.png", "p2/d.jpg"])
    (tmp_path / "scans" / "p1" / "notes.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    pattern = str(tmp_path / "scans/**/*.png") if absolute else "scans/**/*.png"
    images, skipped = data.load_unlabeled(pattern)
    assert images.images.shape == (3, 8, 8) and skipped == []
    rows = list_unlabeled_rows(pattern)
    expected = [tmp_path / "scans" / p for p in ("a.png", "p1/b.png", "p1/deep/c.png")]
    assert rows.table.column("path").to_pylist() == [str(p) for p in expected]
    assert rows.name == "scans" and rows.table.column("split").unique().to_pylist() == ["unlabeled"]


def test_glob_matching_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for load in (data.load_unlabeled, list_unlabeled_rows):
        with pytest.raises(DataError, match=r"no files match the pattern 'none/\*\*/\*\.dcm'"):
            load("none/**/*.dcm")


# --------------------------------------------------------------------------- list_rows


def test_list_rows_npz_round_trips_exact_pixels(tmp_path):
    path = write_npz(tmp_path / "tiny.npz", sizes=(5, 2, 3), classes=3)
    rgb = write_npz(tmp_path / "rgb.npz", sizes=(2, 1, 1), shape=(6, 5, 3))
    for source in (path, rgb):
        rows = list_rows(source)
        ds = data.load_dataset(source)
        assert rows.name == source.stem and rows.label_names == ds.label_names
        assert rows.table.column_names == ["id", "split", "label", "data"]
        assert rows.table.column("id").to_pylist()[:2] == [
            f"{source.stem}:train/000000000",
            f"{source.stem}:train/000000001",
        ]
        for split in data.SPLITS:
            np.testing.assert_array_equal(np.stack(decoded(rows, split)), ds.splits[split].images)
    labels = rows.table.column("label")
    assert str(labels.type) == "int64"


def test_list_rows_class_folder_decodes_nothing(tmp_path):
    root = write_class_folder(tmp_path / "xray", {"normal": 6, "pneumonia": 6})
    corrupt = root / "pneumonia" / "corrupt.png"
    corrupt.write_bytes(b"\x00" * 40)
    (root / "normal" / ".hidden.png").write_bytes(b"x")
    rows = list_rows(root)
    paths = rows.table.column("path").to_pylist()
    assert str(corrupt) in paths and len(paths) == 13 and rows.skipped == []
    assert rows.table.column("id").to_pylist() == paths and all(
        Path(p).is_absolute() for p in paths
    )
    assert rows.name == "xray" and rows.label_names == ["normal", "pneumonia"]
    assert rows.table.column("label").to_pylist() == [0] * 6 + [1] * 7


def test_list_rows_split_equals_load_dataset_split(tmp_path):
    root = write_class_folder(tmp_path / "ds", {"a": 7, "b": 9, "c": 4})
    ds = data.load_dataset(root, seed=5)
    rows = list_rows(root, seed=5)
    for split in data.SPLITS:
        np.testing.assert_array_equal(np.stack(decoded(rows, split)), ds.splits[split].images)


def test_list_rows_splits_are_seeded(tmp_path):
    root = write_class_folder(tmp_path / "ds", {"a": 10, "b": 10})
    split = lambda seed: list_rows(root, seed=seed).table.column("split").to_pylist()  # noqa: E731
    assert split(1) == split(1) != split(2)
    assert split(1).count("train") == 12 and split(1).count("val") == 4


def test_list_rows_split_folders(tmp_path):
    for split, n in {"train": 3, "val": 1, "test": 2}.items():
        write_class_folder(tmp_path / "ds" / split, {"b": n, "a": n})
    rows = list_rows(tmp_path / "ds")
    assert rows.label_names == ["a", "b"]
    assert rows.table.column("split").to_pylist() == ["train"] * 6 + ["val"] * 2 + ["test"] * 4


def test_list_rows_csv_and_parquet(tmp_path):
    files = write_pngs(tmp_path, [f"{i}.png" for i in range(8)])
    labels = ["pneumonia", "normal"] * 4
    splits = ["train"] * 4 + ["val", "val", "test", "test"]
    csv = write_csv(
        tmp_path / "c.csv",
        "path,label,split",
        [f"{f.name},{lab},{s}" for f, lab, s in zip(files, labels, splits)]
        + ["gone.png,normal,train"],
    )
    images = [f.read_bytes() for f in files]
    images[3] = None
    pq = write_parquet(tmp_path / "p.parquet", {"image": images, "label": labels, "split": splits})
    for source, column, skipped in ((csv, "path", 8), (pq, "data", 3)):
        rows = list_rows(source)
        assert rows.label_names == ["normal", "pneumonia"] and column in rows.table.column_names
        assert [w for w, _ in rows.skipped] == [f"{source}#row={skipped}"]
        assert rows.table.column("split").to_pylist()[-4:] == splits[-4:]
        assert rows.table.column("label").to_pylist()[:3] == [1, 0, 1]
    assert rows.table.column("id").to_pylist()[:4] == [
        "p:train/000000000",
        "p:train/000000001",
        "p:train/000000002",
        "p:val/000000000",
    ]


def test_list_rows_demo_and_unknown_name(tmp_path):
    rows = list_rows("demo", str(tmp_path))
    assert rows.name == "synthetic-lesions" and len(rows) == 1050
    with pytest.raises(DataError, match="not a known data set name"):
        list_rows("nosuchdataset")


@pytest.mark.parametrize("kind, column", [("folder", "path"), ("npz", "data"), ("parquet", "data")])
def test_list_unlabeled_rows_decode_like_load_unlabeled(tmp_path, kind, column):
    if kind == "folder":
        source = write_class_folder(tmp_path / "u", {"a": 1, "b": 3})
    elif kind == "npz":
        source = write_npz(tmp_path / "u.npz", sizes=(2, 1, 1))
    else:
        source = write_parquet(tmp_path / "u.parquet", {"image": [noise_png(i) for i in range(4)]})
    rows = list_unlabeled_rows(source)
    assert len(rows) == 4 and column in rows.table.column_names and rows.label_names == []
    assert rows.table.column("label").to_pylist() == [-1] * 4
    images, _ = data.load_unlabeled(source)
    np.testing.assert_array_equal(np.stack(decoded(rows, "unlabeled")), images.images)


def test_listing_many_files_reads_no_pixels(tmp_path):
    """3,000 empty files: all listed, so none was decoded (an empty file is no image). The time
    is printed, not asserted (10,000 took ~0.3 s here)."""
    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
        for i in range(1000):
            (tmp_path / cls / f"{i:04d}.png").touch()
    start = time.perf_counter()
    rows = list_rows(tmp_path, seed=0)
    elapsed = time.perf_counter() - start
    assert len(rows) == 3000
    print(f"\nlisted 3,000 files in {elapsed:.2f}s")

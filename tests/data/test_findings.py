"""Multi-label sources: ``labels`` cells with ``|``, 0/1 finding columns, ``(N, F)`` arrays,
iterative stratification, and the errors that name the problem."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from helpers import png_bytes

from medcae.data import DataError, list_rows, load_dataset
from medcae.data.findings import (
    check_splits,
    decode,
    encode,
    iterative_split,
    parse_columns,
    parse_findings,
)


def _csv(tmp_path, header, rows, n_images=None):
    """A CSV beside real PNG files ``img{i}.png`` (one per row)."""
    rng = np.random.default_rng(0)
    for i in range(n_images or len(rows)):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(rng.integers(0, 255, (16, 16), np.uint8)))
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_bitmasks_round_trip():
    m = np.array([[0, 0, 0], [1, 0, 1], [1, 1, 1]])
    assert encode(m).tolist() == [0, 5, 7]
    np.testing.assert_array_equal(decode(encode(m), 3), m)


def test_findings_cells_parse_with_empty_and_no_finding_as_none():
    masks, names = parse_findings(
        ["Effusion|Infiltration", "", "No Finding", "no finding", " Mass ", "Effusion|Effusion"],
        [f"f.csv#row={i}" for i in range(6)],
    )
    assert names == ["Effusion", "Infiltration", "Mass"]
    assert decode(masks, 3).tolist() == [
        [1, 1, 0],
        [0, 0, 0],
        [0, 0, 0],
        [0, 0, 0],
        [0, 0, 1],
        [1, 0, 0],
    ]
    with pytest.raises(DataError, match=r"f.csv#row=1: 'labels' is 'Mass\|No Finding'"):
        parse_findings(["Mass", "Mass|No Finding"], ["f.csv#row=0", "f.csv#row=1"])
    masks, names = parse_findings(["Normal", "Mass"], ["a", "b"], no_finding="normal")
    assert names == ["Mass"] and masks.tolist() == [0, 1]


def test_finding_columns_must_be_0_or_1_and_exist(tmp_path):
    rows = [
        {"path": "a", "effusion": "1", "mass": "0"},
        {"path": "b", "effusion": "0.0", "mass": "-1"},
    ]
    where = ["f.csv#row=0", "f.csv#row=1"]
    with pytest.raises(
        DataError, match=r"f.csv#row=1: finding column 'mass' holds '-1'; expected 0 or 1"
    ):
        parse_columns(rows, ["effusion", "mass"], tmp_path / "f.csv", where)
    with pytest.raises(DataError, match=r"--label-columns names 'edema', which is not a column"):
        parse_columns(rows, ["edema"], tmp_path / "f.csv", where)
    masks, names = parse_columns(rows[:1], ["Effusion", "mass"], tmp_path / "f.csv", where)
    assert names == ["Effusion", "mass"] and masks.tolist() == [1]


def test_iterative_split_keeps_every_finding_in_every_split_better_than_chance():
    rng = np.random.default_rng(0)
    rates = np.array([0.4, 0.1, 0.03, 0.01])  # the last: 10 positives in 1,000
    y = (rng.random((1000, 4)) < rates).astype(np.int64)
    a = iterative_split(y, seed=0)
    sizes = np.bincount(a, minlength=3) / len(a)
    np.testing.assert_allclose(sizes, [0.70, 0.15, 0.15], atol=0.01)
    for j in range(4):
        pos = y[:, j] == 1
        shares = np.bincount(a[pos], minlength=3) / pos.sum()
        assert (np.bincount(a[pos], minlength=3) > 0).all(), j
        np.testing.assert_allclose(shares, [0.70, 0.15, 0.15], atol=0.11)
    np.testing.assert_array_equal(iterative_split(y, seed=0), a)  # seeded


def test_a_labels_csv_lists_as_findings_split_iteratively(tmp_path):
    rng = np.random.default_rng(1)
    cells = []
    for _ in range(60):
        found = [n for n, r in (("Effusion", 0.4), ("Mass", 0.3)) if rng.random() < r]
        cells.append("|".join(found) or "No Finding")
    path = _csv(tmp_path, ["path", "labels"], [[f"img{i}.png", c] for i, c in enumerate(cells)])
    rows = list_rows(path)
    assert rows.multilabel and rows.label_names == ["Effusion", "Mass"]
    y = decode(rows.table.column("label").to_numpy(), 2)
    split = np.array(rows.table.column("split").to_pylist())
    for s in ("train", "val", "test"):
        assert (y[split == s].sum(axis=0) > 0).all(), s
    ds = load_dataset(path)
    assert ds.multilabel and sum(len(p) for p in ds.splits.values()) == 60


def test_label_columns_read_a_chexpert_style_csv(tmp_path):
    rng = np.random.default_rng(2)
    y = (rng.random((40, 2)) < 0.4).astype(int)
    y[:6] = [[1, 1]] * 6
    body = [[f"img{i}.png", a, b, "x"] for i, (a, b) in enumerate(y)]
    path = _csv(tmp_path, ["path", "Edema", "Cardiomegaly", "sex"], body)
    rows = list_rows(path, label_columns=("Edema", "Cardiomegaly"))
    assert rows.multilabel and rows.label_names == ["Edema", "Cardiomegaly"]
    np.testing.assert_array_equal(decode(rows.table.column("label").to_numpy(), 2), y)
    with pytest.raises(DataError, match="finding column 'sex' holds 'x'"):
        list_rows(path, label_columns=("Edema", "sex"))


def test_a_finding_only_in_test_or_absent_from_val_is_refused_by_name(tmp_path):
    body = [[f"img{i}.png", "A", "train"] for i in range(4)]
    body += [[f"img{i}.png", "A", "val"] for i in range(4, 6)]
    body += [["img6.png", "A|Hernia", "test"], ["img7.png", "A", "test"]]
    path = _csv(tmp_path, ["path", "labels", "split"], body)
    with pytest.raises(
        DataError,
        match=r"never seen in training: 'Hernia' \(train/val/test positives \[0, 0, 1\]\)",
    ):
        list_rows(path)
    body[6] = ["img6.png", "A", "test"]
    body[0] = ["img0.png", "A|Hernia", "train"]
    path = _csv(tmp_path, ["path", "labels", "split"], body)
    with pytest.raises(DataError, match=r"no positive image in validation: 'Hernia'"):
        list_rows(path)
    check_splits(np.array([1, 1, 1]), ["train", "val", "test"], ["A"], "ok")


def test_an_npz_with_label_columns_is_multilabel_and_checked(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for s, n in (("train", 30), ("val", 10), ("test", 10)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 8, 8), np.uint8)
        arrays[f"{s}_labels"] = np.tile([[1, 0, 1], [0, 1, 0]], (n // 2, 1))
    np.savez(tmp_path / "three.npz", **arrays)
    with pytest.raises(DataError, match="chestmnist.npz: 3 finding columns but 14 label names"):
        np.savez(tmp_path / "chestmnist.npz", **arrays)
        load_dataset(tmp_path / "chestmnist.npz")
    wide = {k: np.tile(v, (1, 5))[:, :14] if k.endswith("labels") else v for k, v in arrays.items()}
    np.savez(tmp_path / "chestmnist.npz", **wide)
    ds = load_dataset(tmp_path / "chestmnist.npz")
    assert ds.multilabel and ds.label_names[:3] == ["atelectasis", "cardiomegaly", "effusion"]
    assert len(ds.label_names) == 14
    assert load_dataset(tmp_path / "three.npz").label_names == [
        "finding_0",
        "finding_1",
        "finding_2",
    ]
    arrays["val_labels"] = arrays["val_labels"] * 2
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(
        DataError,
        match=r"bad.npz\[val_labels\]: multi-label labels must be 0 or 1, got values \[2\]",
    ):
        load_dataset(tmp_path / "bad.npz")


def test_the_multilabel_demo_lists_three_findings_in_every_split(tmp_path):
    rows = list_rows("demo-findings", str(tmp_path))
    assert rows.multilabel and rows.label_names == ["nodule", "ring", "effusion"]
    assert rows.name == "synthetic-findings" and len(rows) == 1100

"""``medcae suggest``: the strategies on synthetic arrays (no Ray), the files, the labels CSV
that ``medcae run --data`` reads back, and the command end to end over a folder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import medcae_subprocess
from PIL import Image

from medcae.config import ConfigError
from medcae.data import DataError, list_rows
from medcae.inference.predictions import (
    list_matrix,
    prediction_schema,
    prediction_table,
    write_parquet,
    write_predictions_csv,
)
from medcae.inference.predictor import Prediction, Predictor
from medcae.labeling.strategies import (
    HYBRID_MIN_PER_CLASS,
    STRATEGIES,
    Pool,
    cluster_visits,
    get_strategy,
    hybrid_choice,
    suggest,
)
from medcae.labeling.suggestions import (
    SUGGESTION_COLUMNS,
    SuggestPaths,
    contact_sheet,
    read_labeled,
    write_labels,
)

NAMES = ["normal", "nodule", "ring"]


def _pool(proba, labeled=(), in_dist=None, counts=None, vectors=None) -> Pool:
    proba = np.asarray(proba, float)
    n = len(proba)
    mask = np.zeros(n, bool)
    mask[list(labeled)] = True
    return Pool(
        proba,
        vectors,
        np.ones(n, bool) if in_dist is None else np.asarray(in_dist),
        mask,
        np.asarray(counts if counts is not None else [0] * proba.shape[1]),
    )


# --------------------------------------------------------------------------- strategies


def test_registry_names_and_unknown_strategy():
    assert list(STRATEGIES) == ["random", "margin", "typiclust", "hybrid"]
    with pytest.raises(ConfigError, match="unknown strategy 'entropy'; known: random, margin"):
        get_strategy("entropy")
    with pytest.raises(ConfigError, match="k 0: expected at least 1"):
        suggest(_pool([[0.5, 0.5]]), 0, "margin")


def test_random_is_seeded_and_a_permutation_of_the_candidates():
    pool = _pool(np.full((40, 2), 0.5), labeled=[3, 7])
    full = suggest(pool, 40, "random", seed=1).ranking
    assert sorted(full.indices) == sorted(set(range(40)) - {3, 7})  # every candidate, once
    assert np.all(np.diff(full.scores) <= 0) and full.strategy == "random"
    again = suggest(pool, 5, "random", seed=1).ranking.indices
    assert list(again) == list(full.indices[:5])
    assert list(suggest(pool, 5, "random", seed=2).ranking.indices) != list(again)


@pytest.mark.parametrize(
    "proba, labeled, k, expected",
    [
        ([[0.9, 0.1], [0.55, 0.45], [0.7, 0.3], [0.5, 0.5]], (), 4, [3, 1, 2, 0]),
        ([[0.9, 0.1], [0.55, 0.45], [0.7, 0.3], [0.5, 0.5]], (3,), 2, [1, 2]),
        ([[0.4, 0.35, 0.25], [0.8, 0.1, 0.1], [0.34, 0.33, 0.33]], (), 3, [2, 0, 1]),
        ([[0.6, 0.4], [0.6, 0.4], [0.99, 0.01]], (), 2, [0, 1]),  # ties: pool order
    ],
    ids=["two-classes", "labeled-excluded", "three-classes-top-two-only", "ties"],
)
def test_margin_smallest_gap_first(proba, labeled, k, expected):
    r = suggest(_pool(proba, labeled), k, "margin").ranking
    assert list(r.indices) == expected
    top = np.sort(np.asarray(proba)[expected], axis=1)
    np.testing.assert_allclose(r.scores, 1 - (top[:, -1] - top[:, -2]))


def _blobs(n_blobs: int = 5, per_blob: int = 30, seed: int = 0):
    """Well separated Gaussian blobs in 8-D: vectors ``(N, 8)``, blob of each row."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (n_blobs, 8)) * 20
    x = np.concatenate([c + rng.normal(0, 1, (per_blob, 8)) for c in centres])
    return x, np.repeat(np.arange(n_blobs), per_blob)


@pytest.mark.parametrize(
    "labeled_blobs, k",
    [((), 5), ((0, 3), 3), ((1,), 4), ((0, 1, 2, 3), 1)],
    ids=["cold-start", "two-covered", "one-covered", "one-left"],
)
def test_typiclust_picks_the_centre_of_each_uncovered_blob(labeled_blobs, k):
    x, blob = _blobs()
    labeled = [b * 30 + 5 for b in labeled_blobs]  # one labeled image in each of these blobs
    counts = [len(labeled), 0]
    pool = _pool(np.full((len(x), 2), 0.5), labeled, counts=counts, vectors=x)
    r = suggest(pool, k, "typiclust", seed=0).ranking
    picked = blob[r.indices]
    assert sorted(picked) == sorted(set(range(5)) - set(labeled_blobs))  # one per free blob
    for i in r.indices:  # each the densest point: near its blob's centre
        members = x[blob == blob[i]]
        dist = np.linalg.norm(members - members.mean(0), axis=1)
        assert np.linalg.norm(x[i] - members.mean(0)) <= np.percentile(dist, 25)


def test_typiclust_with_more_picks_than_blobs_covers_every_blob():
    x, blob = _blobs()
    pool = _pool(np.full((len(x), 2), 0.5), vectors=x)
    picks = suggest(pool, 7, "typiclust").ranking.indices
    assert len(set(picks)) == 7 and set(blob[picks]) == set(range(5))


@pytest.mark.parametrize(
    "clusters, typ, labeled, expected",
    [
        # clusters 0 (size 3, one labeled), 1 (size 2), 2 (size 4): free ones largest first,
        # then the covered one, then round two: each cluster's next most typical
        (
            [0, 0, 0, 1, 1, 2, 2, 2, 2],
            [9, 5, 1, 3, 4, 1, 8, 2, 7],
            [0],
            [6, 4, 1, 8, 3, 2, 7, 5],
        ),
        ([0, 1, 1], [1, 2, 3], [], [2, 0, 1]),  # sizes 1 and 2: the larger first
    ],
    ids=["covered-last-then-round-two", "size-order"],
)
def test_cluster_visit_order(clusters, typ, labeled, expected):
    labeled_mask = np.isin(np.arange(len(clusters)), labeled)
    order = cluster_visits(np.array(clusters), np.array(typ, float), labeled_mask, ~labeled_mask)
    assert list(order) == expected


@pytest.mark.parametrize(
    "counts, choice",
    [
        ([0, 0], "typiclust"),
        ([HYBRID_MIN_PER_CLASS - 1, 50], "typiclust"),
        ([HYBRID_MIN_PER_CLASS, HYBRID_MIN_PER_CLASS], "margin"),
        ([12, 9, HYBRID_MIN_PER_CLASS - 1], "typiclust"),
        ([12, 9, HYBRID_MIN_PER_CLASS], "margin"),
    ],
)
def test_hybrid_switches_at_the_documented_threshold(counts, choice):
    assert hybrid_choice(np.array(counts)) == choice
    x, _ = _blobs(n_blobs=len(counts), per_blob=10)
    proba = np.random.default_rng(1).dirichlet(np.ones(len(counts)), len(x))
    pool = _pool(proba, counts=counts, vectors=x)
    got = suggest(pool, 3, "hybrid").ranking
    want = suggest(pool, 3, choice).ranking
    assert got.strategy == f"hybrid:{choice}" and list(got.indices) == list(want.indices)


def test_out_of_distribution_left_out_by_default_and_listed():
    proba = [[0.5, 0.5], [0.9, 0.1], [0.51, 0.49], [0.8, 0.2], [0.6, 0.4]]
    in_dist = [False, True, False, True, True]  # the two most uncertain are OOD
    pool = _pool(proba, labeled=[2], in_dist=in_dist)
    default = suggest(pool, 5, "margin")
    assert list(default.ranking.indices) == [4, 3, 1]
    assert list(default.out_of_distribution) == [0]  # a labeled OOD image is not listed
    assert default.candidates == 3
    ranked = suggest(pool, 5, "margin", include_ood=True)
    assert list(ranked.ranking.indices) == [0, 4, 3, 1]
    assert len(ranked.out_of_distribution) == 0


# --------------------------------------------------------------------------- the files


def test_prediction_table_carries_vectors_only_when_asked(tmp_path):
    preds = [Prediction("ring", dict(zip(NAMES, (0.1, 0.2, 0.7))), 0.5, True)] * 3
    plain = prediction_table(["/a", "/b", "/c"], preds, NAMES)
    assert "vector" not in plain.column_names  # medcae predict's table is unchanged
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    table = prediction_table(["/a", "/b", "/c"], preds, NAMES, x)
    assert table.schema == prediction_schema(NAMES, vectors=True)
    write_parquet([table, table.slice(1, 2)], tmp_path / "p.parquet", table.schema)
    back = pq.read_table(tmp_path / "p.parquet")
    np.testing.assert_array_equal(list_matrix(back, "vector"), np.concatenate([x, x[1:]]))
    write_predictions_csv(tmp_path / "p.parquet", tmp_path / "p.csv")  # CSV leaves the vectors out
    assert "vector" not in (tmp_path / "p.csv").read_text().splitlines()[0]


def _pngs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = [folder / f"{i}.png" for i in range(n)]
    for f in files:
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(f)
    return files


@pytest.mark.parametrize(
    "text, problem",
    [
        ("path\nx.png\n", "missing column(s) ['label']; found columns ['path']"),
        ("file,label\nx.png,ring\n", "missing column(s) ['path']; found columns ['file', 'label']"),
        ("path,label\nx.png,tumour\n", "row=0: label 'tumour' is none of the bundle's classes"),
        ("path,label\nx.png,3\n", "nor an index 0..2"),
    ],
    ids=["no-label", "no-path", "unknown-name", "index-out-of-range"],
)
def test_labeled_csv_errors_name_file_column_and_expectation(tmp_path, text, problem):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError) as err:
        read_labeled(tmp_path / "labels.csv", NAMES)
    assert str(tmp_path / "labels.csv") in str(err.value) and problem in str(err.value)


def test_labeled_csv_paths_names_and_indices(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "l.csv").write_text(
        "Path,Label\nimgs/a.png,ring\n/abs/b.png,0\nimgs/c.png,\n"
    )
    got = read_labeled(tmp_path / "sub" / "l.csv", NAMES)
    assert got.paths == [str(tmp_path / "sub" / "imgs" / "a.png"), "/abs/b.png"]  # c: no label
    assert list(got.classes) == [2, 0] and list(got.class_counts(3)) == [1, 0, 1]
    assert got.split is None


def test_labels_csv_is_what_medcae_run_reads(tmp_path):
    """The loop: labeled rows + suggestions with an empty label; the user fills some in; the
    listing of ``medcae run --data`` (``list_rows``) reads them, skipping the empty ones."""
    files = _pngs(tmp_path / "pool", 8)
    (tmp_path / "given.csv").write_text(
        "path,label\n" + "".join(f"pool/{f.name},{NAMES[i % 3]}\n" for i, f in enumerate(files[:3]))
    )
    labeled = read_labeled(tmp_path / "given.csv", NAMES)
    out = tmp_path / "out" / "labels.csv"
    out.parent.mkdir()
    write_labels(out, labeled, [str(f) for f in files[3:7]])
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["normal", "nodule", "ring", "", "", "", ""]
    for r, name in zip(rows[3:6], ["ring", "ring", "normal"]):  # the annotator's work
        r["label"] = name
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    listed = list_rows(out)
    assert len(listed) == 6 and listed.label_names == sorted(NAMES)
    assert sorted(listed.table.column("path").to_pylist()) == sorted(map(str, files[:6]))
    assert len(listed.skipped) == 1 and "missing label" in listed.skipped[0][1]
    assert read_labeled(out, NAMES).paths == [str(f) for f in files[:6]]  # the next --labeled


def test_labels_csv_keeps_a_split_column(tmp_path):
    (tmp_path / "given.csv").write_text("path,label,split\n/a.png,ring,test\n")
    out = tmp_path / "labels.csv"
    write_labels(out, read_labeled(tmp_path / "given.csv", NAMES), ["/b.png"])
    assert out.read_text().splitlines() == ["path,label,split", "/a.png,ring,test", "/b.png,,train"]


def test_output_folder_never_overwrites_unread_labels(tmp_path):
    paths = SuggestPaths.under(tmp_path / "out", None)
    assert paths.batch.parquet == tmp_path / "out" / "pool.parquet"
    assert paths.batch.skipped.name == "skipped.csv" and paths.batch.log.name == "run.log"
    paths.labels.write_text("path,label\n/a.png,ring\n")
    with pytest.raises(DataError, match="exists and may hold labels filled in since"):
        SuggestPaths.under(tmp_path / "out", None)
    assert SuggestPaths.under(tmp_path / "out", paths.labels).labels == paths.labels


def test_contact_sheet_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 30), dtype=np.uint8), None]
    images.append(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
    out = tmp_path / "sheet.png"
    contact_sheet(images, ["#1 ring\nscore 0.9", "#2 x", "#3 normal"], out, "title")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 100
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def pool_folder(tmp_path_factory, demo_bundle) -> Path:
    """12 demo PNGs in two sub-folders and a corrupt PNG."""
    root = tmp_path_factory.mktemp("pool")
    for i, image in enumerate(demo_bundle.test_images[:12]):
        sub = root / ("a" if i < 6 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:02d}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _labeled_csv(folder: Path, pool: Path, demo_bundle) -> Path:
    """Two pool images (relative paths) labeled with their true classes."""
    csv_path = folder / "given.csv"
    labels = [NAMES[int(y)] for y in demo_bundle.test_labels[:2]]
    rel = [f"../{pool.name}/a/00.png", f"../{pool.name}/a/01.png"]
    csv_path.write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in zip(rel, labels)))
    return csv_path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing bundle", "error: not a model bundle"),
        ("no images", "no images found"),
        ("k 0", "error: --k 0: expected at least 1"),
        ("unknown strategy", "error: unknown strategy 'entropy'; known: random, margin"),
        ("labeled without label", "missing column(s) ['label']; found columns ['path']"),
    ],
)
def test_bad_input_is_one_error_line_before_ray(tmp_path, demo_bundle, pool_folder, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "labels.csv").write_text("path\nx.png\n")
    bundle, pool = str(demo_bundle.path), str(pool_folder)
    more = {
        "k 0": ["--k", "0"],
        "unknown strategy": ["--strategy", "entropy"],
        "labeled without label": ["--labeled", str(tmp_path / "labels.csv")],
    }.get(case, [])
    if case == "missing bundle":
        bundle = str(tmp_path / "no-bundle")
    elif case == "no images":
        pool = str(tmp_path / "empty")
    out = tmp_path / "out"
    run = medcae_subprocess("suggest", "--bundle", bundle, "--pool", pool, "--out", str(out), *more)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    if case == "labeled without label":
        assert str(tmp_path / "labels.csv") in lines[0]
    assert not out.exists()


@pytest.mark.ray
@pytest.mark.slow
def test_cli_suggests_from_a_folder(tmp_path, demo_bundle, pool_folder):
    given = _labeled_csv(tmp_path, pool_folder, demo_bundle)
    out = tmp_path / "out"
    run = medcae_subprocess(
        "suggest",
        "--bundle",
        str(demo_bundle.path),
        "--pool",
        str(pool_folder),
        "--k",
        "4",
        "--labeled",
        str(given),
        "--out",
        str(out),
        "--batch-size",
        "5",
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out / "suggestions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == SUGGESTION_COLUMNS
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    assert {r["strategy"] for r in rows} == {"hybrid:typiclust"}  # 2 labels: still cold
    good = {str(p) for p in pool_folder.rglob("*.png") if p.name != "broken.png"}
    labeled = {str(pool_folder / "a" / "00.png"), str(pool_folder / "a" / "01.png")}
    assert {r["path"] for r in rows} <= good - labeled
    assert all(r["predicted_label"] in NAMES and r["in_distribution"] == "true" for r in rows)
    with Image.open(out / "suggestions.png") as im:
        assert im.format == "PNG" and im.width > 0 and im.height > 0
    with open(out / "out_of_distribution.csv", newline="") as fh:
        ood = list(csv.DictReader(fh))
    assert not {r["path"] for r in ood} & {r["path"] for r in rows}
    with open(out / "skipped.csv", newline="") as fh:
        assert [r["path"] for r in csv.DictReader(fh)] == [str(pool_folder / "broken.png")]
    assert str(pool_folder / "broken.png") in run.stdout and "Traceback" not in run.stderr
    table = pq.read_table(out / "pool.parquet").sort_by("path")
    assert table.column("path").to_pylist() == sorted(good)
    expected = Predictor.from_bundle(demo_bundle.path).predict_arrays(
        [Path(p).read_bytes() for p in sorted(good)]
    )
    vectors = list_matrix(table, "vector")  # the classifier's input vectors, as the Predictor's
    np.testing.assert_allclose(vectors, expected["features"], rtol=1e-4, atol=1e-5)
    with open(out / "labels.csv", newline="") as fh:
        template = list(csv.DictReader(fh))
    assert [r["path"] for r in template] == sorted(labeled) + [r["path"] for r in rows]
    assert [bool(r["label"]) for r in template] == [True, True, False, False, False, False]
    assert "predict: " in run.stderr and "rank: hybrid:typiclust over" in run.stderr
    assert f"medcae run --data {out / 'labels.csv'}" in run.stdout


# --------------------------------------------------------------------------- findings


def test_margin_over_findings_asks_first_for_the_finding_closest_to_its_threshold():
    proba = np.array([[0.9, 0.1], [0.32, 0.05], [0.5, 0.5], [0.1, 0.69]])
    pool = Pool(
        proba, None, np.ones(4, bool), np.zeros(4, bool), np.array([5, 5]), np.array([0.3, 0.7])
    )
    ranking = suggest(pool, 4, "margin", seed=0).ranking
    # distances to the thresholds: 0.6 | 0.02 | 0.2 | 0.01 (finding 2 of image 3)
    assert ranking.indices.tolist() == [3, 1, 2, 0]


def test_a_findings_labels_csv_round_trips_into_medcae_run(tmp_path):
    """Findings: ``labels`` with ``|``, an empty cell is "no finding", ``?`` is not labeled
    yet; a finding the bundle never saw is refused naming it."""
    files = _pngs(tmp_path / "pool", 10)
    names = ["effusion", "mass"]
    cells = ["effusion|mass", "", "mass", "effusion", "No Finding", "effusion", "mass"]
    splits = ["train", "train", "val", "val", "test", "train", "train"]
    (tmp_path / "given.csv").write_text(
        "path,labels,split\n"
        + "".join(f"pool/{f.name},{c},{s}\n" for f, c, s in zip(files, cells, splits))
    )
    labeled = read_labeled(tmp_path / "given.csv", names, multilabel=True)
    assert labeled.class_counts(2).tolist() == [3, 3] and len(labeled.paths) == 7
    out = tmp_path / "labels.csv"
    write_labels(out, labeled, [str(f) for f in files[7:]])
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["labels"] for r in rows][-3:] == ["?", "?", "?"]
    listed = list_rows(out)
    assert listed.multilabel and listed.label_names == names
    assert len(listed.skipped) == 3 and all("not labeled yet" in r for _, r in listed.skipped)
    (tmp_path / "bad.csv").write_text(f"path,labels\npool/{files[0].name},hernia|mass\n")
    with pytest.raises(
        DataError, match=r"bad.csv#row=0: finding\(s\) \['hernia'\] were never seen"
    ):
        read_labeled(tmp_path / "bad.csv", names, multilabel=True)

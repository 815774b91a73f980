"""``medcae predict --bundle B --data PATH``: one row per image, the Predictor's and the
endpoint's probabilities, unreadable files skipped, bad input refused before Ray starts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import dicom_bytes
from helpers import medcae_subprocess as _medcae
from PIL import Image

from medcae.cli.main import main
from medcae.data import DataError
from medcae.inference.predictions import (
    OutputPaths,
    atomic_file,
    prediction_schema,
    prediction_table,
    write_parquet,
    write_predictions_csv,
)
from medcae.inference.predictor import Prediction, Predictor

NAMES = ["normal", "nodule", "ring"]
GOOD = 12  # images in the folder that decode
IGNORED = {"broken.png", "notes.txt"}  # the corrupt PNG and the text file


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, demo_bundle) -> Path:
    """12 demo images (9 PNG, 2 JPEG, 1 suffix-less DICOM) in sub-folders, a corrupt PNG and a
    text file that is no image at all."""
    root = tmp_path_factory.mktemp("archive")
    images = demo_bundle.test_images[:GOOD]
    for i, image in enumerate(images[:11]):
        sub = root / ("a" if i < 9 else "b") / f"patient{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(sub / (f"{i}.png" if i < 9 else f"{i}.jpg"), quality=95)
    (root / "b" / "1.2.840.99").write_bytes(dicom_bytes(images[11].astype(np.uint16) * 200))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image\n")
    return root


def _good_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in IGNORED)


# --------------------------------------------------------------------------- the core, no Ray


def _prediction(probs: list[float], error: float = 0.5) -> Prediction:
    names = NAMES[: len(probs)]
    label = names[int(np.argmax(probs))]
    return Prediction(label, dict(zip(names, probs)), error, error < 1.0)


@pytest.mark.parametrize(
    "probs",
    [[], [[0.3, 0.7]], [[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]]],
    ids=["empty", "two-classes", "three-classes"],
)
def test_prediction_table_rows_and_columns(probs):
    names = NAMES[: len(probs[0])] if probs else NAMES
    preds = [_prediction(p, error=0.5 + i) for i, p in enumerate(probs)]
    table = prediction_table([f"/x/{i}.png" for i in range(len(preds))], preds, names)
    assert table.schema == prediction_schema(names)
    assert table.column_names == [
        "path",
        "label",
        "probabilities",
        *(f"p_{n}" for n in names),
        "threshold",
        "reconstruction_error",
        "in_distribution",
    ]
    assert table.column("probabilities").to_pylist() == probs
    for i, name in enumerate(names):
        assert table.column(f"p_{name}").to_pylist() == [p[i] for p in probs]
    assert table.column("label").to_pylist() == [names[int(np.argmax(p))] for p in probs]
    assert table.column("in_distribution").to_pylist() == [True, False][: len(probs)]


@pytest.mark.parametrize(
    "out, problem",
    [
        ("preds.parquet", None),
        ("deeper/new/preds.parquet", None),
        ("preds.csv", "expected a .parquet file name"),
        (".", "is a folder"),
        ("a-file.txt/preds.parquet", "cannot write the predictions"),
    ],
)
def test_output_paths_are_checked(tmp_path, out, problem):
    (tmp_path / "a-file.txt").write_text("x")
    if problem is not None:
        with pytest.raises(DataError, match=problem):
            OutputPaths.beside(tmp_path / out)
        return
    paths = OutputPaths.beside(tmp_path / out)
    stem = str(tmp_path / out)[: -len(".parquet")]
    assert [str(p) for p in (paths.parquet, paths.csv, paths.skipped, paths.log)] == [
        f"{stem}.parquet",
        f"{stem}.csv",
        f"{stem}.skipped.csv",
        f"{stem}.log",
    ]
    assert paths.parquet.parent.is_dir() and not list(paths.parquet.parent.glob(".*"))


def test_parquet_and_csv_are_written_whole_or_not_at_all(tmp_path):
    schema = prediction_schema(NAMES[:2])
    part = prediction_table(["/x/a.png"], [_prediction([0.25, 0.75])], NAMES[:2])

    def failing():
        yield part
        raise RuntimeError("a worker died")

    out = tmp_path / "p.parquet"
    with pytest.raises(RuntimeError):
        write_parquet(failing(), out, schema)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    assert write_parquet([part, part.slice(0, 0), part], out, schema) == 2
    write_predictions_csv(out, tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [json.loads(r["probabilities"]) for r in rows] == [[0.25, 0.75]] * 2
    assert [float(r["p_nodule"]) for r in rows] == [0.75, 0.75]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.parquet"]
    with pytest.raises(ValueError), atomic_file(tmp_path / "q.csv") as tmp:
        tmp.write_text("half")
        raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.parquet"]


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "nothing to predict"),
        (["--bundle", "b", "--data", "d"], "missing --out"),
        (["--bundle", "b", "--data", "d", "--out", "p.parquet", "x.png"], "go without --bundle"),
        (["--data", "d", "--out", "p.parquet", "--url", "http://h"], "missing --bundle"),
    ],
)
def test_predict_needs_one_form_or_the_other(argv, message, capsys):
    with pytest.raises(SystemExit) as ex:
        main(["predict", *argv])
    assert ex.value.code == 2 and message in capsys.readouterr().err


def test_http_form_is_unchanged(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    assert main(["predict", "--url", "http://127.0.0.1:9", "--timeout", "2", str(image)]) == 1
    assert "cannot reach the medcae server at http://127.0.0.1:9" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing bundle", "error: not a model bundle"),
        ("no images", "no images found"),
        ("no such folder", "error: no such file or folder"),
        ("unwritable out", "error: cannot write the predictions"),
        ("no actors", "error: --actors 0: expected at least 1"),
    ],
)
def test_bad_input_is_one_error_line_before_ray(tmp_path, demo_bundle, image_folder, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    (tmp_path / "a-file").write_text("x")
    bundle, data, out = str(demo_bundle.path), str(image_folder), str(tmp_path / "p.parquet")
    if case == "missing bundle":
        bundle = str(tmp_path / "no-bundle")
    elif case == "no images":
        data = str(tmp_path / "empty")
    elif case == "no such folder":
        data = str(tmp_path / "nowhere")
    elif case == "unwritable out":
        out = str(tmp_path / "a-file" / "p.parquet")
    more = ["--actors", "0"] if case == "no actors" else []
    run = _medcae("predict", "--bundle", bundle, "--data", data, "--out", out, *more)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_cli_predicts_a_folder(tmp_path, demo_bundle, image_folder):
    out = tmp_path / "out" / "preds.parquet"
    run = _medcae(
        "predict",
        "--bundle",
        str(demo_bundle.path),
        "--data",
        str(image_folder),
        "--out",
        str(out),
        "--batch-size",
        "5",
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = pq.read_table(out)
    assert table.num_rows == GOOD
    # in the listing's order: sorted paths
    assert table.column("path").to_pylist() == [str(p) for p in _good_files(image_folder)]
    assert f"predicted {GOOD} of {GOOD + 1} images" in run.stdout
    assert str(image_folder / "broken.png") in run.stdout and "Traceback" not in run.stderr
    assert "predict: " in run.stderr  # the stage's progress line
    assert (out.parent / "preds.log").stat().st_size > 0 and not (out.parent / "preds.csv").exists()


# --------------------------------------------------------------------------- the Ray Data stage


@pytest.fixture(scope="module")
def batch_run(ray_session, demo_bundle, image_folder, tmp_path_factory):
    """The Ray Data stage over the folder, in this session's Ray; with ``--csv``."""
    from medcae.data import list_unlabeled_rows
    from medcae.distributed.predict import PredictOptions, predict_files

    paths = OutputPaths.beside(tmp_path_factory.mktemp("preds") / "preds.parquet")
    opts = PredictOptions(batch_size=5, csv=True)
    rows = list_unlabeled_rows(image_folder)
    res = predict_files(rows, str(demo_bundle.path), NAMES, 64, paths, opts)
    return res, pq.read_table(paths.parquet)  # rows in the listing's order, not re-sorted


@pytest.mark.ray
def test_rows_come_out_in_input_order_whatever_finishes_first(ray_session, tmp_path):
    """Block 0 waits until the three others have finished, so it finishes last (the test
    checks that it did); in_input_order still hands its rows out first."""
    import time

    import ray.data

    from medcae.distributed.predict import in_input_order

    finished = tmp_path / "finished"
    finished.mkdir()

    def first_block_last(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        block = int(batch["id"][0]) // 2
        deadline = time.monotonic() + 120
        while block == 0 and len(list(finished.iterdir())) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        (finished / f"{time.monotonic_ns()}-{block}").touch()
        return batch

    ds = ray.data.from_items([{"id": i} for i in range(8)], override_num_blocks=4)
    ds = in_input_order(ds.map_batches(first_block_last, batch_size=None, num_cpus=0.25))
    assert ds.context.execution_options.preserve_order
    assert [int(r["id"]) for r in ds.iter_rows()] == list(range(8))
    done = [
        int(f.name.split("-")[1])
        for f in sorted(finished.iterdir(), key=lambda f: int(f.name.split("-")[0]))
    ]
    assert sorted(done) == [0, 1, 2, 3] and done[-1] == 0, done  # block 0 did finish last
    assert not ray.data.DataContext.get_current().execution_options.preserve_order  # scoped


def _rows_by_path(table: pa.Table) -> dict[str, dict]:
    return {r["path"]: r for r in table.to_pylist()}


@pytest.mark.ray
@pytest.mark.slow
def test_one_row_per_image_with_the_predictors_probabilities(batch_run, demo_bundle, image_folder):
    res, table = batch_run
    files = _good_files(image_folder)
    assert res.rows == table.num_rows == GOOD and res.listed == GOOD + 1
    assert table.column("path").to_pylist() == [str(f) for f in files]
    assert table.schema == prediction_schema(NAMES)
    predictor = Predictor.from_bundle(demo_bundle.path)
    expected = predictor.predict_arrays([f.read_bytes() for f in files])
    proba = np.array(table.column("probabilities").to_pylist())
    np.testing.assert_allclose(proba, expected["proba"], atol=1e-5)
    for i, name in enumerate(NAMES):
        np.testing.assert_allclose(table.column(f"p_{name}").to_numpy(), proba[:, i])
    errors = table.column("reconstruction_error").to_numpy()
    np.testing.assert_allclose(errors, expected["error"], rtol=1e-4, atol=1e-6)
    assert table.column("label").to_pylist() == [NAMES[k] for k in proba.argmax(1)]
    assert table.column("in_distribution").to_pylist() == list(errors <= predictor.ood_threshold)
    # the corrupt file is skipped, with its reason; the text file was never an image
    assert [p for p, _ in res.skipped] == [str(image_folder / "broken.png")]
    with open(res.paths.skipped, newline="") as fh:
        assert [tuple(r) for r in csv.reader(fh)] == [("path", "reason"), *res.skipped]
    assert "notes.txt" not in json.dumps(table.to_pylist() + res.skipped)
    # the CSV holds the same table
    with open(res.paths.csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    np.testing.assert_allclose([json.loads(r["probabilities"]) for r in rows], proba, rtol=1e-12)
    np.testing.assert_allclose([float(r["p_ring"]) for r in rows], proba[:, 2], rtol=1e-12)
    assert sorted(p.name for p in res.paths.parquet.parent.iterdir()) == [
        "preds.csv",
        "preds.parquet",
        "preds.skipped.csv",
    ]


@pytest.mark.ray
@pytest.mark.serve
@pytest.mark.slow
def test_same_probabilities_as_the_http_endpoint(batch_run, server, image_folder):
    _, table = batch_run
    rows = _rows_by_path(table)
    for name in ("a/patient0/0.png", "b/patient1/9.jpg", "b/1.2.840.99"):
        path = image_folder / name
        reply = server.post("/v1/predict", content=path.read_bytes())
        assert reply.status_code == 200, reply.text
        served = reply.json()["prediction"]
        row = rows[str(path)]
        got = [served["probabilities"][n] for n in NAMES]
        np.testing.assert_allclose(row["probabilities"], got, atol=1e-5, err_msg=name)
        assert row["label"] == served["label"]
        assert row["in_distribution"] == served["in_distribution"]
        assert row["reconstruction_error"] == pytest.approx(served["reconstruction_error"], 1e-4)

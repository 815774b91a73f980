"""The retraining job's data (the champion's labels, the loop's labels, the held-out share) and
the challenger's comparison, without Ray."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import png_bytes

from medcae.data import DataError, list_rows
from medcae.labeling.pool import LabelPool
from medcae.labeling.retrain import (
    HELD_OUT_SHARE,
    budget_rows,
    compare,
    compare_summary,
    held_out,
    label_values,
    loop_rows,
    read_snapshot,
)


def test_held_out_is_a_fixed_share_by_image_id():
    ids = [f"{i:016x}" for i in range(4000)]
    share = np.mean([held_out(i) for i in ids])
    assert abs(share - HELD_OUT_SHARE) < 0.03
    assert [held_out(i) for i in ids[:50]] == [held_out(i) for i in ids[:50]]
    assert not any(held_out(i, 0.0) for i in ids[:50]) and all(held_out(i, 1.0) for i in ids[:50])


def test_snapshot_errors_name_file_and_line(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("image_id,label,split\na1,normal,train\na2,normal,validation\n")
    with pytest.raises(DataError, match=r"labels.csv, line 3: .*train or test.*'validation'"):
        read_snapshot(p)
    p.write_text("image_id,label\na1,normal\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['split'\]"):
        read_snapshot(p)
    with pytest.raises(DataError, match="cannot read the labels"):
        read_snapshot(tmp_path / "none.csv")


def test_label_values_classes_and_findings():
    names = ["effusion", "mass", "nodule"]
    assert label_values(["mass", "effusion"], names, False, "x").tolist() == [1, 0]
    with pytest.raises(DataError, match=r"x: label\(s\) \['cat'\] are not classes"):
        label_values(["mass", "cat"], names, False, "x")
    got = label_values(["mass|nodule", "No Finding", "effusion"], names, True, "x")
    assert got.tolist() == [0b110, 0, 0b001]
    with pytest.raises(DataError, match=r"'mass\|cat': \['cat'\] are not findings"):
        label_values(["mass|cat"], names, True, "x")


@pytest.fixture
def pool(tmp_path, demo_bundle) -> LabelPool:
    folder = tmp_path / "pool"
    folder.mkdir()
    for i, image in enumerate(demo_bundle.test_images[:10]):
        (folder / f"{i:02d}.png").write_bytes(png_bytes(image))
    return LabelPool.from_source(str(folder))


def test_loop_rows_keep_the_champions_labels_and_add_the_loops(demo_npz, pool):
    original = list_rows(str(demo_npz))
    names = original.label_names
    snapshot = [(pool.ids[i], names[i % 3], "test" if i == 4 else "train") for i in range(6)]
    rows = loop_rows(original, pool, snapshot, budget=4, seed=3)
    t = rows.table
    split, label = np.asarray(t.column("split").to_pylist()), t.column("label").to_numpy()
    ids = t.column("id").to_pylist()
    new = [i for i, x in enumerate(ids) if x.startswith("label:")]
    assert len(new) == 6 and len(t) == len(original) + 6
    assert [split[i] for i in new] == ["train"] * 4 + ["test", "train"]
    assert [int(label[i]) for i in new] == [0, 1, 2, 0, 1, 2]
    assert [t.column("path")[i].as_py() for i in new] == [pool.payload(p) for p, _, _ in snapshot]
    # of the champion's training split, exactly the labels its budget drew stay labeled
    o = original.table
    train = [i for i, s in enumerate(o.column("split").to_pylist()) if s == "train"]
    order = sorted(train, key=lambda i: o.column("id")[i].as_py())
    picked = {order[j] for j in budget_rows(o.column("label").to_numpy()[order], 4, 3)}
    for i in train:
        assert (split[i], label[i] >= 0) == (
            ("train", True) if i in picked else ("unlabeled", False)
        )
    assert np.bincount(label[[i for i in train if i in picked]]).tolist() == [4, 4, 4]
    # val and test untouched
    keep = [i for i in range(len(o)) if o.column("split")[i].as_py() in ("val", "test")]
    assert all(split[i] == o.column("split")[i].as_py() for i in keep)


def test_loop_rows_refuse_unknown_labels_and_images_gone_from_the_pool(demo_npz, pool):
    original = list_rows(str(demo_npz))
    with pytest.raises(DataError, match=r"snap.csv: label\(s\) \['cat'\]"):
        loop_rows(original, pool, [(pool.ids[0], "cat", "train")], 4, 0, "snap.csv")
    with pytest.raises(DataError, match=r"1 labeled image\(s\) are no longer in the pool"):
        loop_rows(original, pool, [("0123456789abcdef", "cat", "train")], 4, 0, "snap.csv")


def test_compare_binary_auc_interval_paired_test_and_accuracy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    strong = np.clip(y * 0.6 + rng.normal(0.2, 0.2, 300), 0, 1)
    weak = np.clip(y * 0.2 + rng.normal(0.4, 0.2, 300), 0, 1)
    two = lambda p: np.stack([1 - p, p], 1)  # noqa: E731
    out = compare(y, two(weak), two(strong), ["normal", "pneumonia"])
    assert out["n"] == 300 and len(out["tests"]) == 1
    ch, cp = out["challenger"], out["champion"]
    assert ch["auc"]["value"] > cp["auc"]["value"] > 0.5
    assert ch["auc"]["ci"][0] < ch["auc"]["value"] < ch["auc"]["ci"][1]
    t = out["tests"][0]
    assert t["class"] == "pneumonia" and t["difference"] > 0 and t["p"] < 0.001
    assert ch["accuracy"]["value"] > cp["accuracy"]["value"]
    assert 0 < ch["balanced_accuracy"] <= 1
    assert compare_summary(out).startswith("challenger AUC 0.")
    same = compare(y, two(strong), two(strong), ["normal", "pneumonia"])
    assert same["tests"][0]["difference"] == 0


def test_compare_multiclass_and_findings():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    p = rng.dirichlet([1, 1, 1], 200)
    p[np.arange(200), y] += 1
    p /= p.sum(1, keepdims=True)
    q = rng.dirichlet([1, 1, 1], 200)
    out = compare(y, q, p, ["a", "b", "c"])
    assert [t["class"] for t in out["tests"]] == ["a", "b", "c"]
    assert out["challenger"]["auc"]["value"] > out["champion"]["auc"]["value"]
    bits = rng.integers(0, 8, 200)
    f = compare(bits, rng.random((200, 3)), rng.random((200, 3)), ["x", "y", "z"], True)
    assert len(f["tests"]) == 3 and "accuracy" not in f["challenger"]


def test_a_jobs_progress_is_its_last_console_line_without_rays_decoration():
    from medcae.labeling.service import _last_line, _result, _why

    logs = (
        "retrain demo: champion version 1\n"
        "\x1b[36m(RayTrainWorker pid=27498)\x1b[0m epoch 1/15 train_loss 0.4749 ETA 133s\n"
        "\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started\n"
        "[2026-12-05 06:25:11,939 E 5326 5326] core_worker.cc:2465: Actor ...\n"
    )
    assert _last_line(logs) == "epoch 1/15 train_loss 0.4749 ETA 133s"
    done = (
        logs + 'comparison: challenger AUC 0.9\nlog: /x/run.log\nMEDCAE_RETRAIN {"version": "4"}\n'
    )
    assert _last_line(done) == "comparison: challenger AUC 0.9" and _result(done) == {
        "version": "4"
    }
    assert _result(logs) is None
    failed = logs + "error: labels.csv: 1 labeled image(s) are no longer in the pool\n"
    assert _why("Job entrypoint command failed with exit code 1", failed) == (
        "error: labels.csv: 1 labeled image(s) are no longer in the pool | "
        "Job entrypoint command failed with exit code 1"
    )

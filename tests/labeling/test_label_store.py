"""The label store: append-only rows, leases that never hand one image to two annotators,
and every acknowledged label kept across processes and a SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from medcae.labeling.store import LabelStore, LabelStoreError

IDS = [f"img{i:04d}" for i in range(1000)]


def test_labels_are_rows_corrections_append_and_undo_unlabels(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    store.add("chest", "img0001", "normal", "alice", version="3", now=1.0)
    store.add("chest", "img0002", "pneumonia", "bob", now=2.0)
    store.add("chest", "img0001", "pneumonia", "bob", now=3.0)  # a correction
    store.add("chest", "img0002", "", "bob", now=4.0)  # undo
    store.add("knee", "img0001", "arthritis", "alice", now=5.0)
    current = store.current("chest")
    assert list(current) == ["img0001"] and current["img0001"].label == "pneumonia"
    assert current["img0001"].annotator == "bob"
    history = store.history("chest")
    assert [(h.image_id, h.label) for h in history] == [
        ("img0001", "normal"),
        ("img0002", "pneumonia"),
        ("img0001", "pneumonia"),
        ("img0002", ""),
    ]
    assert history[0].version == "3" and store.counts("chest") == {"pneumonia": 1}
    assert LabelStore(tmp_path / "labels.db").current("knee")["img0001"].label == "arthritis"


def test_leases_skip_labeled_and_others_images_and_expire(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    store.add("m", IDS[0], "a", "carol")
    first = store.lease("m", IDS, 3, "alice", lease_s=60, now=100.0)
    assert first == IDS[1:4]  # IDS[0] is labeled
    assert store.lease("m", IDS, 3, "bob", lease_s=60, now=101.0) == IDS[4:7]
    assert store.lease("m", IDS, 3, "alice", lease_s=60, now=102.0) == IDS[1:4]  # her own again
    store.add("m", IDS[1], "b", "alice")
    store.release("m", IDS[2], "alice", skip_s=60, now=102.5)  # skipped
    assert store.lease("m", IDS, 2, "bob", lease_s=60, now=103.0) == IDS[4:6]
    store.release("m", IDS[7], "alice")  # given back (not a skip): free for all at once
    assert store.lease("m", IDS, 2, "carol", lease_s=60, now=104.0) == [IDS[2], IDS[7]]
    # alice's lease of IDS[3] (renewed at 102) runs out at 162: then bob may have it
    assert IDS[3] not in store.lease("m", IDS, 10, "bob", lease_s=60, now=161.0)
    assert IDS[3] in store.lease("m", IDS, 11, "bob", lease_s=60, now=162.5)  # his 10 + it
    with pytest.raises(LabelStoreError, match="k >= 1"):
        store.lease("m", IDS, 0, "bob")


def test_a_skipped_image_is_not_handed_back_to_who_skipped_it(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    assert store.lease("m", IDS, 2, "alice", lease_s=60, now=10.0) == IDS[:2]
    store.release("m", IDS[0], "alice", skip_s=60, now=11.0)
    assert store.lease("m", IDS, 2, "alice", lease_s=60, now=12.0) == [IDS[1], IDS[2]]
    assert store.lease("m", IDS, 1, "bob", lease_s=60, now=13.0) == [IDS[0]]  # others may
    store.release("m", IDS[0], "bob", now=14.0)
    assert IDS[0] in store.lease("m", IDS, 3, "alice", lease_s=60, now=71.5)  # skip over


_WORKER = """
import sys, time
from medcae.labeling.store import LabelStore
store = LabelStore(sys.argv[1])
who, n = sys.argv[2], int(sys.argv[3])
done = 0
while done < n:
    ids = store.lease("m", IDS, 5, who, lease_s=60)
    if not ids:
        break
    for i in ids:
        lab = store.add("m", i, who, who)
        print(lab.seq, i, flush=True)
        done += 1
        if done == n:
            break
"""


def _worker(db, who, n):
    code = f"IDS = {IDS[:600]!r}\n" + _WORKER
    return subprocess.Popen(
        [sys.executable, "-c", code, str(db), who, str(n)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_two_annotators_at_once_lose_and_duplicate_nothing(tmp_path):
    """Two processes, 200 labels each through leases of 5: every acknowledged label is
    kept, no image is labeled twice (no lease handed one image to both)."""
    db = tmp_path / "labels.db"
    LabelStore(db)  # the schema, once
    procs = {who: _worker(db, who, 200) for who in ("alice", "bob")}
    acked = {who: p.communicate(timeout=120)[0].split("\n") for who, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values())
    acked = {who: [line.split() for line in lines if line] for who, lines in acked.items()}
    assert all(len(v) == 200 for v in acked.values())
    rows = LabelStore(db).history("m")
    assert len(rows) == 400
    images = [r.image_id for r in rows]
    assert len(set(images)) == 400  # nobody got an image the other had
    kept = {(str(r.seq), r.image_id) for r in rows}
    assert all((seq, i) in kept for v in acked.values() for seq, i in v)


def test_every_acknowledged_label_survives_a_sigkill(tmp_path):
    db = tmp_path / "labels.db"
    LabelStore(db)
    proc = _worker(db, "alice", 10_000)
    acked = []
    deadline = time.time() + 60
    while len(acked) < 150 and time.time() < deadline:
        line = proc.stdout.readline()
        if line:
            acked.append(line.split())
    os.killpg(proc.pid, signal.SIGKILL)  # mid-stream: no clean-up, no close
    proc.wait(timeout=30)
    assert len(acked) >= 150
    kept = {(str(r.seq), r.image_id) for r in LabelStore(db).history("m")}
    assert all((seq, i) in kept for seq, i in acked)


def test_the_pool_serves_only_its_own_ids(tmp_path):
    from helpers import png_bytes

    from medcae.labeling.pool import LabelPool, PoolError, image_id

    folder = tmp_path / "pool"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png_bytes(np.full((8, 8), 40 * i, np.uint8)))
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for you")
    pool = LabelPool.from_source(str(folder))
    assert len(pool) == 3 and pool.ids == [image_id(str(folder / f"{i}.png")) for i in range(3)]
    assert pool.image_bytes(pool.ids[1]) == (folder / "1.png").read_bytes()
    for bad in (str(secret), "../secret.png", image_id(str(secret)), "", "%2e%2e/secret.png"):
        with pytest.raises(PoolError, match="no image .* in the pool"):
            pool.image_bytes(bad)


def test_the_queue_ranks_the_pool_around_the_labels_and_leases_disjoint_images(
    tmp_path, demo_bundle
):
    """A real bundle predicts a pool of 12 images; the queue leaves labeled and
    out-of-distribution images out, ranks as ``suggest`` does, and two annotators get
    different images."""
    from helpers import png_bytes

    from medcae.inference.predictor import Predictor
    from medcae.labeling.pool import LabelPool
    from medcae.labeling.queue import next_images, predict_pool, rank
    from medcae.labeling.strategies import Pool, suggest

    folder = tmp_path / "pool"
    folder.mkdir()
    for i, image in enumerate(demo_bundle.test_images[:12]):
        (folder / f"{i:02d}.png").write_bytes(png_bytes(image))
    pool = LabelPool.from_source(str(folder))
    predictor = Predictor.from_bundle(demo_bundle.path)
    preds = predict_pool(predictor, pool, batch_size=5)
    assert len(preds.ids) == 12 and preds.proba.shape == (12, 3)
    names = predictor.label_names
    labeled = {pool.ids[0]: names[0], pool.ids[1]: names[2]}
    order = rank(preds, labeled, names, "margin")
    assert pool.ids[0] not in order and pool.ids[1] not in order
    expected = suggest(
        Pool(
            preds.proba,
            preds.vectors,
            preds.in_distribution,
            np.isin(preds.ids, list(labeled)),
            np.array([1, 0, 1]),
        ),
        12,
        "margin",
        0,
    ).ranking.indices
    assert order == [preds.ids[i] for i in expected]
    store = LabelStore(tmp_path / "labels.db")
    for i, label in labeled.items():
        store.add("demo", i, label, "alice")
    a = next_images(store, "demo", preds, names, 4, "alice", "margin")
    b = next_images(store, "demo", preds, names, 4, "bob", "margin")
    assert a == order[:4] and b == order[4:8]

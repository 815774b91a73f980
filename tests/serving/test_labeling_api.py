"""The labeling loop over real HTTP through Ray Serve: roles, the queue and its leases, the
pool's images (and nothing else), labels that survive a killed replica, compare and promote
against a real registry. Retraining jobs need a Jobs API: tests/distributed/test_labeling_loop.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import png_bytes

pytestmark = [pytest.mark.serve]

KEYS = {"alice": "label", "bob": "label", "root": "admin", "viewer": "predict"}


def _key(name: str) -> str:
    return f"secret-of-{name}-0123"


@pytest.fixture(scope="module")
def lab(ray_session, demo_bundle, demo_npz, tmp_path_factory):
    """``demo@champion`` (version 1) from a real registry, with a pool of 580 demo images the
    bundle never saw, and four keys; yields ``(base_url, registry, pool folder, state dir)``."""
    from helpers import start_serve
    from ray import serve

    from medcae.data import load_dataset
    from medcae.registry.models import Registry
    from medcae.serving.app import build_app
    from medcae.serving.auth import key_line

    tmp = tmp_path_factory.mktemp("lab")
    registry = Registry(f"sqlite:///{tmp / 'registry.db'}")
    v = registry.register("demo", demo_bundle.path)
    registry.promote("demo", v.version, "champion")
    ds = load_dataset(str(demo_npz))
    pool = tmp / "pool"
    pool.mkdir()
    images = np.concatenate([ds.splits["train"].images[240:], ds.splits["test"].images[80:]])
    for i, image in enumerate(images):
        (pool / f"{i:04d}.png").write_bytes(png_bytes(image))
    (tmp / "secret.png").write_bytes(png_bytes(images[0]))  # beside the pool, never served
    app = build_app(
        {
            "models": ["demo@champion"],
            "registry_uri": registry.uri,
            "follow_s": 1.0,
            "pools": [f"demo={pool}"],
            "state_dir": str(tmp / "state"),
            "api_key_sha256": [key_line(_key(n), n, r) for n, r in KEYS.items()],
        }
    )
    port = start_serve(app)
    yield f"http://127.0.0.1:{port}", registry, pool, tmp / "state"
    serve.shutdown()


def _client(base: str, name: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {_key(name)}"} if name else {}
    return httpx.Client(base_url=base, headers=headers, timeout=60)


def test_roles_decide_who_may_label_train_and_promote(lab):
    base = lab[0]
    with _client(base, "viewer") as viewer, _client(base, "alice") as alice:
        assert viewer.get("/v1/whoami").json() == {
            "name": "viewer",
            "role": "predict",
            "labeling": ["demo"],
        }
        r = viewer.get("/v1/models/demo/queue")
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
        assert "viewer has the role predict; this needs label" in r.json()["detail"]
        assert alice.get("/v1/models/demo/queue?k=1").status_code == 200
        for method, path in (
            ("POST", "/v1/models/demo/train"),
            ("GET", "/v1/models/demo/compare"),
            ("POST", "/v1/models/demo/promote"),
            ("GET", "/v1/jobs/anything"),
        ):
            r = alice.request(method, path, json={"version": "1"})
            assert r.status_code == 403 and "needs admin" in r.json()["detail"], (path, r.text)
    with _client(base, None) as anonymous:
        assert anonymous.get("/v1/models/demo/queue").status_code == 401


def test_queue_images_labels_and_export(lab):
    base, _, pool, _ = lab
    with _client(base, "alice") as alice:
        r = alice.get("/v1/models/demo/queue?k=3&strategy=margin")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["version"] == "1" and len(body["images"]) == 3
        first = body["images"][0]
        assert set(first["proba"]) == {"normal", "nodule", "ring"}
        png = alice.get(f"/v1/models/demo/pool/{first['image_id']}")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG")
        from PIL import Image

        assert Image.open(io.BytesIO(png.content)).size == (64, 64)  # as the model sees it
        # only ids of the pool: never a path, whatever it looks like
        for bad in ("../secret.png", "..%2Fsecret.png", "%2e%2e%2fsecret.png", "0" * 16):
            r = alice.get(f"/v1/models/demo/pool/{bad}")
            assert r.status_code == 404, (bad, r.status_code)
        assert alice.get("/v1/models/nope/queue").status_code == 404
        # labels: unknown classes and bodies refused with what was expected
        r = alice.post(
            "/v1/models/demo/labels", json={"image_id": first["image_id"], "label": "cat"}
        )
        assert r.status_code == 422 and "'cat'" in r.json()["detail"]
        for bad in (b"{", b"[1]", b'{"image_id": 3, "label": "ring"}'):
            r = alice.post("/v1/models/demo/labels", content=bad)
            assert r.status_code in (400, 422), (bad, r.text)
        r = alice.post("/v1/models/demo/labels", json={"image_id": "f" * 16, "label": "ring"})
        assert r.status_code == 404
        r = alice.post(
            "/v1/models/demo/labels", json={"image_id": first["image_id"], "label": "ring"}
        )
        assert r.status_code == 201 and r.json()["annotator"] == "alice"
        second = body["images"][1]["image_id"]
        assert alice.post("/v1/models/demo/skip", json={"image_id": second}).status_code == 200
        progress = alice.get("/v1/models/demo/progress").json()
        assert progress["per_class"]["ring"] >= 1 and progress["pool"] == 580
        rows = list(csv.DictReader(io.StringIO(alice.get("/v1/models/demo/labels").text)))
        mine = [r for r in rows if r["image_id"] == first["image_id"]]
        assert mine and mine[0]["label"] == "ring" and mine[0]["annotator"] == "alice"
        assert mine[0]["path"].startswith(str(pool)) and mine[0]["version"] == "1"
        # undo: the image is unlabeled again
        r = alice.post("/v1/models/demo/labels", json={"image_id": first["image_id"], "label": ""})
        assert r.status_code == 201
        rows = list(csv.DictReader(io.StringIO(alice.get("/v1/models/demo/labels").text)))
        assert first["image_id"] not in {r["image_id"] for r in rows}


def _annotate(base: str, name: str, n: int, acked: list, failures: list, stop: float) -> None:
    """Label ``n`` images from the queue (the truth: the demo's own labels are unknown here,
    so the model's prediction is taken), keeping every acknowledged label; errors while the
    replica is down are retried."""
    with _client(base, name) as c:
        done = 0
        while done < n and time.monotonic() < stop:
            try:
                r = c.get("/v1/models/demo/queue?k=10&strategy=random", timeout=30)
                if r.status_code != 200:
                    failures.append(r.status_code)
                    time.sleep(0.5)
                    continue
                for image in r.json()["images"]:
                    if done >= n:
                        break
                    body = {"image_id": image["image_id"], "label": image["predicted"]}
                    p = c.post("/v1/models/demo/labels", json=body, timeout=30)
                    if p.status_code == 201:
                        acked.append((name, image["image_id"], image["predicted"]))
                        done += 1
                    else:
                        failures.append(p.status_code)
            except httpx.HTTPError as err:
                failures.append(type(err).__name__)
                time.sleep(0.5)


def test_two_annotators_200_labels_each_through_a_killed_replica(lab):
    """Two clients label 200 images each at once; the replica is SIGKILLed midway. Every
    label acknowledged with 201 is kept, none twice, and no image went to both."""
    base, _, _, state = lab
    from medcae.labeling.store import LabelStore

    with _client(base, "root") as root:
        before = len(LabelStore(state / "labels.db").history("demo"))
        pid = root.get("/v1/models/demo").json()["pid"]
    acked: dict[str, list] = {"alice": [], "bob": []}
    failures: list = []
    stop = time.monotonic() + 240
    threads = [
        threading.Thread(target=_annotate, args=(base, n, 200, acked[n], failures, stop))
        for n in acked
    ]
    for t in threads:
        t.start()
    while len(acked["alice"]) + len(acked["bob"]) < 150 and time.monotonic() < stop:
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join()
    assert len(acked["alice"]) == 200 and len(acked["bob"]) == 200, failures
    store = LabelStore(state / "labels.db")
    rows = store.history("demo")[before:]
    kept = {(r.annotator, r.image_id, r.label) for r in rows}
    every = acked["alice"] + acked["bob"]
    assert set(every) <= kept  # every acknowledged label is on disk
    assert len(rows) <= len(every) + len(failures)  # at most the unanswered ones besides
    by_image: dict[str, set] = {}
    for r in rows:
        by_image.setdefault(r.image_id, set()).add(r.annotator)
    assert all(len(who) == 1 for who in by_image.values())  # no image went to both
    assert len({i for _, i, _ in every}) == 400  # none labeled twice
    with _client(base, "root") as root:
        assert root.get("/v1/models/demo").json()["pid"] != pid  # the labels outlived it


def test_promote_swaps_the_champion_and_compare_reads_the_challenger(lab, demo_bundle):
    base, registry, _, _ = lab
    from medcae.labeling.retrain import compare

    with _client(base, "root") as root:
        r = root.get("/v1/models/demo/compare")
        assert r.status_code == 404 and r.json()["error"] == "no_challenger"
        rng = np.random.default_rng(0)
        y = rng.integers(0, 3, 60)
        result = compare(
            y, rng.dirichlet([1, 1, 1], 60), rng.dirichlet([1, 1, 1], 60), ["a", "b", "c"]
        )
        tags = {"medcae.compare": json.dumps(result), "medcae.parent": "1", "medcae.job": "j"}
        v2 = registry.register("demo", demo_bundle.path, tags=tags)
        registry.promote("demo", v2.version, "challenger")
        got = root.get("/v1/models/demo/compare").json()
        assert got["champion"] == "1" and got["challenger"] == v2.version and got["current"]
        assert got["comparison"]["n"] == 60 and not got["promoted"]
        r = root.post("/v1/models/demo/promote", json={"version": "99"})
        assert r.status_code == 404 and "no version '99'" in r.json()["detail"]
        r = root.post("/v1/models/demo/promote", json={"version": v2.version})
        assert r.status_code == 200, r.text
        assert r.json()["serving"] == v2.version and r.json()["promoted_by"] == "root"
        assert root.get("/v1/models/demo").json()["version"] == v2.version
        assert root.get("/v1/models/demo/compare").json()["promoted"]
        # training needs the cluster's Jobs API: this server has none, and says so
        r = root.post("/v1/models/demo/train")
        assert r.status_code == 503 and r.json()["error"] == "training_off"

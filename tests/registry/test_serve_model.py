"""`medcae serve --model NAME@ALIAS`: a registered version served as a user starts it."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, medcae_subprocess, png_bytes, serve_reaped

from medcae.registry.models import ModelRef, Registry

pytestmark = pytest.mark.serve


def test_serve_model_at_an_alias_answers_as_that_version(tmp_path, demo_bundle):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    registry = Registry(uri)
    registry.register("chest", demo_bundle.path)
    registry.register("chest", demo_bundle.path)
    registry.promote("chest", "1")  # the older one is in production
    image = png_bytes(demo_bundle.test_images[0])

    def during(base: str) -> dict:
        with httpx.Client(base_url=base, timeout=60) as client:
            info = client.get("/v1/model").json()
            answer = client.post("/v1/predict", content=image).json()
            return {"info": info, "answer": answer}

    env = {**os.environ, "MEDCAE_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "medcae", "serve", "--model", "chest@champion", "--mlflow", uri]
    got = serve_reaped(cmd, tmp_path, ROOT, env, during)
    assert (got["info"]["id"], got["info"]["version"]) == ("chest", "1")
    assert (got["answer"]["model"], got["answer"]["version"]) == ("chest", "1")
    assert got["answer"]["prediction"]["label"] in got["info"]["label_names"]


def test_serve_an_unknown_model_fails_before_ray_naming_what_exists(tmp_path, demo_bundle):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    Registry(uri).register("chest", demo_bundle.path)
    out = medcae_subprocess("serve", "--model", "lung@champion", "--mlflow", uri)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no model 'lung'") and "holds chest" in last, last


def test_a_promotion_swaps_the_version_under_load_and_a_broken_one_is_refused(
    tmp_path, demo_bundle
):
    """Six clients post without pause; version 2 is promoted, then a version 3 whose bundle
    was corrupted in the artifact store. Nothing fails, every response names a version, every
    request sent after the first answer from version 2 came back is answered by version 2, and
    version 3 is refused while version 2 keeps serving."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    registry = Registry(uri)
    for _ in range(3):
        registry.register("chest", demo_bundle.path)
    registry.promote("chest", "1")
    broken = Path(registry.show(ModelRef("chest", version="3")).source.removeprefix("file://"))
    (broken / "classifier.npz").write_bytes(b"corrupted in the store")
    image = png_bytes(demo_bundle.test_images[0])

    def during(base: str) -> dict:
        log: list[tuple[float, float, object, str | None]] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=base, timeout=60) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        r = c.post("/v1/predict", content=image)
                        code, version = r.status_code, r.json().get("version")
                    except (httpx.HTTPError, ValueError) as err:
                        code, version = repr(err), None
                    log.append((t0, time.monotonic(), code, version))

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        try:
            time.sleep(3)
            promoted = time.monotonic()
            Registry(uri).promote("chest", "2")
            deadline = promoted + 60
            while time.monotonic() < deadline and not any(v == "2" for *_, v in log):
                time.sleep(0.2)
            time.sleep(2)
            Registry(uri).promote("chest", "3")  # its bundle no longer verifies
            refused_from = time.monotonic()
            time.sleep(5)  # several polls at --follow-s 1
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        return {"log": log, "promoted": promoted, "refused_from": refused_from}

    env = {**os.environ, "MEDCAE_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "medcae", "serve", "--model", "chest@champion"]
    cmd += ["--mlflow", uri, "--follow-s", "1"]
    got = serve_reaped(cmd, tmp_path, ROOT, env, during)
    log = got["log"]
    assert len(log) > 50 and {code for _, _, code, _ in log} == {200}, log[:5]
    assert {v for *_, v in log} == {"1", "2"}
    swapped = min(end for _, end, _, v in log if v == "2")
    late = [v for start, _, _, v in log if start > swapped]
    assert late and set(late) == {"2"}  # nothing sent after the swap got the old version
    after_broken = [v for start, _, _, v in log if start > got["refused_from"] + 3]
    assert after_broken and set(after_broken) == {"2"}  # version 3 refused, 2 kept serving
    waits = sorted(end - start for start, end, _, _ in log)
    print(
        f"\n{len(log)} requests, 0 failed; promotion to first answer from version 2: "
        f"{swapped - got['promoted']:.1f}s; latency p50 {waits[len(waits) // 2] * 1000:.0f} ms, "
        f"max {waits[-1] * 1000:.0f} ms"
    )

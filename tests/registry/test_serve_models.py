"""`medcae serve` with several models, as a user starts it: a registered one at an alias and a
bundle folder behind one endpoint, its answer log, its metrics scraped by a real Prometheus,
and a promotion swapped in under load. One server for the module (its own local Ray)."""

from __future__ import annotations

import base64
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, chromium, free_port, medcae_subprocess, png_bytes, serve_reaped
from helpers.prometheus import prometheus, query

from medcae.registry.models import ModelRef, Registry

pytestmark = pytest.mark.serve
LABELS = ("normal", "nodule", "ring")  # the demo data's


def _b64(image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


class Server:
    def __init__(self, base: str, uri: str, logs: Path, metrics_port: int):
        self.base, self.uri, self.logs, self.metrics_port = base, uri, logs, metrics_port

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_bundle, findings_bundle):
    """``--model chest@champion --model breast=FOLDER --model findings=FOLDER``: chest has
    versions 1 to 3 (1 the champion; 3's bundle corrupted in the artifact store after
    registration); findings is multi-label."""
    tmp = tmp_path_factory.mktemp("serve-models")
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    registry = Registry(uri)
    for _ in range(3):
        registry.register("chest", demo_bundle.path)
    registry.promote("chest", "1")
    broken = Path(registry.show(ModelRef("chest", version="3")).source.removeprefix("file://"))
    (broken / "classifier.npz").write_bytes(b"corrupted in the store")
    logs, metrics_port = tmp / "logs", free_port()
    cmd = [sys.executable, "-m", "medcae", "serve", "--model", "chest@champion"]
    cmd += ["--model", f"breast={demo_bundle.path}", "--mlflow", uri, "--follow-s", "1"]
    cmd += ["--model", f"findings={findings_bundle.path}"]
    cmd += ["--log-dir", str(logs), "--metrics-port", str(metrics_port)]
    env = {**os.environ, "MEDCAE_CACHE_DIR": str(tmp / "cache")}
    started: queue.Queue = queue.Queue()
    done = threading.Event()
    outcome: list = []

    def during(base: str) -> None:
        started.put(base)
        done.wait(1200)

    def run() -> None:
        try:
            outcome.append(serve_reaped(cmd, tmp, ROOT, env, during))
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            outcome.append(err)
            started.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    base = started.get(timeout=600)
    if base is None:
        raise outcome[0]
    yield Server(base, uri, logs, metrics_port)
    done.set()
    thread.join(120)
    assert outcome and not isinstance(outcome[0], BaseException), outcome  # stopped clean


def test_models_are_listed_and_each_answers_as_itself(server, demo_bundle):
    image = png_bytes(demo_bundle.test_images[0])
    with server.client() as c:
        listed = c.get("/v1/models").json()
        assert listed["default"] == "chest"
        chest, breast, findings = listed["models"]
        assert findings["name"] == "findings"
        assert (chest["name"], chest["default"], chest["registered"]) == ("chest", True, True)
        assert {v["version"]: v["aliases"] for v in chest["versions"]} == {
            "3": [],
            "2": [],
            "1": ["champion"],
        }
        assert (breast["name"], breast["registered"], len(breast["versions"])) == (
            "breast",
            False,
            1,
        )
        default = c.post("/v1/predict", content=image)
        assert (default.json()["model"], default.json()["version"]) == ("chest", "1")
        rid = default.json()["request_id"]
        assert default.headers["x-request-id"] == rid
        named = c.post("/v1/models/breast/predict", content=image).json()
        assert (named["model"], named["version"]) == ("breast", breast["versions"][0]["version"])
        assert named["prediction"] == default.json()["prediction"]  # the same bundle twice
        v2 = c.post("/v1/models/chest/predict?version=2", content=image).json()
        assert (v2["model"], v2["version"]) == ("chest", "2")
        mine = c.post(
            "/v1/models/chest/predict/batch",
            json={"images": [_b64(demo_bundle.test_images[i]) for i in range(3)]},
            headers={"X-Request-ID": "ward-7.case-42"},
        )
        assert mine.json()["request_id"] == "ward-7.case-42"
        assert len(mine.json()["predictions"]) == 3
        explained = c.post("/v1/models/breast/explain", content=image).json()
        assert explained["model"] == "breast" and explained["explanation"]["heatmap_png"]
        assert "# " in c.get("/v1/models/breast/card").text
        assert c.get("/v1/models/chest").json()["version"] == "1"

        # What does not exist is a 404 that names what does.
        r = c.post("/v1/models/lung/predict", content=image)
        assert r.status_code == 404 and "serves chest, breast, findings" in r.json()["detail"]
        r = c.post("/v1/models/chest/predict?alias=challenger", content=image)
        assert r.status_code == 404 and "its aliases: champion" in r.json()["detail"], r.text
        r = c.post("/v1/models/chest/predict?version=9", content=image)
        assert r.status_code == 404 and "its versions: 3, 2, 1" in r.json()["detail"], r.text
        r = c.post("/v1/models/breast/predict?version=2", content=image)
        assert r.status_code == 404 and "one version" in r.json()["detail"]
        r = c.post("/v1/models/chest/predict?version=3", content=image)  # corrupted: refused
        assert (r.status_code, r.json()["error"]) == (503, "model_unavailable"), r.text
        assert c.post("/v1/predict", content=image).json()["version"] == "1"  # still serving

        # The window of answers, next to the validation split's label mix.
        for _ in range(30):
            c.post("/v1/models/breast/predict", content=image)
        stats = c.get("/v1/models/breast/stats").json()
        assert stats["model"] == "breast" and stats["answers"] >= 30 and stats["enough_answers"]
        assert set(stats["labels"]) == set(LABELS)
        assert stats["labels"][named["prediction"]["label"]]["flagged"]  # one image, 30 times

    lines = [json.loads(x) for f in server.logs.glob("answers-*.jsonl") for x in f.open()]
    by_id = {}
    for line in lines:
        by_id.setdefault(line["request_id"], []).append(line)
    assert [(x["model"], x["version"], x["route"]) for x in by_id[rid]] == [
        ("chest", "1", "predict")
    ]
    assert [x["index"] for x in by_id["ward-7.case-42"]] == [0, 1, 2]
    assert all(x["key"] == "anonymous" and "image" not in x for x in lines)


def test_medcae_predict_asks_a_named_model(server, demo_bundle, tmp_path):
    img = tmp_path / "scan.png"
    img.write_bytes(png_bytes(demo_bundle.test_images[0]))
    cmd = [sys.executable, "-m", "medcae", "predict", "--url", server.base, str(img)]
    out = subprocess.run([*cmd, "--model", "breast"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "(breast version " in out.stdout, out.stdout + out.stderr
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # the default
    assert out.returncode == 0 and "(chest version 1)" in out.stdout, out.stdout + out.stderr
    out = subprocess.run([*cmd, "--model", "lung"], capture_output=True, text=True, timeout=60)
    assert (
        out.returncode == 1
        and "HTTP 404" in out.stderr
        and "serves chest, breast, findings" in out.stderr
    )


def test_prometheus_scrapes_requests_predictions_and_latency_by_model(
    server, demo_bundle, tmp_path
):
    image = png_bytes(demo_bundle.test_images[1])
    with server.client() as c:
        for _ in range(5):
            assert c.post("/v1/models/breast/predict", content=image).status_code == 200
        assert c.post("/v1/models/breast/predict", content=b"GIF89a").status_code == 415
    with prometheus(tmp_path / "prometheus", [f"127.0.0.1:{server.metrics_port}"]) as prom:
        queries = {
            "ok": 'sum(ray_medcae_requests_total{model="breast",route="predict",status="200"})',
            "refused": 'sum(ray_medcae_requests_total{model="breast",status="415"})',
            "labels": 'sum by (label) (ray_medcae_predictions_total{model="breast"})',
            "latency": 'sum(ray_medcae_request_latency_ms_count{model="breast"})',
        }
        deadline, got = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            got = {name: query(prom, q) for name, q in queries.items()}
            if got["ok"] and float(got["ok"][0]["value"][1]) >= 5 and got["refused"]:
                break
            time.sleep(1)
        assert got["ok"] and float(got["ok"][0]["value"][1]) >= 5, got
        assert float(got["refused"][0]["value"][1]) >= 1, got
        assert {r["metric"]["label"] for r in got["labels"]} <= set(LABELS)
        assert got["labels"] and float(got["latency"][0]["value"][1]) >= 6, got


def test_a_multilabel_model_answers_each_finding_at_its_own_threshold(server, findings_bundle):
    from medcae.inference.predictor import Predictor

    local = Predictor.from_bundle(findings_bundle.path)
    images = findings_bundle.test_images[:6]
    with server.client() as c:
        info = c.get("/v1/models/findings").json()
        assert info["task"] == "multilabel" and list(info["operating_point"]["findings"]) == [
            "nodule",
            "ring",
            "effusion",
        ]
        r = c.post(
            "/v1/models/findings/predict/batch", json={"images": [_b64(im) for im in images]}
        )
        assert r.status_code == 200, r.text
        for got, want in zip(r.json()["predictions"], local.predict(images)):
            assert got["label"] == want.label and got["findings"] == want.findings
            assert got["thresholds"] == pytest.approx(want.thresholds)
            assert got["probabilities"] == pytest.approx(want.probabilities, abs=1e-5)
        exp = c.post("/v1/models/findings/explain?label=effusion", content=png_bytes(images[0]))
        assert exp.status_code == 200 and exp.json()["explanation"]["label"] == "effusion"
        stats = c.get("/v1/models/findings/stats").json()
        assert set(stats["labels"]) == {"nodule", "ring", "effusion"} and stats["answers"] >= 6


def test_the_page_picks_a_model_and_shows_its_recent_answers(
    server, demo_bundle, findings_bundle, tmp_path
):
    """Chromium: the picker lists both models, the default first; picking the folder model
    and uploading an image gets that model's answer and its recent-answers table; a screenshot
    is kept in .test-output/page-models.png."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    path = tmp_path / "scan.png"
    path.write_bytes(png_bytes(demo_bundle.test_images[2]))
    findings_image = tmp_path / "chest.png"
    findings_image.write_bytes(png_bytes(findings_bundle.test_images[1]))
    out = Path(os.environ.get("MEDCAE_TEST_OUTPUT", ROOT / ".test-output"))
    out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server.base + "/")
        ident = browser.find_element(By.ID, "model-id")
        wait.until(lambda _: ident.text.startswith("chest version"))
        pick = Select(browser.find_element(By.ID, "model-pick"))
        assert [o.text for o in pick.options] == ["chest (default)", "breast", "findings"]
        pick.select_by_value("breast")
        wait.until(lambda _: ident.text.startswith("breast version"))
        browser.find_element(By.ID, "file").send_keys(str(path))
        status = browser.find_element(By.ID, "status")
        wait.until(lambda _: "answered by breast" in status.text)
        stats = browser.find_element(By.ID, "stats")
        wait.until(lambda _: "answers of version" in stats.text)
        assert "validation" in stats.text and "out of distribution" in stats.text
        browser.save_screenshot(str(out / "page-models.png"))

        # A multi-label model: a bar per finding, each with its threshold's mark.
        pick.select_by_value("findings")
        wait.until(lambda _: ident.text.startswith("findings version"))
        browser.find_element(By.ID, "file").send_keys(str(findings_image))
        wait.until(lambda _: "answered by findings" in status.text)
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        assert (
            len(bars) == 3 and len(browser.find_elements(By.CSS_SELECTOR, "#bars .threshold")) == 3
        )
        decision = browser.find_element(By.ID, "decision").text
        assert "its own threshold" in decision
        browser.save_screenshot(str(out / "page-findings.png"))
    finally:
        browser.quit()


def test_a_promotion_swaps_the_version_under_load_and_a_broken_one_is_refused(server, demo_bundle):
    """Six clients post without pause; version 2 is promoted, then version 3, whose bundle
    was corrupted in the artifact store. Nothing fails, every response names a version, every
    request sent after the first answer from version 2 came back is answered by version 2, and
    version 3 is refused while version 2 keeps serving."""
    image = png_bytes(demo_bundle.test_images[0])
    log: list[tuple[float, float, object, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with server.client() as c:
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
        Registry(server.uri).promote("chest", "2")
        deadline = promoted + 60
        while time.monotonic() < deadline and not any(v == "2" for *_, v in log):
            time.sleep(0.2)
        time.sleep(2)
        Registry(server.uri).promote("chest", "3")  # its bundle no longer verifies
        refused_from = time.monotonic()
        time.sleep(5)  # several polls at --follow-s 1
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert len(log) > 50 and {code for _, _, code, _ in log} == {200}, log[:5]
    assert {v for *_, v in log} == {"1", "2"}
    swapped = min(end for _, end, _, v in log if v == "2")
    late = [v for start, _, _, v in log if start > swapped]
    assert late and set(late) == {"2"}  # nothing sent after the swap got the old version
    after_broken = [v for start, _, _, v in log if start > refused_from + 3]
    assert after_broken and set(after_broken) == {"2"}  # version 3 refused, 2 kept serving
    waits = sorted(end - start for start, end, _, _ in log)
    print(
        f"\n{len(log)} requests, 0 failed; promotion to first answer from version 2: "
        f"{swapped - promoted:.1f}s; latency p50 {waits[len(waits) // 2] * 1000:.0f} ms, "
        f"max {waits[-1] * 1000:.0f} ms"
    )


def test_serve_an_unknown_model_fails_before_ray_naming_what_exists(tmp_path, demo_bundle):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    Registry(uri).register("chest", demo_bundle.path)
    out = medcae_subprocess("serve", "--model", "lung@champion", "--mlflow", uri)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no model 'lung'") and "holds chest" in last, last
    out = medcae_subprocess("serve", "--model", "chest", "--model", f"chest={demo_bundle.path}")
    assert out.returncode == 2 and "two models are named 'chest'" in out.stderr, out.stderr

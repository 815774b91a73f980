"""The Ray Serve app on loopback: same answers as offline, 4xx on bad input, batching, recovery."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import (
    API_KEY,
    LIMITS,
    ORIGIN,
    ROOT,
    bomb_png,
    chromium,
    deflated_bomb,
    dicom,
    encapsulated_dicom,
    encode,
    native_dicom,
    png_bytes,
    serve_reaped,
    with_jpeg_size,
)
from PIL import Image

from medcae.inference.predictor import Predictor

pytestmark = [pytest.mark.serve, pytest.mark.ray, pytest.mark.slow]


def dicom_without_pixels() -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName = "Test^NoPixels"
    ds.Modality = "CR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_health_model_and_docs(server, demo_bundle):
    assert server.get("/healthz").json()["status"] == "ok"
    info = server.get("/v1/model").json()
    assert info["backbone"]["name"] == "efficientnet_lite0" and info["backbone"]["taps"] == [
        "stage4"
    ]
    assert info["label_names"] == ["normal", "nodule", "ring"] and info["created"]
    assert info["versions"]["torch"] and info["cae"]["latent_channels"] == 8
    assert server.get("/docs").status_code == 404  # off unless MEDCAE_SERVE_DOCS=1
    assert "/v1/predict/batch" in server.get("/openapi.json").json()["paths"]


def test_api_keys_no_key_401_wrong_key_403_right_key_200(server, demo_bundle):
    import httpx

    url = str(server.base_url).rstrip("/")
    blob = png_bytes(demo_bundle.test_images[0])
    with httpx.Client(base_url=url, timeout=60) as anon:
        assert anon.get("/healthz").status_code == 200  # liveness stays open
        for method, path, body in (
            ("POST", "/v1/predict", blob),
            ("POST", "/v1/predict/batch", b'{"images": []}'),
            ("GET", "/v1/model", None),
        ):
            r = anon.request(method, path, content=body)
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"] == "missing_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
            r = anon.request(method, path, content=body, headers={"Authorization": "Bearer nope"})
            assert (r.status_code, r.json()["error"]) == (403, "bad_api_key"), path
        # the key is checked before the body is parsed: an oversized body still gets the 401
        r = anon.post("/v1/predict", content=b"\0" * (LIMITS["max_image_bytes"] + 1))
        assert r.status_code == 401
    ok = server.post("/v1/predict", content=blob)
    assert ok.status_code == 200 and ok.json()["prediction"]["label"]


def test_host_header_and_cors_through_the_serve_proxy(server):
    r = server.get("/v1/model", headers={"Host": "rebound.attacker.example"})
    assert (r.status_code, r.json()["error"]) == (400, "bad_host")
    assert server.get("/healthz", headers={"Host": "10.0.0.7:8000"}).status_code == 200
    assert server.get("/v1/model", headers={"Host": "localhost"}).status_code == 200
    r = server.get("/v1/model", headers={"Origin": ORIGIN})
    assert r.headers["access-control-allow-origin"] == ORIGIN
    r = server.get("/v1/model", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in r.headers


def test_api_key_never_reaches_the_logs(server, demo_bundle, ray_session):
    """After right and wrong keys were sent, no log file of the Ray session holds either."""
    from pathlib import Path

    import httpx

    blob = png_bytes(demo_bundle.test_images[0])
    assert server.post("/v1/predict", content=blob).status_code == 200
    url = str(server.base_url).rstrip("/")
    wrong = "wrong-key-secret-4567"
    with httpx.Client(base_url=url, timeout=60) as other:
        assert (
            other.get("/v1/model", headers={"Authorization": f"Bearer {wrong}"}).status_code == 403
        )
    logs = Path(ray_session._private.worker._global_node.get_logs_dir_path())

    def files_and_the_403_line() -> tuple[list[Path], bool]:
        files = [f for f in logs.rglob("*") if f.is_file()]
        return files, any(b"/v1/model 403" in f.read_bytes() for f in files)

    deadline = time.monotonic() + 60  # wait for the access log line of the 403, not a guess
    files, logged = files_and_the_403_line()
    while not logged and time.monotonic() < deadline:
        time.sleep(0.5)
        files, logged = files_and_the_403_line()
    assert logged, "the 403 request never reached the logs: nothing was checked"
    for f in files:
        text = f.read_bytes()
        assert API_KEY.encode() not in text and wrong.encode() not in text, f


def real_images(demo_bundle, n: int = 24) -> np.ndarray:
    """PneumoniaMNIST test X-rays when the shared data is there, else demo images."""
    from pathlib import Path

    d = os.environ.get("MEDCAE_DATA_DIR")
    if d and (Path(d) / "pneumoniamnist.npz").is_file():
        with np.load(Path(d) / "pneumoniamnist.npz") as z:
            return z["test_images"][:n]
    return demo_bundle.test_images[:n]


def test_endpoint_equals_predictor_offline(server, demo_bundle):
    pred = Predictor.from_bundle(demo_bundle.path)
    images = real_images(demo_bundle)
    offline = pred.predict_proba(images)
    names = pred.label_names
    for arr, ref in zip(images, offline):
        out = server.post("/v1/predict", content=png_bytes(arr)).json()["prediction"]
        np.testing.assert_allclose([out["probabilities"][n] for n in names], ref, atol=1e-5)


def test_batch_endpoint_multipart_and_json(server, demo_bundle):
    blobs = [png_bytes(a) for a in demo_bundle.test_images[:3]]
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    multi = server.post("/v1/predict/batch", files=files).json()["predictions"]
    js = server.post(
        "/v1/predict/batch", json={"images": [base64.b64encode(b).decode() for b in blobs]}
    ).json()
    assert len(multi) == 3 and [p["label"] for p in multi] == [
        p["label"] for p in js["predictions"]
    ]
    single = server.post("/v1/predict", files={"file": ("x.png", blobs[0], "image/png")}).json()
    assert single["prediction"]["probabilities"] == pytest.approx(
        multi[0]["probabilities"], abs=1e-5
    )


BAD = [
    ("empty body", "/v1/predict", {"content": b""}, 400, "empty_body"),
    ("not an image", "/v1/predict", {"content": os.urandom(2000)}, 415, "unsupported_media_type"),
    ("truncated png", "/v1/predict", {"content": "TRUNC"}, 400, "corrupt_image"),
    ("gif", "/v1/predict", {"content": b"GIF89a" + b"\0" * 100}, 415, "unsupported_media_type"),
    ("pdf", "/v1/predict", {"content": b"%PDF-1.7\n" + b"x" * 100}, 415, "unsupported_media_type"),
    ("over size limit", "/v1/predict", {"content": "BIG"}, 413, "too_large"),
    ("decompression bomb", "/v1/predict", {"content": "BOMB"}, 413, "too_many_pixels"),
    ("dicom without pixels", "/v1/predict", {"content": "NOPIX"}, 422, "no_pixel_data"),
    ("batch over limit", "/v1/predict/batch", {"json": "FIVE"}, 413, "batch_too_large"),
    ("bad json", "/v1/predict/batch", {"content": b"{not json"}, 422, "bad_json"),
    ("json wrong shape", "/v1/predict/batch", {"json": {"imgs": 1}}, 422, "bad_json"),
    ("bad base64", "/v1/predict/batch", {"json": {"images": ["%%%"]}}, 422, "bad_base64"),
    (
        "nested json",
        "/v1/predict/batch",
        {"content": b"[" * 50_000 + b"]" * 50_000},
        422,
        "bad_json",
    ),
    ("chunked body over the cap", "/v1/predict", {"content": "STREAM"}, 413, "too_large"),
    ("multipart file over the cap", "/v1/predict/batch", {"files": "BIGFILE"}, 413, "too_large"),
    ("malformed dicom header", "/v1/predict", {"content": "BADDCM"}, 400, "corrupt_image"),
    ("malformed dicom in a batch", "/v1/predict/batch", {"json": "BADDCMS"}, 400, "corrupt_image"),
    ("nan pixels", "/v1/predict", {"content": "NANDCM"}, 422, "non_finite_pixels"),
    ("jpeg declaring 9000x9000", "/v1/predict", {"content": "JPEGBOMB"}, 413, "too_many_pixels"),
    (
        "dicom: 10x10 header, 9000x9000 jpeg",
        "/v1/predict",
        {"content": "SMUGGLE"},
        400,
        "corrupt_image",
    ),
    (
        "dicom: pixel data longer than header",
        "/v1/predict",
        {"content": "LONGPX"},
        400,
        "corrupt_image",
    ),
    ("deflated dicom bomb", "/v1/predict", {"content": "DEFLATE"}, 413, "too_many_pixels"),
    (
        "batch over its decoded budget",
        "/v1/predict/batch",
        {"json": "HEAVY"},
        413,
        "request_too_large",
    ),
]


def test_bad_requests_get_4xx_and_server_stays_up(server, demo_bundle):
    good = png_bytes(demo_bundle.test_images[0])
    rng = np.random.default_rng(0)
    from pydicom.uid import JPEGBaseline8Bit

    small_jpeg = encode(np.full((8, 8), 128, np.uint8), "JPEG")
    px = np.zeros((4, 4), np.uint8)
    heavy = png_bytes(np.zeros((1500, 1500, 3), np.uint8))  # 6.75 MB decoded, 20 KB sent

    def chunks():  # no Content-Length: only the streamed cap can stop it
        for _ in range(40):
            yield b"\0" * 16_384

    bad_dcm = dicom(RescaleSlope=("LO", "steep"), RescaleIntercept=("DS", "0"))
    nan_px = np.zeros(64, np.float32)
    nan_px[3] = np.nan
    special = {
        "STREAM": chunks(),
        "BIGFILE": [("files", ("big.png", b"\0" * (LIMITS["max_image_bytes"] + 1), "image/png"))],
        "BADDCM": bad_dcm,
        "BADDCMS": {"images": [base64.b64encode(x).decode() for x in (good, bad_dcm)]},
        "NANDCM": dicom(nan_px),
        "TRUNC": good[: len(good) // 2],
        "BOMB": bomb_png(),
        "NOPIX": dicom_without_pixels(),
        "BIG": png_bytes(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)),
        "FIVE": {"images": [base64.b64encode(good).decode()] * 5},
        "JPEGBOMB": with_jpeg_size(small_jpeg, 9000, 9000),
        "SMUGGLE": encapsulated_dicom(
            [with_jpeg_size(small_jpeg, 9000, 9000)], 10, 10, JPEGBaseline8Bit
        ),
        "LONGPX": native_dicom(px, pixel_data=px.tobytes() + bytes(100)),
        "DEFLATE": deflated_bomb(3000, 3000),  # 18 MB inflated, over max_decoded_bytes
        "HEAVY": {"images": [base64.b64encode(heavy).decode()] * 4},  # 27 MB together
    }
    pid = server.get("/v1/model").json()["pid"]
    for name, path, kwargs, status, code in BAD:
        kwargs = {k: special.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
        r = server.post(path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.json()["error"] == code and r.json()["detail"], name
    assert server.post("/v1/predict", content=good).status_code == 200
    assert server.get("/v1/model").json()["pid"] == pid  # no replica restarted


def test_stalled_uploads_time_out_and_do_not_starve_good_requests(server, demo_bundle):
    """70 clients announce a body and stall (more than the replica's 64 request slots): a good
    request is still answered, and each stalled upload gets 408 at the body timeout."""
    host, port = server.base_url.host, server.base_url.port
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: 50000\r\n\r\n"
    ).encode()
    stalled = []
    try:
        first = time.perf_counter()
        for _ in range(70):
            sock = socket.create_connection((host, port), timeout=30)
            sock.sendall(head + b"\x89PNG\r\n\x1a\n")
            stalled.append(sock)
        t = time.perf_counter()
        r = server.post("/v1/predict", content=png_bytes(demo_bundle.test_images[0]))
        answered = time.perf_counter()
        assert r.status_code == 200
        # Not starved. (Measured: it is answered well before the first stalled upload times
        # out, so the stalled uploads do not hold every one of the replica's 64 slots here;
        # that they would without the body timeout is not shown by this test.)
        assert answered - t < LIMITS["body_timeout_s"] + 4, (answered - first, answered - t)
        answers = []
        for sock in stalled:
            answers.append(sock.recv(4096).split(b"\r\n", 1)[0])
        assert set(answers) == {b"HTTP/1.1 408 Request Timeout"}, set(answers)
    finally:
        for sock in stalled:
            sock.close()
    assert server.get("/healthz").status_code == 200


def test_ood_flag_on_the_endpoint(server, demo_bundle):
    from skimage import data as skdata

    photo = png_bytes(np.asarray(Image.fromarray(skdata.astronaut()).resize((256, 256))))
    noise = png_bytes(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8))
    for blob in (photo, noise):
        out = server.post("/v1/predict", content=blob).json()["prediction"]
        assert out["in_distribution"] is False and out["reconstruction_error"] > 0


def test_sixteen_concurrent_clients_no_errors(server, demo_bundle):
    import httpx

    blobs = [png_bytes(a) for a in demo_bundle.test_images[:16]]
    url = str(server.base_url)

    def client(i: int) -> list[int]:
        with httpx.Client(base_url=url, timeout=60, headers=server.headers) as c:
            return [
                c.post("/v1/predict", content=blobs[(i + k) % 16]).status_code for k in range(15)
            ]

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        codes = [c for cs in pool.map(client, range(16)) for c in cs]
    secs = time.perf_counter() - start
    print(f"\n240 requests from 16 clients in {secs:.1f}s ({240 / secs:.1f} req/s)")
    assert len(codes) == 240 and set(codes) == {200}
    assert secs < 180


def test_bad_images_among_concurrent_requests_fail_alone(server, demo_bundle):
    """Twelve requests at once (dynamic batches of up to 8): the corrupt ones get 400, every
    good one the answer it gets when sent alone."""
    good = [png_bytes(a) for a in demo_bundle.test_images[:8]]
    alone = [server.post("/v1/predict", content=b).json()["prediction"] for b in good]
    corrupt = good[0][:60]  # a PNG cut short
    bodies = good[:4] + [corrupt] + good[4:] + [corrupt, b"\x89PNG\r\n\x1a\n", corrupt]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: server.post("/v1/predict", content=b), bodies))
    codes = [r.status_code for r in answers]
    assert codes == [200] * 4 + [400] + [200] * 4 + [400] * 3, codes
    got = [r.json()["prediction"] for r in answers if r.status_code == 200]
    for g, want in zip(got, alone, strict=True):
        assert g["label"] == want["label"]
        assert g["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    assert {r.json()["error"] for r in answers if r.status_code == 400} == {"corrupt_image"}


def test_killed_replica_is_restarted_and_serves_again(server, demo_bundle):
    good = png_bytes(demo_bundle.test_images[0])
    pid = server.get("/v1/model").json()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline, new_pid = time.time() + 120, None
    while time.time() < deadline:
        try:
            r = server.get("/v1/model", timeout=5)
            if r.status_code == 200 and r.json()["pid"] != pid:
                new_pid = r.json()["pid"]
                break
        except Exception:
            pass
        time.sleep(1)
    assert new_pid is not None, "replica did not come back within 120 s"
    assert server.post("/v1/predict", content=good).status_code == 200


def test_cli_predict_against_the_server(server, demo_bundle, tmp_path):
    import subprocess
    import sys

    img = tmp_path / "x.png"
    img.write_bytes(png_bytes(demo_bundle.test_images[0]))
    cmd = [sys.executable, "-m", "medcae", "predict", "--url", str(server.base_url), str(img)]
    out = subprocess.run([*cmd, "--api-key", API_KEY], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "x.png:" in out.stdout and "normal=" in out.stdout
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)  # no key
    assert out.returncode == 1 and "HTTP 401" in out.stderr and "Bearer" in out.stderr


def test_serve_config_yaml_is_consistent():
    import yaml

    cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    app = cfg["applications"][0]
    dep = app["deployments"][0]
    assert app["import_path"] == "medcae.serving.app:build_app" and "bundle" in app["args"]
    assert dep["max_ongoing_requests"] >= app["args"]["max_batch_size"]
    assert cfg["http_options"]["host"] == "127.0.0.1"
    assert cfg["http_options"]["request_timeout_s"] > 0 and dep["max_queued_requests"] > 0
    from ray.serve.schema import DeploymentSchema, HTTPOptionsSchema, ServeDeploySchema

    ServeDeploySchema.model_validate(cfg)  # Serve's own schema accepts the values...
    assert set(dep) <= set(DeploymentSchema.model_fields)  # ...and knows every field name
    assert set(cfg["http_options"]) <= set(HTTPOptionsSchema.model_fields)
    # The app's own arguments: every limit is a Limits field (at its default), hosts parse.
    from dataclasses import asdict

    from medcae.serving.api import Limits
    from medcae.serving.auth import parse_hosts

    assert app["args"]["limits"] == asdict(Limits())
    assert parse_hosts(app["args"]["allowed_hosts"]) == ("localhost", "127.0.0.1", "::1")


def test_build_app_refuses_fewer_than_one_replica():
    from medcae.serving.app import build_app

    with pytest.raises(ValueError, match="num_replicas 0: expected at least 1"):
        build_app({"bundle": "b", "num_replicas": 0})


def test_medcae_serve_stops_on_sigterm_with_two_replicas_and_leaves_no_process(
    demo_bundle, tmp_path
):
    """SIGTERM, as a process manager sends it, to `medcae serve --replicas 2` (from the
    checkout); both replicas answered before the signal; nothing remains."""
    import sys

    import httpx

    def replica_pids(base: str) -> set[int]:
        pids: set[int] = set()
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=base, timeout=30) as client:
            while len(pids) < 2 and time.monotonic() < deadline:
                with ThreadPoolExecutor(8) as pool:  # concurrent: the router spreads them
                    pids |= set(pool.map(lambda _: client.get("/v1/model").json()["pid"], range(8)))
        return pids

    cmd = [sys.executable, "-m", "medcae", "serve", "--bundle", str(demo_bundle.path)]
    pids = serve_reaped(
        [*cmd, "--replicas", "2"],
        tmp_path,
        ROOT,
        dict(os.environ),
        replica_pids,
        stop="SIGTERM",
    )
    assert len(pids) == 2, pids


def test_api_schema_driven_requests_never_get_a_5xx(server):
    """Property-based: schemathesis draws requests from the app's own OpenAPI schema (bodies
    of every declared media type, with a valid key or without one); every response must be a
    documented status with a conforming body, and none a 5xx. Derandomized and bounded: 12
    requests per operation and media type (and 12 more that break the JSON schema)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        response_schema_conformance,
        status_code_conformance,
    )

    url = str(server.base_url).rstrip("/")
    schema = schemathesis.openapi.from_dict(server.get("/openapi.json").json())
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    seen: dict[tuple[str, str | None, int], int] = {}
    strategies = []
    for result in schema.get_all_operations():
        op = result.ok()
        media = [body.media_type for body in op.body] or [None]
        for mt in media:
            strategies.append(op.as_strategy(GenerationMode.POSITIVE, media_type=mt))
            if mt == "application/json":  # bodies that break the schema, too
                strategies.append(op.as_strategy(GenerationMode.NEGATIVE, media_type=mt))

    for strategy in strategies:

        @given(case=strategy)
        @settings(
            max_examples=12,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            label = case.operation.label
            n = sum(v for k, v in seen.items() if k[0] == label)
            auth = {"Authorization": f"Bearer {API_KEY}"} if n % 5 else {}  # 1 in 5 without
            response = case.call(base_url=url, headers=auth, timeout=60)
            case.validate_response(response, checks=checks)
            key = (label, case.media_type, response.status_code)
            seen[key] = seen.get(key, 0) + 1

        check()
    labels = {k[0] for k in seen}
    assert {"POST /v1/predict", "POST /v1/predict/batch", "GET /v1/model"} <= labels, seen
    parsed = {k for k in seen if k[0].startswith("POST") and k[2] not in (401, 403)}
    media = {"image/png", "image/jpeg", "multipart/form-data", "application/json"}
    assert media <= {k[1] for k in parsed}, seen  # bodies of these media types were read
    assert server.get("/healthz").status_code == 200  # and the server is still up


def test_page_in_a_real_browser(server, demo_bundle, tmp_path):
    """Chromium opens the page, is asked for the key, uploads a real image and shows the label
    the Predictor gives offline, the probability bars, the OOD verdict, the evidence map and
    the model card; a screenshot is kept in .test-output/page.png."""
    from pathlib import Path

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = np.asarray(Image.fromarray(demo_bundle.test_images[3]).resize((256, 256)))
    path = tmp_path / "scan.png"
    path.write_bytes(png_bytes(image))
    want = Predictor.from_bundle(demo_bundle.path).predict([path.read_bytes()])[0].label
    url = str(server.base_url).rstrip("/")
    out = Path(os.environ.get("MEDCAE_TEST_OUTPUT", ROOT / ".test-output"))
    out.mkdir(parents=True, exist_ok=True)
    browser = chromium()
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(url + "/")
        key_row = browser.find_element(By.ID, "key-row")
        wait.until(lambda _: key_row.is_displayed())  # the server needs a key: the page asks
        browser.find_element(By.ID, "key").send_keys(API_KEY)
        browser.find_element(By.ID, "key-save").click()
        wait.until(lambda b: b.find_element(By.ID, "model-id").text.startswith("medcae-"))
        browser.find_element(By.ID, "file").send_keys(str(path))  # as a picked file
        result = browser.find_element(By.ID, "result")
        wait.until(lambda _: result.is_displayed())
        assert browser.find_element(By.ID, "label").text == want
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
        assert len(bars) == 3
        assert "distribution" in browser.find_element(By.ID, "ood").text
        loaded = "return arguments[0].complete && arguments[0].naturalWidth"
        for img_id in ("view", "heat"):
            assert browser.execute_script(loaded, browser.find_element(By.ID, img_id)) > 0
        card = browser.find_element(By.ID, "card")
        wait.until(lambda _: "Intended use" in card.text)
        stats = browser.find_element(By.ID, "stats")  # this replica's recent answers
        wait.until(lambda _: "answers of version" in stats.text)
        assert "out of distribution" in stats.text
        assert not browser.find_element(By.ID, "model-pick").is_displayed()  # one model
        assert not browser.find_element(By.ID, "status").get_attribute("class")  # no error
        # The key lives in this tab's sessionStorage only: not in localStorage or a cookie.
        stored = "return [sessionStorage.getItem('medcae-key'), localStorage.length]"
        assert browser.execute_script(stored) == [API_KEY, 0]
        assert browser.get_cookies() == []
        browser.save_screenshot(str(out / "page.png"))
    finally:
        browser.quit()
    assert (out / "page.png").stat().st_size > 10_000


def test_explain_endpoint_adds_up_and_page_is_open(server, demo_bundle):
    import httpx

    blob = png_bytes(demo_bundle.test_images[0])
    r = server.post("/v1/explain", content=blob)
    assert r.status_code == 200, r.text
    body = r.json()
    exp, pred = body["explanation"], body["prediction"]
    assert exp["label"] == pred["label"]
    total = float(np.sum(exp["contributions"])) + exp["intercept"]
    assert total == pytest.approx(exp["decision"], abs=1e-3)
    assert base64.b64decode(exp["heatmap_png"])[:8] == b"\x89PNG\r\n\x1a\n"
    other = [n for n in pred["probabilities"] if n != pred["label"]][0]
    r2 = server.post("/v1/explain", params={"label": other}, content=blob)
    assert r2.json()["explanation"]["label"] == other
    r3 = server.post("/v1/explain", params={"label": "nope"}, content=blob)
    assert (r3.status_code, r3.json()["error"]) == (422, "unknown_label")
    url = str(server.base_url).rstrip("/")
    with httpx.Client(base_url=url, timeout=60) as anon:
        page = anon.get("/")  # the page itself is open; its API calls need the key
        assert page.status_code == 200 and "<title>medcae" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert anon.get("/static/page.js").status_code == 200
        assert anon.post("/v1/explain", content=blob).status_code == 401
        assert anon.get("/v1/model/card").status_code == 401

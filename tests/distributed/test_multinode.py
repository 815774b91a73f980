"""A real two-node Ray cluster on this machine, with token auth, driven through the Jobs API.

The head (with the dashboard) and a second node (custom resource ``node2``) are separate
``ray start --block`` processes with their own ports and temp dirs; both are stopped at the end
of the module, also when a test fails. Nothing here touches the pytest process's own Ray.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import ROOT
from helpers.cluster import alive_node_ids, dashboard_get, local_cluster

from medcae.registry.models import ModelRef

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EXCLUDES = [".git", ".venv", "runs", "data", ".cache", "*.npz", "*.pt", "*.pth", "__pycache__"]
EXCLUDES += [".pytest_cache", ".ruff_cache", ".mypy_cache", "*.egg-info", "docs/results"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("nodes"), [{"node2": 1}], num_cpus=2) as c:
        yield c


def _client(cluster, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return JobSubmissionClient(cluster.head.dashboard_url, headers=headers)


def _wait_for_job(client, job_id: str, timeout: float) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            return status
        time.sleep(2)
    client.stop_job(job_id)
    return "TIMEOUT"


def _http_status(url: str, headers: dict[str, str], data: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.timeout(400)
def test_cluster_has_two_nodes_and_the_custom_resource(cluster):
    assert len(set(cluster.node_ids)) == 2
    nodes = dashboard_get(f"{cluster.head.dashboard_url}/api/v0/nodes", cluster.token)
    nodes = {n["node_id"]: n for n in nodes["data"]["result"]["result"]}
    assert set(nodes) == set(cluster.node_ids)
    assert [n["resources_total"].get("node2") for n in nodes.values()].count(1.0) == 1


@pytest.mark.timeout(400)
def test_requests_without_the_right_token_are_rejected(cluster):
    from ray.exceptions import AuthenticationError

    url = f"{cluster.head.dashboard_url}/api/jobs/"
    body = json.dumps({"entrypoint": "echo should-not-run"}).encode()
    json_type = {"Content-Type": "application/json"}
    assert _http_status(url, json_type, body) == 401
    wrong = {**json_type, "Authorization": "Bearer " + "0" * 64}
    assert _http_status(url, wrong, body) == 403
    nodes_api = f"{cluster.head.dashboard_url}/api/v0/nodes"
    assert _http_status(nodes_api, {}) == 401
    with pytest.raises(AuthenticationError):
        _client(cluster, "0" * 64).submit_job(entrypoint="echo should-not-run")
    jobs = _client(cluster, cluster.token).list_jobs()
    assert not [j for j in jobs if "should-not-run" in j.entrypoint]  # nothing got through


@pytest.mark.timeout(300)
def test_a_job_submitted_with_the_checkout_as_working_dir_runs_its_shim(cluster):
    """``ray job submit --working-dir .``: the checkout (without its heavy folders) reaches
    the cluster and a ``ray_jobs/`` shim runs there. (Training spread over both nodes is
    checked by the labeling loop's retraining job below.)"""
    client = _client(cluster, cluster.token)
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} ray_jobs/train.py --help",
        runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES},
    )
    status = _wait_for_job(client, job_id, timeout=240)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", f"job {job_id}: {status}\n{logs[-4000:]}"
    assert "usage: medcae train" in logs and "--placement-strategy" in logs


@pytest.mark.timeout(600)
def test_labeling_loop_on_the_cluster_from_first_label_to_promoted_version(
    cluster, tmp_path, demo_bundle, demo_npz
):
    """``medcae serve --address`` on the two-node cluster with a pool: in headless Chromium an
    admin labels from the queue with the keyboard (skip, undo), a job with a label whose image
    left the pool fails, says why and leaves the champion serving, a second train while one
    runs gets 409; then Train from the page (the job's workers on both nodes), the challenger
    against the champion, Promote, and the predict view answers with the new version."""
    from helpers import chromium, png_bytes, serve_reaped
    from helpers.cluster import node_env

    from medcae.data import load_dataset
    from medcae.labeling.pool import image_id
    from medcae.registry.models import Registry
    from medcae.serving.auth import key_line

    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    registry.promote("demo", registry.register("demo", demo_bundle.path).version, "champion")
    ds = load_dataset(str(demo_npz))
    pool = tmp_path / "pool"
    pool.mkdir()
    truth = {}
    for i in range(60):
        path = pool / f"{i:03d}.png"
        path.write_bytes(png_bytes(ds.splits["train"].images[240 + i]))
        truth[image_id(str(path))] = int(ds.splits["train"].labels[240 + i])
    keys = tmp_path / "keys"
    keys.write_text(key_line("root-key-0123", "root", "admin") + "\n")
    out = Path(os.environ.get("MEDCAE_TEST_OUTPUT", ROOT / ".test-output"))
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "medcae", "serve", "--address", cluster.head.gcs_address,
        "--model", "demo@champion", "--mlflow", registry.uri, "--follow-s", "1",
        "--pool", f"demo={pool}", "--state-dir", str(tmp_path / "state"),
        "--api-keys-file", str(keys), "--log-dir", str(tmp_path / "logs"),
        "--train-args", "--smoke-test --epochs 1 --num-workers 2 --placement-strategy SPREAD"
        " --representation cae --calibration none",  # one head: the loop is tested, not the choice
    ]  # fmt: skip

    def during(base: str) -> dict:
        import httpx
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        api = httpx.Client(base_url=base, headers={"Authorization": "Bearer root-key-0123"})
        browser = chromium()
        try:
            wait = WebDriverWait(browser, 60)
            browser.get(base + "/")
            wait.until(lambda b: b.find_element(By.ID, "key-row").is_displayed())
            browser.find_element(By.ID, "key").send_keys("root-key-0123")
            browser.find_element(By.ID, "key-save").click()
            wait.until(lambda b: b.find_element(By.ID, "tabs").is_displayed())
            browser.find_element(By.ID, "tab-label").click()
            image = browser.find_element(By.ID, "lab-image")
            body = browser.find_element(By.TAG_NAME, "body")

            def shown() -> str:
                return image.get_attribute("data-image-id") or ""

            wait.until(lambda _: shown())
            loaded = "return arguments[0].complete && arguments[0].naturalWidth"
            wait.until(lambda b: b.execute_script(loaded, image) == 64)  # as the model sees it
            seen = []
            for n in range(12):
                before = shown()
                seen.append(before)
                key = "s" if n == 3 else str(truth[before] + 1)  # the fourth one skipped
                body.send_keys(key)
                wait.until(lambda _, b=before: shown() and shown() != b)
            body.send_keys("u")  # undo the last label: that image comes back
            wait.until(lambda _: shown() == seen[-1])
            body.send_keys(str(truth[seen[-1]] + 1))
            wait.until(lambda _: shown() != seen[-1])
            labels = api.get("/v1/models/demo/labels").text
            assert labels.count("\n") == 1 + 11, labels  # header, 11 labels (one skipped)
            assert seen[3] not in labels and all(i in labels for i in seen[:3] + seen[4:])
            assert "root" in labels
            browser.save_screenshot(str(out / "label.png"))
            # a label whose image left the pool: the job fails and says why
            extra = api.get("/v1/models/demo/queue?k=1").json()["images"][0]["image_id"]
            api.post("/v1/models/demo/labels", json={"image_id": extra, "label": "ring"})
            gone = next(p for p in pool.iterdir() if image_id(str(p)) == extra)
            gone.rename(tmp_path / "moved.png")
            r = api.post("/v1/models/demo/train")
            assert r.status_code == 202, r.text
            bad = r.json()["job_id"]
            again = api.post("/v1/models/demo/train")  # one job at a time
            assert again.status_code == 409 and bad in again.json()["detail"]
            failed = _poll_job(api, bad, 240)
            assert failed["state"] == "FAILED" and "no longer in the pool" in failed["message"]
            (tmp_path / "moved.png").rename(gone)
            assert api.get("/v1/models/demo").json()["version"] == "1"  # still the champion
            # Train from the page, compare, promote
            browser.find_element(By.ID, "train").click()
            job = browser.find_element(By.ID, "job")
            WebDriverWait(browser, 420, poll_frequency=2).until(
                lambda _: "SUCCEEDED" in job.text or "FAILED" in job.text
            )
            assert "SUCCEEDED" in job.text, job.text
            compare = browser.find_element(By.ID, "compare")
            wait.until(lambda _: "challenger v2" in compare.text)
            assert "AUC" in compare.text and "DeLong" in compare.text
            browser.save_screenshot(str(out / "label-compare.png"))
            browser.find_element(By.ID, "promote").click()
            model_id = browser.find_element(By.ID, "model-id")
            slow = WebDriverWait(browser, 240)  # the replica loads version 2 before it answers
            slow.until(lambda _: model_id.text.endswith("version 2"))
            wait.until(lambda _: "is the champion" in compare.text)
            browser.find_element(By.ID, "tab-predict").click()
            scan = tmp_path / "scan.png"
            scan.write_bytes(png_bytes(ds.splits["test"].images[0]))
            browser.find_element(By.ID, "file").send_keys(str(scan))
            status = browser.find_element(By.ID, "status")
            answered = "answered by" in status.text
            for _ in range(120):
                answered = "answered by" in status.text or "Refused" in status.text
                if answered:
                    break
                time.sleep(0.5)
            browser.save_screenshot(str(out / "label-predict.png"))
            assert status.text.endswith("version 2."), status.text
            trail = api.get("/v1/models/demo/jobs").json()["jobs"]
            return {
                "states": [j["state"] for j in trail],
                "seconds": trail[0]["seconds"],
                "workers": trail[0]["worker_nodes"],
            }
        finally:
            browser.quit()
            api.close()

    got = serve_reaped(cmd, tmp_path, ROOT, node_env(cluster.token), during, timeout=560)
    assert got["states"] == ["SUCCEEDED", "FAILED"], got
    workers = got["workers"]  # the retraining ran on the cluster: one worker on each node
    assert len(workers) == 2 and len(set(workers)) == 2, workers
    assert set(workers) <= set(alive_node_ids(cluster.head.dashboard_url, cluster.token))
    assert registry.show(ModelRef("demo", alias="champion")).version == "2"
    assert registry.show(ModelRef("demo", alias="champion")).tags["medcae.job"]


def _poll_job(api, job_id: str, timeout: float, until=("SUCCEEDED", "FAILED", "STOPPED")) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in until:
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")

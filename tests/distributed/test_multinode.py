"""A real two-node Ray cluster on this machine, with token auth, driven through the Jobs API.

The head (with the dashboard) and a second node (custom resource ``node2``) are separate
``ray start --block`` processes with their own ports and temp dirs; both are stopped at the end
of the module, also when a test fails. Nothing here touches the pytest process's own Ray.
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import ROOT
from helpers.cluster import alive_node_ids, dashboard_get, local_cluster

pytestmark = [pytest.mark.slow, pytest.mark.ray]

RESULT_TAG = "MEDCAE_RESULT"
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


@pytest.mark.timeout(600)
def test_train_job_spreads_workers_over_both_nodes(cluster, tmp_path):
    client = _client(cluster, cluster.token)
    entrypoint = (
        f"{sys.executable} ray_jobs/train.py --data demo --smoke-test --num-workers 2"
        f" --placement-strategy SPREAD --storage-path {tmp_path / 'ckpt'} --name multinode"
        " --representation cae"  # one head after training: the spread is what is tested
    )
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES},
    )
    status = _wait_for_job(client, job_id, timeout=420)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", f"job {job_id}: {status}\n{logs[-8000:]}"
    line = next((x for x in logs.splitlines() if x.startswith(RESULT_TAG + " ")), None)
    assert line, f"no {RESULT_TAG} line in the job's logs:\n{logs[-4000:]}"
    result = json.loads(line[len(RESULT_TAG) + 1 :])
    workers = result["worker_nodes"]
    assert len(workers) == 2 and len(set(workers)) == 2, workers
    assert set(workers) <= set(alive_node_ids(cluster.head.dashboard_url, cluster.token))
    assert result["epochs"] >= 1 and result["restored_from_epoch"] == 0
    assert math.isfinite(result["final_train_loss"]) and math.isfinite(result["final_val_loss"])

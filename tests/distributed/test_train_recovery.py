"""Ray Train DDP of the CAE under failure: a SIGKILLed worker, a killed driver, resumption.

The kill tests run ``ray_jobs/train.py`` as a separate driver connected to the session's Ray,
so a real worker process (or the real driver) is killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT

from medcae.distributed.train import registered_epoch

JOB = ROOT / "ray_jobs" / "train.py"
TAG = "MEDCAE_RESULT"
EPOCHS = 6  # enough to kill after epoch 2 and resume with epochs left

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _job(storage: Path, name: str, *extra: str) -> list[str]:
    """The smoke job; all runs share one feature store, so only the first one extracts."""
    return [
        sys.executable,
        str(JOB),
        "--smoke-test",
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        "--epochs",
        str(EPOCHS),
        "--storage-path",
        str(storage),
        "--name",
        name,
        "--feature-store",
        str(storage.parent / "features"),
        "--out",
        str(storage / f"out-{name}"),
        "--representation",  # one head to fit after training, not the five `auto` compares
        "cae",
        *extra,
    ]


def _start(cmd: list[str], address: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*cmd, "--address", address],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _result(log: Path) -> dict:
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(TAG)]
    assert lines, text[-4000:]
    short = json.loads(lines[-1][len(TAG) :])
    return {**json.loads(Path(short["results"]).read_text()), **short}  # history: results.json


def _wait_for_checkpoint(run: Path, epoch: int, proc: subprocess.Popen, log: Path, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"job ended before checkpoint {epoch}:\n{log.read_text()[-4000:]}")
        if registered_epoch(run) >= epoch:
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no checkpoint for epoch {epoch} after {timeout}s:\n{log.read_text()[-4000:]}")


def _address(ray) -> str:
    return ray.get_runtime_context().gcs_address


def _contiguous(history: list[dict]) -> list[int]:
    return [h["epoch"] for h in history]


@pytest.fixture
def run_dir(tmp_path_factory, request) -> Path:
    """A run folder beside the shared feature store."""
    d = tmp_path_factory.getbasetemp() / "train-jobs" / request.node.name[:40]
    d.mkdir(parents=True)
    return d


def _learned_on_from(history: list[dict], restored: int) -> None:
    """The epochs after the restore continue the restored model: the first of them already
    reconstructs better than the run's first epoch (a model started over would not), and the
    run ends better still than where it was restored."""
    first, after, last = history[0], history[restored], history[-1]
    assert after["restored_from"] == restored
    assert after["val_loss"] < first["val_loss"], [h["val_loss"] for h in history]
    assert last["val_loss"] < history[restored - 1]["val_loss"] * 1.05, history


@pytest.mark.timeout(600)
def test_sigkilled_worker_resumes_from_last_checkpoint(ray_session, run_dir):
    from medcae.distributed.runtime import local_train_worker_pids

    log = run_dir / "job.log"
    proc = _start(_job(run_dir, "kill-worker", "--max-failures", "1"), _address(ray_session), log)
    try:
        _wait_for_checkpoint(run_dir / "kill-worker", 2, proc, log)
        workers = local_train_worker_pids()  # the session's raylet is this process's child
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        killed_at = time.time()
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    res = _result(log)
    history = res["history"]
    assert _contiguous(history) == list(range(1, EPOCHS + 1))  # no epoch lost or repeated
    assert res["restored_from_epoch"] >= 2  # the new worker group resumed, not restarted
    resumed = [h for h in history if h["restored_from"] >= 2]
    assert resumed and resumed[0]["time"] > killed_at
    _learned_on_from(history, resumed[0]["restored_from"])
    lost = resumed[0]["time"] - killed_at - resumed[0]["epoch_s"]
    print(
        f"\nkill -> training progressing again: {lost:.1f}s (first epoch after restore done "
        f"{resumed[0]['time'] - killed_at:.1f}s after the kill)"
    )


@pytest.mark.timeout(600)
def test_killed_driver_rerun_continues_from_checkpoint(ray_session, run_dir):
    address = _address(ray_session)
    cmd = _job(run_dir, "kill-driver")
    log1 = run_dir / "first.log"
    first = _start(cmd, address, log1)
    try:
        _wait_for_checkpoint(run_dir / "kill-driver", 2, first, log1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the whole job's driver, no clean-up
    first.wait(timeout=30)
    registered = registered_epoch(run_dir / "kill-driver")
    assert 2 <= registered < EPOCHS, registered  # killed mid-run
    log2 = run_dir / "second.log"
    second = _start(cmd, address, log2)
    assert second.wait(timeout=400) == 0, log2.read_text()[-4000:]
    res = _result(log2)
    assert res["features_reused"] is True  # no re-extraction
    assert res["restored_from_epoch"] == registered  # continued, did not start over
    assert _contiguous(res["history"]) == list(range(1, EPOCHS + 1))
    _learned_on_from(res["history"], registered)
    # The same --storage-path and --name again, with another CAE config: refused, named.
    cmd = _job(run_dir, "kill-driver", "--lr", "0.01", "--address", address)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume from") and "cae.lr" in last, last
    assert "checkpoint 0.001, this run 0.01" in last

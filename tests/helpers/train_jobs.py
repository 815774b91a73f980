"""The training job as a separate driver, for the recovery tests: its command, its start in
a session of its own, its result, and the checks on its history."""

from __future__ import annotations

import json
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


def job(storage: Path, name: str, *extra: str) -> list[str]:
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


def start(cmd: list[str], address: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*cmd, "--address", address],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def result(log: Path) -> dict:
    text = log.read_text()
    lines = [ln for ln in text.splitlines() if ln.startswith(TAG)]
    assert lines, text[-4000:]
    short = json.loads(lines[-1][len(TAG) :])
    return {**json.loads(Path(short["results"]).read_text()), **short}  # history: results.json


def wait_for_checkpoint(run: Path, epoch: int, proc: subprocess.Popen, log: Path, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"job ended before checkpoint {epoch}:\n{log.read_text()[-4000:]}")
        if registered_epoch(run) >= epoch:
            return
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no checkpoint for epoch {epoch} after {timeout}s:\n{log.read_text()[-4000:]}")


def gcs_address(ray) -> str:
    return ray.get_runtime_context().gcs_address


def contiguous(history: list[dict]) -> list[int]:
    return [h["epoch"] for h in history]


def learned_on_from(history: list[dict], restored: int) -> None:
    """The epochs after the restore continue the restored model: the first of them already
    reconstructs better than the run's first epoch (a model started over would not), and the
    run ends better still than where it was restored."""
    first, after, last = history[0], history[restored], history[-1]
    assert after["restored_from"] == restored
    assert after["val_loss"] < first["val_loss"], [h["val_loss"] for h in history]
    assert last["val_loss"] < history[restored - 1]["val_loss"] * 1.05, history

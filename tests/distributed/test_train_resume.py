"""Ray Train DDP of the CAE under failure: a killed driver's rerun continues from its checkpoint,
and another CAE config on the same run is refused (split from ``test_train_recovery.py`` so the
two long jobs run on two test workers at once).
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from helpers import ROOT
from helpers.train_jobs import (
    EPOCHS,
    contiguous,
    gcs_address,
    job,
    learned_on_from,
    result,
    start,
    wait_for_checkpoint,
)

from medcae.distributed.train import registered_epoch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_killed_driver_rerun_continues_from_checkpoint(ray_session, run_dir):
    address = gcs_address(ray_session)
    cmd = job(run_dir, "kill-driver")
    log1 = run_dir / "first.log"
    first = start(cmd, address, log1)
    try:
        wait_for_checkpoint(run_dir / "kill-driver", 2, first, log1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the whole job's driver, no clean-up
    first.wait(timeout=30)
    registered = registered_epoch(run_dir / "kill-driver")
    assert 2 <= registered < EPOCHS, registered  # killed mid-run
    log2 = run_dir / "second.log"
    second = start(cmd, address, log2)
    assert second.wait(timeout=400) == 0, log2.read_text()[-4000:]
    res = result(log2)
    assert res["features_reused"] is True  # no re-extraction
    assert res["restored_from_epoch"] == registered  # continued, did not start over
    assert contiguous(res["history"]) == list(range(1, EPOCHS + 1))
    learned_on_from(res["history"], registered)
    # The same --storage-path and --name again, with another CAE config: refused, named.
    cmd = job(run_dir, "kill-driver", "--lr", "0.01", "--address", address)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume from") and "cae.lr" in last, last
    assert "checkpoint 0.001, this run 0.01" in last

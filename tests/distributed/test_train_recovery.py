"""Ray Train DDP of the CAE under failure: a SIGKILLed worker resumes from the last checkpoint.

The job runs ``ray_jobs/train.py`` as a separate driver connected to the session's Ray, so a
real worker process is killed with SIGKILL (a killed driver: ``test_train_resume.py``).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
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

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_sigkilled_worker_resumes_from_last_checkpoint(ray_session, run_dir):
    from medcae.distributed.runtime import local_train_worker_pids

    log = run_dir / "job.log"
    proc = start(job(run_dir, "kill-worker", "--max-failures", "1"), gcs_address(ray_session), log)
    try:
        wait_for_checkpoint(run_dir / "kill-worker", 2, proc, log)
        workers = local_train_worker_pids()  # the session's raylet is this process's child
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        killed_at = time.time()
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    res = result(log)
    history = res["history"]
    assert contiguous(history) == list(range(1, EPOCHS + 1))  # no epoch lost or repeated
    assert res["restored_from_epoch"] >= 2  # the new worker group resumed, not restarted
    resumed = [h for h in history if h["restored_from"] >= 2]
    assert resumed and resumed[0]["time"] > killed_at
    learned_on_from(history, resumed[0]["restored_from"])
    lost = resumed[0]["time"] - killed_at - resumed[0]["epoch_s"]
    print(
        f"\nkill -> training progressing again: {lost:.1f}s (first epoch after restore done "
        f"{resumed[0]['time'] - killed_at:.1f}s after the kill)"
    )

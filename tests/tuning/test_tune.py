"""Ray Tune + Optuna search: smoke run end to end, early stopping, kill-and-resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT

from medcae.inference.predictor import Predictor

pytestmark = [pytest.mark.ray, pytest.mark.slow]
JOB = ROOT / "ray_jobs" / "tune.py"


def _cmd(demo_npz, out, *extra):
    return [
        sys.executable,
        str(JOB),
        "--data",
        str(demo_npz),
        "--smoke-test",
        "--out",
        str(out),
        "--cache-dir",
        str(out.parent / "cache"),
        "--num-cpus",
        "4",
        "--seed",
        "0",
        *extra,
    ]


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv") as f:
        return list(csv.DictReader(f))


def test_smoke_search_writes_report_and_a_working_bundle(findings_npz, tmp_path):
    """On the demo's findings (multi-label: trials score the mean AUC over findings); the
    resume test below searches the single-label demo."""
    from helpers.reaper import run_reaped

    out = tmp_path / "search"
    args = ("--num-samples", "6", "--max-concurrent", "2", "--grace-period", "1")
    run, report = run_reaped(
        _cmd(findings_npz, out, *args) + ["--mlflow", f"sqlite:///{tmp_path / 'mlruns.db'}"],
        tmp_path / "reaper.json",
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert report["left"] == [], report  # no Ray process of the search outlives it
    rows = _rows(out)
    assert len(rows) == 6 and all(not r["error"] for r in rows)
    epochs = [int(r["epochs_run"]) for r in rows]
    assert max(epochs) == 4 and min(epochs) < 4, epochs  # ASHA stopped at least one trial early
    summary = json.loads((out / "best_config.json").read_text())
    assert summary["best_val_auc"] == pytest.approx(max(float(r["val_auc"]) for r in rows))
    for png in ("history.png", "importance.png"):
        assert (out / png).stat().st_size > 1000
    pred = Predictor.from_bundle(out / "bundle")
    from medcae.data import load_dataset

    images = load_dataset(str(findings_npz)).splits["test"].images[:8]
    assert pred.multilabel and pred.predict_proba(images).shape == (8, 3)
    assert set(pred.predict(images)[0].thresholds) == {"nodule", "ring", "effusion"}
    assert "model bundle:" in run.stdout and "test (touched once)" in run.stdout
    # --mlflow: one MLflow run per trial (Ray's callback) and one for the search
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("medcae-tune-search")
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("medcae.summary") != "true"]
    (best,) = [r for r in runs if r.data.tags.get("medcae.summary") == "true"]
    assert len(trials) == 6
    assert all("val_auc" in r.data.metrics for r in trials)
    steps = max(len(client.get_metric_history(r.info.run_id, "val_auc")) for r in trials)
    assert steps == 4  # every reported epoch of the longest trial
    assert best.data.metrics["best_val_auc"] == pytest.approx(summary["best_val_auc"])
    assert "bundle/MODEL_CARD.md" in {
        a.path for a in client.list_artifacts(best.info.run_id, "bundle")
    }
    # TensorBoard event files, as Ray writes them for each trial
    assert len(list((out / "search").glob("*/events.out.tfevents*"))) == 6


def _terminated(exp: Path) -> int:
    states = list(exp.glob("experiment_state-*.json"))
    return max((p.read_text().count("TERMINATED") for p in states), default=0)


def _reports(exp: Path) -> dict[str, int]:
    return {p.parent.name: len(p.read_text().splitlines()) for p in exp.glob("*/result.json")}


def test_killed_search_resumes_without_rerunning_finished_trials(ray_session, demo_npz, tmp_path):
    """The search's driver, on the session's Ray, SIGKILLed after two finished trials; rerun
    with --resume, it finishes the rest without rerunning those two."""
    out = tmp_path / "search"
    address = ray_session.get_runtime_context().gcs_address
    args = ("--num-samples", "4", "--max-concurrent", "1", "--grace-period", "4")
    args += ("--address", address)
    proc = subprocess.Popen(
        _cmd(demo_npz, out, *args),
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    exp = out / "search"
    deadline = time.time() + 400
    try:
        while time.time() < deadline and _terminated(exp) < 2 and proc.poll() is None:
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver; Ray ends the trials of its dead job
        proc.wait()
    assert _terminated(exp) >= 2, "search did not finish two trials before the deadline"
    before = _reports(exp)
    run = subprocess.run(
        _cmd(demo_npz, out, *args, "--resume"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resuming search" in run.stderr
    rows = _rows(out)
    assert len(rows) == 4 and all(not r["error"] for r in rows)
    after = _reports(exp)
    finished_before = [t for t, n in before.items() if n == 4]
    assert finished_before and all(after[t] == 4 for t in finished_before)  # not re-run

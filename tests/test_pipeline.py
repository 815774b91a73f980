"""The main job end to end on a local Ray (smoke-test size)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medcae.config import PipelineConfig
from medcae.data import load_dataset
from medcae.metrics import classification_report
from medcae.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "ray_jobs" / "pipeline.py"


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.parametrize("script", sorted((ROOT / "ray_jobs").glob("*.py")), ids=lambda p: p.name)
def test_entry_points_have_help_and_smoke_flag(script):
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0 and "--smoke-test" in out.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["--data", "/no/such/file.npz"], "no such file"),
        (["--data", "notadataset"], "notadataset"),
        (["--data", "{demo}", "--budget", "100000"], "only"),
        (["--data", "{demo}", "--backbone", "alexnet"], "unknown backbone"),
    ],
)
def test_bad_input_is_one_clear_line_before_ray_starts(args, match, demo_npz):
    args = [a.replace("{demo}", str(demo_npz)) for a in args]
    out = _cli(*args, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and match in last
    assert "Traceback" not in out.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_pipeline_smoke_cache_hit_and_bundle_predictions(ray_session, demo_npz, tmp_path):
    from medcae.distributed.pipeline import run_pipeline, subsample

    cfg = PipelineConfig(data=str(demo_npz))
    cache = tmp_path / "cache"
    first = run_pipeline(cfg, tmp_path / "run1", cache, smoke_test=True)
    second = run_pipeline(cfg, tmp_path / "run2", cache, smoke_test=True)
    assert first.cache_hits == {"labeled": False} and second.cache_hits == {"labeled": True}
    assert second.timings["features_s"] < 0.5 * first.timings["features_s"]
    assert [h["epoch"] for h in first.history] == [1, 2]

    # The bundle alone reproduces the pipeline's test metrics from raw images.
    ds = subsample(load_dataset(str(demo_npz)), {"train": 96, "val": 48, "test": 48})
    pred = Predictor.from_bundle(first.bundle)
    test = ds.splits["test"]
    report = classification_report(test.labels, pred.predict_proba(test.images), ds.label_names)
    cae_row = next(v for k, v in first.reports.items() if k.startswith("CAE"))
    assert report["acc"] == cae_row["acc"]
    assert report["auc"] == pytest.approx(cae_row["auc"], abs=1e-9)
    saved = json.loads((tmp_path / "run1" / "results.json").read_text())
    assert saved["cache_hits"] == {"labeled": False}
    assert np.isfinite(pred.ood_threshold)


@pytest.mark.ray
@pytest.mark.slow
def test_cli_smoke_test_prints_table_and_bundle(demo_npz, tmp_path):
    out = _cli(
        "--data",
        str(demo_npz),
        "--smoke-test",
        "--out",
        str(tmp_path / "run"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--num-cpus",
        "4",
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ACC" in out.stdout and "AUC" in out.stdout and "P/R nodule" in out.stdout
    line = next(x for x in out.stdout.splitlines() if x.startswith("model bundle: "))
    bundle = line.split("model bundle: ")[1]
    assert (Path(bundle) / "bundle.json").is_file()

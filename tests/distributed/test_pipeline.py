"""The main job end to end on a local Ray (smoke-test size)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, medcae_subprocess
from PIL import Image

from medcae.config import PipelineConfig
from medcae.inference.predictor import Predictor
from medcae.metrics.classification import classification_report

JOB = ROOT / "ray_jobs" / "pipeline.py"


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.mark.parametrize(
    "args, match",
    [
        (["--data", "/no/such/file.npz"], "no such file"),
        (["--data", "notadataset"], "notadataset"),
        (["--data", "{demo}", "--budget", "100000"], "only"),
        (["--data", "{demo}", "--backbone", "alexnet"], "unknown backbone"),
        (["--data", "{demo}", "--hierarchical"], "needs two or more --taps"),
    ],
)
def test_bad_input_is_one_clear_line_before_ray_starts(args, match, demo_npz):
    args = [a.replace("{demo}", str(demo_npz)) for a in args]
    out = medcae_subprocess("run", *args, timeout=60, ray_imported_ok=True)  # fails if Ray starts
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and match in last
    assert "Traceback" not in out.stderr


def _mixed_image(i: int, rng: np.random.Generator) -> Image.Image:
    """Grayscale, RGB, 16-bit and palette images of several sizes and aspect ratios."""
    h, w = [(40, 40), (56, 36), (30, 72), (96, 64)][i % 4]
    gray = rng.integers(0, 255, (h, w), dtype=np.uint8)
    mode = i % 4
    if mode == 0:
        return Image.fromarray(gray)
    if mode == 1:
        return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    if mode == 2:
        return Image.fromarray(gray.astype(np.uint16) * 200)  # 16-bit
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).quantize(16)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(1)
    for i in range(48):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(exist_ok=True)
        _mixed_image(i, rng).save(cls / f"{i:02d}.png")
    (root / "a" / "99.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut short")  # unreadable
    return root


@pytest.mark.ray
@pytest.mark.slow
def test_mixed_folder_run_ends_in_a_bundle_that_serves_the_same_answers(
    ray_session, mixed_folder, tmp_path
):
    import pyarrow.parquet as pq

    from medcae.config import BackboneConfig, CAEConfig
    from medcae.distributed.pipeline import RunPaths, list_sources, run_pipeline
    from medcae.distributed.store import build_store

    cfg = PipelineConfig(
        data=str(mixed_folder),
        backbone=BackboneConfig(taps=("stage4",), resolution=48),
        cae=CAEConfig(channels=(16,), latent_channels=4, epochs=2),
    )
    paths = RunPaths(tmp_path / "one", str(tmp_path / "store"), str(tmp_path / "ckpt"), "one")
    first = run_pipeline(cfg, paths, list_sources(cfg, None, smoke_test=False))
    # A second run's first stage, as run_pipeline calls it, finds the entry the first one built.
    again = build_store(list_sources(cfg, None, smoke_test=False), cfg.backbone, paths.store_root)
    assert not first.store.reused and again.reused and first.store.key == again.key
    assert [h["epoch"] for h in first.history] == [1, 2]
    assert (first.bundle / "bundle.json").is_file()

    # The bundle alone, on the original files, gives the run's own test predictions.
    preds = pq.read_table(tmp_path / "one" / "test_predictions.parquet").to_pydict()
    assert len(preds["id"]) == first.store.rows["test"] > 0
    predictor = Predictor.from_bundle(first.bundle)
    online = predictor.predict_proba([Path(p).read_bytes() for p in preds["id"]])
    offline = np.stack([preds["p_a"], preds["p_b"]], axis=1)
    np.testing.assert_allclose(online, offline, atol=1e-5)
    saved = json.loads((tmp_path / "one" / "results.json").read_text())
    assert saved["feature_store"]["key"] == first.store.key
    # The unreadable file is skipped, and results.json lists it with its reason.
    assert [p for p, _ in saved["skipped"]] == [str(mixed_folder / "a" / "99.png")]
    assert saved["skipped"][0][1]  # the reason
    chosen = next(v for k, v in first.reports.items() if k.endswith("(chosen)"))
    labels = np.asarray(preds["label"])
    decided = [
        predictor.label_names.index(p.label)
        for p in predictor.predictions({"proba": online, "error": np.zeros(len(online))})
    ]
    assert classification_report(labels, online, ["a", "b"], decided)["acc"] == chosen["acc"]
    assert predictor.operating_point.rule == "youden"  # two classes: a threshold, not argmax

"""Streaming ingest into the feature store: folders, corrupt files, reuse, rebuild, mismatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medcae.config import BackboneConfig
from medcae.distributed.ingest import (
    MANIFEST,
    FeatureStoreMismatch,
    is_val_path,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--data", "/no/such/file.npz"], "no such file"),
        (["--data", "{empty}"], "no image files"),
        (["--data", "demo", "--backbone", "alexnet"], "unknown backbone"),
        (["--data", "demo", "--num-workers", "0"], "num_workers"),
    ],
)
def test_train_job_bad_input_is_one_line_before_ray_starts(args, match, tmp_path):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    out = subprocess.run(
        [sys.executable, str(ROOT / "ray_jobs" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error:")
    assert match in out.stderr.strip().splitlines()[-1]
    assert "Started a local Ray" not in out.stderr + out.stdout


@pytest.fixture(scope="module")
def scan_folder(tmp_path_factory) -> Path:
    """30 PNGs of mixed sizes and modes in nested folders, plus two corrupt files."""
    root = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    for i in range(30):
        side = 48 + 8 * (i % 4)
        shape = (side, side, 3) if i % 5 == 0 else (side, side)
        sub = root / f"patient{i % 3}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(sub / f"{i}.png")
    (root / "patient0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "empty.dcm").write_bytes(b"")
    return root


def _store(folder: Path, uri: Path, resolution: int = 32):
    from medcae.distributed.ingest import build_feature_store, folder_source

    backbone = BackboneConfig(taps=("stage4",), resolution=resolution)
    src = folder_source(folder, resolution, f"{uri}/_skipped", val_fraction=0.2)
    return build_feature_store(src, backbone, str(uri), batch_size=8)


@pytest.mark.ray
@pytest.mark.slow
def test_folder_streams_into_store_and_reports_corrupt_files(ray_session, scan_folder, tmp_path):
    store = _store(scan_folder, tmp_path / "fs")
    assert sum(store.rows.values()) == 30 and not store.reused
    names = sorted(str(p) for p in scan_folder.rglob("*.png") if p.name != "broken.png")
    expect_val = sum(is_val_path(n, 0.2) for n in names)
    assert store.rows["val"] == expect_val and store.rows["train"] == 30 - expect_val
    skipped = {Path(p).name: reason for p, reason in store.skipped}
    assert set(skipped) == {"broken.png", "empty.dcm"}
    assert "empty" in skipped["empty.dcm"]
    meta = json.loads((tmp_path / "fs" / MANIFEST).read_text())
    assert meta["rows"] == store.rows and len(meta["mean"]) == store.shape[0]
    batch = store.split("train").take_batch(4, batch_format="numpy")
    assert batch["maps"].shape == (4, *store.shape) and batch["maps"].dtype == np.float32
    assert list(batch) == ["maps"]


@pytest.mark.ray
@pytest.mark.slow
def test_store_is_reused_rebuilt_when_incomplete_and_refused_for_other_data(
    ray_session, scan_folder, tmp_path
):
    uri = tmp_path / "fs"
    first = _store(scan_folder, uri)
    again = _store(scan_folder, uri)
    assert again.reused and again.rows == first.rows
    (uri / MANIFEST).unlink()  # as if the extraction had been killed before finishing
    rebuilt = _store(scan_folder, uri)
    assert not rebuilt.reused and rebuilt.rows == first.rows  # not doubled by leftovers
    with pytest.raises(FeatureStoreMismatch, match="another --name"):
        _store(scan_folder, uri, resolution=48)

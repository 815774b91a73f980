"""Backbone runtimes: an exported graph on ONNX Runtime gives PyTorch's numbers (fp32, 1e-4)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medcae.config import BackboneConfig
from medcae.features import FeatureExtractor

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, taps, weights",
    [
        ("efficientnet_lite0", ("stage3",), None),
        ("efficientnet_lite0", ("stage5",), None),
        ("efficientnet_lite0", ("head",), None),
        ("efficientnet_lite0", ("stage3", "stage5"), None),
        ("resnet18", ("layer2",), "random"),
        ("resnet18", ("layer3", "layer4"), "random"),
        ("densenet121", ("block2",), "random"),
    ],
)
def test_onnxruntime_matches_pytorch_on_every_tap(name, taps, weights, tmp_path, rng):
    cfg = BackboneConfig(name=name, taps=taps, resolution=64, weights=weights)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((64, 64), (40, 70, 3), (90, 90))]
    torch.manual_seed(0)  # random weights: the same init for both
    torch_ext = FeatureExtractor(cfg, runtime="torch")
    torch.manual_seed(0)
    ort_ext = FeatureExtractor(cfg, runtime="onnxruntime", graph_dir=str(tmp_path))
    assert (torch_ext.runtime, ort_ext.runtime) == ("torch", "onnxruntime")
    ref, got = torch_ext(images), ort_ext(images)
    for key in ("maps", "final"):
        assert got[key].shape == ref[key].shape and got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], ref[key], atol=1e-4, rtol=0, err_msg=key)
    graphs = list(tmp_path.glob("*.onnx"))
    assert len(graphs) == 1  # exported once, keyed by backbone, taps, resolution, weights
    mtime = graphs[0].stat().st_mtime_ns
    torch.manual_seed(0)
    FeatureExtractor(cfg, runtime="onnxruntime", graph_dir=str(tmp_path))
    assert graphs[0].stat().st_mtime_ns == mtime  # reused, not exported again


def test_auto_is_the_exported_graph_on_cpu(tmp_path):
    ext = FeatureExtractor(BackboneConfig(taps=("stage4",), resolution=32), graph_dir=str(tmp_path))
    assert ext.runtime == "onnxruntime"


def test_without_onnxruntime_auto_falls_back_and_says_why():
    """A machine without the package: PyTorch alone still runs, and the log line says so."""
    code = (
        "import sys, logging; sys.modules['onnxruntime'] = None\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from medcae.config import BackboneConfig\n"
        "from medcae.features import FeatureExtractor\n"
        "from medcae.runtimes import RuntimeUnavailable\n"
        "cfg = BackboneConfig(taps=('stage4',), resolution=32)\n"
        "print('RUNTIME', FeatureExtractor(cfg).runtime)\n"
        "try:\n"
        "    FeatureExtractor(cfg, runtime='onnxruntime')\n"
        "except RuntimeUnavailable as err:\n"
        "    print('REFUSED', err)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert "RUNTIME torch" in out.stdout, out.stderr[-2000:]
    assert "REFUSED onnxruntime is not installed" in out.stdout
    assert "onnxruntime is not installed" in out.stderr and "PyTorch instead" in out.stderr

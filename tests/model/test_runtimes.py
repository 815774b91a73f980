"""Backbone runtimes: an exported graph on ONNX Runtime or OpenVINO gives PyTorch's numbers
(fp32, 1e-4); bf16 is opt-in, recorded, and refused where it cannot run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT

from medcae.config import BackboneConfig, ConfigError
from medcae.model.features import FeatureExtractor
from medcae.model.runtimes import RuntimeUnavailable, resolve_runtime


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
def test_exported_runtimes_match_pytorch_on_every_tap(name, taps, weights, tmp_path, rng):
    cfg = BackboneConfig(name=name, taps=taps, resolution=64, weights=weights)
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((64, 64), (40, 70, 3), (90, 90))]
    torch.manual_seed(0)  # random weights: the same init for each
    ref = FeatureExtractor(cfg, runtime="torch")(images)
    for runtime in ("onnxruntime", "openvino"):
        torch.manual_seed(0)
        ext = FeatureExtractor(cfg, runtime=runtime, graph_dir=str(tmp_path))
        assert ext.runtime == runtime
        got = ext(images)
        for key in ("maps", "final"):
            assert got[key].shape == ref[key].shape and got[key].dtype == np.float32
            np.testing.assert_allclose(
                got[key], ref[key], atol=1e-4, rtol=0, err_msg=f"{runtime} {key}"
            )
    graphs = list(tmp_path.glob("*.onnx"))
    assert len(graphs) == 1  # exported once for both, keyed by backbone, taps, res, weights
    mtime = graphs[0].stat().st_mtime_ns
    torch.manual_seed(0)
    FeatureExtractor(cfg, runtime="onnxruntime", graph_dir=str(tmp_path))
    assert graphs[0].stat().st_mtime_ns == mtime  # reused, not exported again


def test_bf16_is_opt_in_close_to_fp32_and_part_of_the_store_key(tmp_path, rng):
    from medcae.distributed.store import store_key

    fp32 = BackboneConfig(taps=("stage5",), resolution=64)
    bf16 = BackboneConfig(taps=("stage5",), resolution=64, precision="bf16")
    images = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
    ref = FeatureExtractor(fp32, runtime="torch")(images)
    for runtime in ("openvino", "torch"):
        got = FeatureExtractor(bf16, runtime=runtime, graph_dir=str(tmp_path))(images)
        assert got["maps"].dtype == np.float32
        diff = np.abs(got["final"] - ref["final"]).max()
        scale = np.abs(ref["final"]).max()
        assert 0 < diff < 0.1 * scale, (runtime, diff, scale)  # rounded, not another network
    assert store_key("same images", fp32) != store_key("same images", bf16)
    with pytest.raises(RuntimeUnavailable, match="fp32 only.*--runtime openvino"):
        FeatureExtractor(bf16, runtime="onnxruntime", graph_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="backbone.precision must be fp32 or bf16, got 'fp16'"):
        BackboneConfig(precision="fp16")
    assert resolve_runtime("auto", "cpu", "bf16")[0] == "openvino"


def test_auto_is_the_fastest_exported_graph_on_cpu(tmp_path):
    ext = FeatureExtractor(BackboneConfig(taps=("stage4",), resolution=32), graph_dir=str(tmp_path))
    assert ext.runtime == "openvino"
    assert resolve_runtime("auto", "cuda") == (
        "torch",
        "auto: CUDA device, PyTorch with channels_last",
    )


def test_without_openvino_auto_takes_onnxruntime():
    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "from medcae.model.runtimes import resolve_runtime\n"
        "print('RUNTIME', *resolve_runtime('auto', 'cpu'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert "RUNTIME onnxruntime auto: exported fp32 graph" in out.stdout, out.stderr[-2000:]


def test_without_exported_graph_runtimes_auto_falls_back_and_says_why():
    """A machine without the packages: PyTorch alone still runs, and the log line says so."""
    code = (
        "import sys, logging\n"
        "sys.modules['onnxruntime'] = None; sys.modules['openvino'] = None\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from medcae.config import BackboneConfig\n"
        "from medcae.model.features import FeatureExtractor\n"
        "from medcae.model.runtimes import RuntimeUnavailable\n"
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


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "torch"])
def test_runners_take_concurrent_calls(runtime, tmp_path, rng):
    """A server's threads call one Predictor at once; every call gets its own right answer."""
    from concurrent.futures import ThreadPoolExecutor

    ext = FeatureExtractor(
        BackboneConfig(taps=("stage4",), resolution=32), runtime=runtime, graph_dir=str(tmp_path)
    )
    batches = [rng.integers(0, 256, (2, 32, 32), dtype=np.uint8) for _ in range(6)]
    expected = [ext(b)["final"] for b in batches]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda b: ext(b)["final"], batches * 4))
    for i, g in enumerate(got):
        np.testing.assert_allclose(g, expected[i % 6], atol=1e-5)

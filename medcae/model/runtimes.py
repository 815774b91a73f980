"""Inference runtimes for the frozen backbone: PyTorch, or an exported graph on OpenVINO or
ONNX Runtime, in fp32 or (opt-in) bf16.

The backbone is the dominant cost of extraction, evaluation and serving. On a CPU, OpenVINO and
ONNX Runtime run the same fp32 graph 3-5x faster than PyTorch eager. :func:`make_runner` picks
the runtime and says which ran and why. ``auto`` on a CPU takes the fastest one installed
(OpenVINO, then ONNX Runtime, measured by ``bench/extract.py``), PyTorch when neither is; on
CUDA, PyTorch with channels_last. Exported graphs are cached by (backbone, taps, resolution,
weights sha256) and written atomically, so runs and actors share them.

Precision is part of the model, not of the runtime: ``BackboneConfig.precision`` (``fp32`` or
``bf16``) is in the feature store's key and in the bundle, so a bundle's Predictor computes its
features the way its training features were computed. bf16 runs on OpenVINO (its CPU plugin
uses AVX-512 BF16/AMX where the CPU has them) or under PyTorch autocast; ONNX Runtime's CPU
provider is fp32 only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medcae.config import ConfigError
from medcae.model.backbones import RANDOM_WEIGHTS, FrozenBackbone, weights_sha256

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
#: ``auto``'s order on a CPU, fastest first (``bench/extract.py``, 2 threads, 112 px).
CPU_PREFERENCE = ("openvino", "onnxruntime")
OPSET = 17

#: ``runner(x)`` maps normalised images ``(B, 3, S, S)`` to ``{tap: maps, "final": pooled}``.
Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class RuntimeUnavailable(ConfigError):
    """The requested runtime cannot run here (package missing, or no such runtime)."""


def default_graph_dir() -> Path:
    """``$MEDCAE_CACHE_DIR/graphs``, else ``~/.cache/medcae/graphs``."""
    root = os.environ.get("MEDCAE_CACHE_DIR")
    return Path(root) / "graphs" if root else Path.home() / ".cache" / "medcae" / "graphs"


class _Outputs(nn.Module):
    """The frozen network with a tuple output (taps in order, then the pooled final layer)."""

    def __init__(self, backbone: FrozenBackbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.backbone(x)
        return tuple(feats[t] for t in self.backbone.taps) + (feats["final"],)


def graph_key(backbone: FrozenBackbone, weights: str | None) -> str:
    """Cache key of one exported graph: backbone, taps, resolution, weights sha256, opset."""
    sha = weights_sha256(backbone.spec.name, weights)
    if sha == RANDOM_WEIGHTS:  # every random init differs: key it by its actual values
        digest = hashlib.sha256()
        for tensor in backbone.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        sha = f"random:{digest.hexdigest()}"
    ident = {
        "name": backbone.spec.name,
        "taps": list(backbone.taps),
        "resolution": backbone.resolution,
        "weights_sha256": sha,
        "opset": OPSET,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def export_onnx(backbone: FrozenBackbone, path: Path) -> Path:
    """Export the backbone to ONNX (dynamic batch), written atomically to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [*backbone.taps, "final"]
    dummy = torch.zeros(2, 3, backbone.resolution, backbone.resolution)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about shapes and constants
            torch.onnx.export(
                _Outputs(backbone).eval(),
                (dummy,),
                tmp,
                input_names=["x"],
                output_names=names,
                dynamic_axes={n: {0: "batch"} for n in ["x", *names]},
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _graph(backbone: FrozenBackbone, weights: str | None, graph_dir: Path) -> Path:
    """The cached ONNX graph of ``backbone``, exported on first use."""
    path = Path(graph_dir) / f"{backbone.spec.name}-{graph_key(backbone, weights)}.onnx"
    if not path.is_file():
        export_onnx(backbone, path)
        log.info("exported %s to %s", backbone.spec.name, path)
    return path


def _onnx_runner(
    backbone: FrozenBackbone, weights: str | None, graph_dir: Path, threads: int
) -> Runner:
    import onnxruntime as ort

    path = _graph(backbone, weights, graph_dir)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [*backbone.taps, "final"]

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        outs = session.run(names, {"x": arr})
        return {n: torch.from_numpy(o) for n, o in zip(names, outs)}

    return run


def _openvino_runner(
    backbone: FrozenBackbone, weights: str | None, graph_dir: Path, threads: int, precision: str
) -> Runner:
    import openvino as ov

    path = _graph(backbone, weights, graph_dir)
    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all threads on it
        "CACHE_DIR": str(Path(graph_dir) / "openvino-cache"),  # compiled blobs: faster start
    }
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    busy = threading.Lock()  # an infer request serves one call at a time ("Infer Request is
    # busy" otherwise); each call already uses every thread, so callers queue here
    names = [*backbone.taps, "final"]
    ports = [compiled.output(n) for n in names]

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        with busy:
            out = request.infer({0: arr})
            return {n: torch.from_numpy(np.array(out[p], copy=True)) for n, p in zip(names, ports)}

    return run


def _autocast_runner(backbone: FrozenBackbone, device: torch.device) -> Runner:
    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            feats = backbone(x)
        return {k: v.float() for k, v in feats.items()}

    return run


def _installed(module: str) -> str | None:
    """``None`` when ``module`` imports, else the import error's text."""
    try:
        __import__(module)
    except ImportError as err:
        return str(err)
    return None


def resolve_runtime(
    runtime: str, device: torch.device | str = "cpu", precision: str = "fp32"
) -> tuple[str, str]:
    """Which runtime ``runtime`` means on ``device`` at ``precision`` here, and why.

    Nothing is built or exported.

    Raises:
        RuntimeUnavailable: An unknown name or precision, or an explicit runtime that cannot run
            here (package missing, CUDA, or bf16 on ONNX Runtime).
    """
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")
    if precision not in PRECISIONS:
        raise RuntimeUnavailable(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    on_cuda = torch.device(device).type == "cuda"
    cast = ", bf16 autocast" if precision == "bf16" else ""
    if runtime == "torch":
        return "torch", f"asked for{cast}"
    if on_cuda:
        if runtime != "auto":
            raise RuntimeUnavailable(f"{runtime} runs on the CPU here; use --runtime torch")
        return "torch", f"auto: CUDA device, PyTorch with channels_last{cast}"
    if runtime == "onnxruntime" and precision == "bf16":
        raise RuntimeUnavailable(
            "onnxruntime's CPU provider runs fp32 only; use --precision fp32, "
            "or --runtime openvino (or torch) for bf16"
        )
    if runtime != "auto":
        missing = _installed(runtime)
        if missing:
            raise RuntimeUnavailable(f"{runtime} is not installed ({missing})")
        return runtime, "asked for"
    candidates = [r for r in CPU_PREFERENCE if precision == "fp32" or r == "openvino"]
    reasons = []
    for name in candidates:
        missing = _installed(name)
        if missing is None:
            return name, f"auto: exported {precision} graph on the CPU"
        reasons.append(f"{name} is not installed ({missing})")
    return "torch", f"auto: {'; '.join(reasons)}; PyTorch{cast} instead"


def make_runner(
    backbone: FrozenBackbone,
    runtime: str = "auto",
    device: torch.device | str = "cpu",
    weights: str | None = None,
    graph_dir: str | Path | None = None,
    threads: int = 0,
    precision: str = "fp32",
) -> tuple[Runner, str, str]:
    """The runner for ``runtime``, the runtime's name, and why it was chosen.

    Args:
        backbone: The frozen, tapped network (on ``device``).
        runtime: ``auto``, ``torch``, ``onnxruntime`` or ``openvino`` (:func:`resolve_runtime`).
        device: Where the backbone runs; ``auto`` keeps PyTorch on CUDA.
        weights: The backbone's weights argument (for the graph cache key).
        graph_dir: Where exported graphs are cached (default :func:`default_graph_dir`).
        threads: Intra-op threads of an exported-graph runtime (0: torch's setting).
        precision: ``fp32``, or ``bf16`` (OpenVINO, or PyTorch autocast).

    Raises:
        RuntimeUnavailable: An explicitly requested runtime that cannot run here.
    """
    name, why = resolve_runtime(runtime, device, precision)
    graphs = Path(graph_dir or default_graph_dir())
    if name == "torch":
        run = backbone if precision == "fp32" else _autocast_runner(backbone, torch.device(device))
        return run, name, why
    if name == "openvino":
        return _openvino_runner(backbone, weights, graphs, threads, precision), name, why
    return _onnx_runner(backbone, weights, graphs, threads), name, why

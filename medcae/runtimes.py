"""Inference runtimes for the frozen backbone: PyTorch, or an exported graph on ONNX Runtime.

The backbone is the dominant cost of extraction, evaluation and serving. On a CPU, ONNX Runtime
runs the same fp32 graph about 3x faster than PyTorch eager. :func:`make_runner` picks the
runtime (``auto``: ONNX Runtime on CPU when it is installed, PyTorch on CUDA or when it is not)
and says which ran and why. Exported graphs are cached by (backbone, taps, resolution, weights
sha256) and written atomically, so runs and actors share them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medcae.backbones import RANDOM_WEIGHTS, FrozenBackbone, weights_sha256
from medcae.config import ConfigError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnxruntime")
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


def _onnx_runner(
    backbone: FrozenBackbone, weights: str | None, graph_dir: Path, threads: int
) -> Runner:
    import onnxruntime as ort

    path = Path(graph_dir) / f"{backbone.spec.name}-{graph_key(backbone, weights)}.onnx"
    if not path.is_file():
        export_onnx(backbone, path)
        log.info("exported %s to %s", backbone.spec.name, path)
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


def resolve_runtime(runtime: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """Which runtime ``runtime`` means on ``device`` here, and why (nothing is built).

    Raises:
        RuntimeUnavailable: An unknown name, or an explicit runtime that cannot run here.
    """
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown runtime {runtime!r}; expected one of {RUNTIMES}")
    on_cuda = torch.device(device).type == "cuda"
    if runtime == "torch":
        return "torch", "asked for"
    if on_cuda:
        if runtime == "onnxruntime":
            raise RuntimeUnavailable("onnxruntime runs on the CPU here; use --runtime torch")
        return "torch", "auto: CUDA device, PyTorch with channels_last"
    try:
        import onnxruntime  # noqa: F401
    except ImportError as err:
        if runtime == "onnxruntime":
            raise RuntimeUnavailable(f"onnxruntime is not installed ({err})") from err
        return "torch", f"auto: onnxruntime is not installed ({err}); PyTorch instead"
    why = "asked for" if runtime == "onnxruntime" else "auto: exported fp32 graph on the CPU"
    return "onnxruntime", why


def make_runner(
    backbone: FrozenBackbone,
    runtime: str = "auto",
    device: torch.device | str = "cpu",
    weights: str | None = None,
    graph_dir: str | Path | None = None,
    threads: int = 0,
) -> tuple[Runner, str, str]:
    """The runner for ``runtime``, the runtime's name, and why it was chosen.

    Args:
        backbone: The frozen, tapped network (on ``device``).
        runtime: ``auto``, ``torch`` or ``onnxruntime`` (:func:`resolve_runtime`).
        device: Where the backbone runs; ``auto`` keeps PyTorch on CUDA.
        weights: The backbone's weights argument (for the graph cache key).
        graph_dir: Where exported graphs are cached (default :func:`default_graph_dir`).
        threads: Intra-op threads for ONNX Runtime (0: torch's setting).

    Raises:
        RuntimeUnavailable: An explicitly requested runtime that cannot run here.
    """
    name, why = resolve_runtime(runtime, device)
    if name == "torch":
        return backbone, name, why
    run = _onnx_runner(backbone, weights, Path(graph_dir or default_graph_dir()), threads)
    return run, name, why

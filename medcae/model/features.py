"""Backbone feature extraction as a plain PyTorch batch function (no Ray).

:class:`FeatureExtractor` is what a Ray Data actor holds, what the Predictor calls, and what
the benchmark times, so all three compute exactly the same features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from medcae.config import BackboneConfig
from medcae.data.preprocess import combine_taps, prepare_batch, to_model_input
from medcae.model.backbones import FrozenBackbone, build_backbone
from medcae.model.runtimes import make_runner

log = logging.getLogger(__name__)

# float32, not float16: rounding to half precision turns 1e-7 differences between batch sizes or
# thread counts into 1e-3 jumps, and served probabilities must match offline ones to 1e-5.
MAPS_DTYPE = np.float32


class FeatureExtractor:
    """Maps uint8 images to (tap feature map, pooled final features).

    Args:
        cfg: Backbone configuration.
        device: Torch device string.
        channels_last: Use channels-last memory format for PyTorch (about 1.7x faster on CPU).
        runtime: ``auto``, ``torch``, ``onnxruntime`` or ``openvino``
        (:mod:`medcae.model.runtimes`);
            the precision is the config's.
        graph_dir: Where exported graphs are cached.
        threads: Intra-op threads of an exported-graph runtime (0: torch's setting).
    """

    def __init__(
        self,
        cfg: BackboneConfig,
        device: str = "cpu",
        channels_last: bool = True,
        runtime: str = "auto",
        graph_dir: str | None = None,
        threads: int = 0,
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.backbone: FrozenBackbone = build_backbone(
            cfg.name, cfg.taps or None, cfg.resolution, cfg.weights
        ).to(self.device)
        self.run, self.runtime, why = make_runner(
            self.backbone, runtime, self.device, cfg.weights, graph_dir, threads, cfg.precision
        )
        self.channels_last = channels_last and self.runtime == "torch"
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        log.info("backbone %s runs on %s, %s (%s)", cfg.name, self.runtime, cfg.precision, why)

    @property
    def taps(self) -> tuple[str, ...]:
        """The tap names actually used (the config's, or the backbone default)."""
        return self.backbone.taps

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Extract features for one batch.

        Args:
            images: Decoded images of any size and mode (a list, or one array
                ``(batch, H, W[, 3])``); :func:`~medcae.data.preprocess.prepare_batch` resizes each
                once (a no-op for images the decode stage already prepared).

        Returns:
            ``{"maps": (batch, C, h, w) float32, "final": (batch, C_final) float32}``.
        """
        spec = self.backbone.spec
        prepared = prepare_batch(images, self.cfg.resolution)
        x = to_model_input(prepared, spec.mean, spec.std, self.channels_last)
        feats = self.run(x.to(self.device))
        maps = combine_taps(feats, self.taps)
        return {
            "maps": maps.float().cpu().numpy().astype(MAPS_DTYPE),
            "final": feats["final"].float().cpu().numpy(),
        }

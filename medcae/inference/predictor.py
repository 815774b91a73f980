"""One predictor for evaluation, the CLI and Serve: raw images in, class probabilities out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcae.config import PipelineConfig
from medcae.inference.bundle import read_bundle
from medcae.inference.card import model_card
from medcae.model.cae import ConvAutoEncoder
from medcae.model.classifier import LinearHead
from medcae.model.features import FeatureExtractor
from medcae.model.operating_point import OperatingPoint
from medcae.model.representations import get_representation, tap_pool

ImageLike = np.ndarray | bytes


@dataclass
class Prediction:
    """One image's result.

    Attributes:
        label: The decision at the bundle's operating point.
        probabilities: Calibrated probabilities by class name.
        reconstruction_error: The CAE's error on the image's maps.
        in_distribution: The error is within the bundle's threshold.
        threshold: The operating point's threshold on the positive class's probability, or
            None where the label is the most probable class.
        positive: The class that threshold applies to, else None.
        findings: A multi-label model's decision per finding (``label`` then joins the
            present ones with ``|``, or says ``no finding``), else None.
        thresholds: Each finding's threshold, else None.
    """

    label: str
    probabilities: dict[str, float]
    reconstruction_error: float
    in_distribution: bool
    threshold: float | None = None
    positive: str | None = None
    findings: dict[str, bool] | None = None
    thresholds: dict[str, float] | None = None


class Predictor:
    """Frozen backbone -> CAE codes -> linear head.

    Args:
        extractor: Backbone feature extractor.
        cae: Trained auto-encoder.
        head: Fitted linear classifier.
        label_names: Class names, index = class id.
        meta: Bundle metadata (for ``GET /v1/model`` and reports); a loaded bundle's holds
            its model card under ``"model_card"``.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        cae: ConvAutoEncoder,
        head: LinearHead,
        label_names: Sequence[str],
        meta: dict[str, Any] | None = None,
    ):
        self.extractor = extractor
        self.cae = cae.eval()
        self.head = head
        self.label_names = list(label_names)
        self.meta = meta or {}
        self.ood_threshold = float(self.meta.get("ood", {}).get("threshold", np.inf))
        # Bundles from before operating points decide by argmax, uncalibrated.
        op = self.meta.get("operating_point") or {}
        self.multilabel = self.meta.get("task") == "multilabel"
        self.finding_points = (
            [OperatingPoint.from_dict(op["findings"][n]) for n in self.label_names]
            if "findings" in op
            else None
        )
        self.operating_point = OperatingPoint.from_dict(None if "findings" in op else op)
        # Bundles from before the representation choice hold a head on CAE codes.
        self.representation = get_representation(
            (self.meta.get("representation") or {}).get("name", "cae")
        )

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "cpu", runtime: str = "auto") -> Predictor:
        """Load a bundle folder written by the pipeline.

        Args:
            path: Bundle folder.
            device: Torch device.
            runtime: Backbone runtime (``auto``, ``torch``, ``onnxruntime``, ``openvino``); fp32
                runtimes agree to 1e-4 on the maps, whichever made the bundle's features. The
                precision is the bundle's (``backbone.precision``), as its features were made.
        """
        meta, state, arrays = read_bundle(path)
        cfg = PipelineConfig.from_dict(meta["config"])
        _check_backbone_weights(meta, cfg, path)
        cae = ConvAutoEncoder(meta["in_channels"], cfg.cae)
        cae.load_state_dict(state)
        multilabel = meta.get("task") == "multilabel"
        head = LinearHead.from_arrays(
            cfg.classifier.kind, len(meta["label_names"]), arrays, multilabel=multilabel
        )
        extractor = FeatureExtractor(cfg.backbone, device, runtime=runtime)
        return cls(extractor, cae, head, meta["label_names"], meta)

    @property
    def card(self) -> str:
        """The model card (Markdown): the bundle's verified ``MODEL_CARD.md``, or one rendered
        from the metadata for a predictor built without a bundle."""
        text = self.meta.get("model_card")
        return text if isinstance(text, str) else model_card(self.meta)

    def maps(self, images: np.ndarray | Sequence[ImageLike]) -> np.ndarray:
        """Backbone feature maps ``(N, C, h, w)`` (float32, as in the feature store)."""
        return self.backbone(images)["maps"]

    def backbone(self, images: np.ndarray | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """The frozen backbone's ``maps`` ``(N, C, h, w)`` and pooled ``final`` ``(N, C')``.

        Encoded bytes are decoded as the extraction stage decodes them (an image at least
        twice the resolution shrunk by an integer block mean in its own type); every image is
        then prepared as that stage prepares it (:func:`medcae.data.preprocess.prepare_image`: one
        resize), whatever its size or colour mode.
        """
        from medcae.data import decode_image

        if isinstance(images, np.ndarray):
            return self.extractor(images)
        side = self.extractor.cfg.resolution  # shrink big scans in their own type, as the store did
        arrays = [
            decode_image(im, reduce_to=side) if isinstance(im, bytes) else np.asarray(im)
            for im in images
        ]
        if not arrays:
            raise ValueError("no images to predict")
        return self.extractor(arrays)

    @torch.no_grad()
    def predict_arrays(self, images: np.ndarray | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """Probabilities ``(N, K)``, reconstruction errors ``(N,)`` and the head's input vectors
        ``(N, D)`` (:meth:`head_outputs`) for a batch of images.

        Args:
            images: uint8 ``(N, H, W)`` / ``(N, H, W, 3)``, or a list of arrays or encoded bytes.
        """
        return self.head_outputs(self.backbone(images))

    @torch.no_grad()
    def head_outputs(self, backbone: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """:meth:`predict_arrays` from the backbone's output (:meth:`backbone`), for callers
        that also need the maps and should not run the backbone twice.

        Returns:
            ``proba`` ``(N, K)``, ``error`` ``(N,)`` and ``features`` ``(N, D)``: the head's
            input vectors (:meth:`features`), which ranking for labeling clusters.
        """
        x = torch.from_numpy(backbone["maps"]).float()
        features = self.features(backbone, x)
        return {
            "proba": self.head.predict_proba(features),
            "error": self.cae.reconstruction_error(x).numpy(),
            "features": features,
        }

    @torch.no_grad()
    def features(
        self, backbone: dict[str, np.ndarray], x: torch.Tensor | None = None
    ) -> np.ndarray:
        """The head's input vectors, as the bundle's representation builds them from the
        backbone's output (``x``: its maps as a tensor, when already made)."""
        maps = backbone["maps"]
        parts = self.representation.parts
        arrays: dict[str, np.ndarray] = {}
        if "codes" in parts:
            x = torch.from_numpy(maps).float() if x is None else x
            arrays["codes"] = self.cae.embed(x).numpy()
        if "tap" in parts:
            arrays["tap"] = tap_pool(maps)
        if "final" in parts:
            arrays["final"] = backbone["final"]
        return self.representation.features(arrays)

    def predict_proba(self, images: np.ndarray | Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities ``(N, K)``."""
        return self.predict_arrays(images)["proba"]

    def predict(self, images: np.ndarray | Sequence[ImageLike]) -> list[Prediction]:
        """Label, probabilities and out-of-distribution flag per image."""
        return self.predictions(self.predict_arrays(images))

    def predictions(self, out: dict[str, np.ndarray]) -> list[Prediction]:
        """:class:`Prediction` per image from :meth:`predict_arrays`' (or
        :meth:`head_outputs`') arrays."""
        if self.multilabel:
            return self._finding_predictions(out)
        op = self.operating_point
        decided = op.decide(out["proba"])
        threshold = op.threshold if op.positive is not None else None
        positive = self.label_names[op.positive] if op.positive is not None else None
        return [
            Prediction(
                label=self.label_names[int(c)],
                probabilities=dict(zip(self.label_names, map(float, p))),
                reconstruction_error=float(e),
                in_distribution=bool(e <= self.ood_threshold),
                threshold=threshold,
                positive=positive,
            )
            for p, e, c in zip(out["proba"], out["error"], decided)
        ]

    def _finding_predictions(self, out: dict[str, np.ndarray]) -> list[Prediction]:
        """Each finding against its own threshold (0.5 for a bundle without them)."""
        points = self.finding_points or [OperatingPoint("argmax", threshold=0.5)] * len(
            self.label_names
        )
        thresholds = {n: float(op.threshold or 0.5) for n, op in zip(self.label_names, points)}
        preds = []
        for p, e in zip(out["proba"], out["error"]):
            present = {n: bool(q >= thresholds[n]) for n, q in zip(self.label_names, p)}
            label = "|".join(n for n, yes in present.items() if yes) or NO_FINDING_LABEL
            preds.append(
                Prediction(
                    label=label,
                    probabilities=dict(zip(self.label_names, map(float, p))),
                    reconstruction_error=float(e),
                    in_distribution=bool(e <= self.ood_threshold),
                    findings=present,
                    thresholds=thresholds,
                )
            )
        return preds


NO_FINDING_LABEL = "no finding"


def check_bundle(
    path: str | Path, device: str = "cpu", runtime: str = "auto"
) -> tuple[dict[str, Any], PipelineConfig]:
    """What :meth:`Predictor.from_bundle` checks, without building the model: for a driver
    that loads the bundle elsewhere (Ray actors) and should fail first, with one clear line.

    Returns:
        ``(meta, config)`` of the bundle.

    Raises:
        BundleError: A missing, incomplete or altered bundle, or other backbone weights.
        RuntimeUnavailable: ``runtime`` cannot run on ``device`` here.
    """
    from medcae.model.runtimes import resolve_runtime

    meta, _, _ = read_bundle(path)
    cfg = PipelineConfig.from_dict(meta["config"])
    _check_backbone_weights(meta, cfg, path)
    resolve_runtime(runtime, device, cfg.backbone.precision)
    return meta, cfg


def _check_backbone_weights(meta: dict, cfg: PipelineConfig, path: str | Path) -> None:
    """Refuse a bundle whose backbone weights are not the ones it was trained with."""
    from medcae.inference.bundle import BundleError
    from medcae.model.backbones import RANDOM_WEIGHTS, weights_sha256

    recorded = meta.get("preprocessing", {}).get("weights_sha256")
    if recorded in (None, RANDOM_WEIGHTS):  # older bundles; random weights cannot match anyway
        return
    here = weights_sha256(cfg.backbone.name, cfg.backbone.weights)
    if here != recorded:
        raise BundleError(
            f"{path}: the {cfg.backbone.name} weights here (sha256 {here}) are not the ones the "
            f"bundle was trained with (sha256 {recorded}); its features would differ"
        )

"""Fit the classifier on a label budget, choose on validation, and test once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medcae.backbones import get_spec, weights_sha256
from medcae.bundle import write_bundle
from medcae.cae import ConvAutoEncoder
from medcae.classifier import LinearHead, fit_classifier
from medcae.config import ClassifierConfig, PipelineConfig
from medcae.metrics import classification_report
from medcae.preprocess import PREPARE_VERSION


@dataclass
class Evaluated:
    """A fitted head with its validation choice and its one test report."""

    head: LinearHead
    selection: dict[str, float]
    test: dict[str, Any]


def fit_and_test(
    cfg: ClassifierConfig,
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    label_names: Sequence[str],
) -> Evaluated:
    """Fit on the train budget, pick C on val, then evaluate on test exactly once.

    Args:
        cfg: Classifier configuration.
        feats: ``{"train"|"val"|"test": (N, D)}`` feature vectors.
        labels: ``{"train"|"val"|"test": (N,)}`` labels.
        label_names: Class names.
    """
    k = len(label_names)
    head, selection = fit_classifier(
        cfg, feats["train"], labels["train"], feats["val"], labels["val"], k
    )
    report = classification_report(labels["test"], head.predict_proba(feats["test"]), label_names)
    return Evaluated(head, selection, report)


OOD_QUANTILE = 0.99


def save_model(
    path: str | Path,
    cfg: PipelineConfig,
    data_name: str,
    label_names: Sequence[str],
    cae: ConvAutoEncoder,
    fitted: Evaluated,
    val_errors: np.ndarray,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write a model bundle, calibrating the out-of-distribution threshold on validation maps.

    Args:
        path: Bundle folder.
        cfg: Resolved pipeline config (backbone taps filled in).
        data_name: Name of the labeled data set.
        label_names: Class names.
        cae: Trained auto-encoder.
        fitted: The fitted head with its selection and test report.
        val_errors: The CAE's reconstruction errors ``(M,)`` of the validation maps; the
            threshold is their ``OOD_QUANTILE`` quantile.
        metrics: Extra metrics stored next to the test report (baselines, history).
    """
    spec = get_spec(cfg.backbone.name)
    errors = np.asarray(val_errors, np.float64)
    meta = {
        "config": cfg.to_dict(),
        "data": data_name,
        "label_names": list(label_names),
        "in_channels": cae.in_channels,
        "preprocessing": {
            "resolution": cfg.backbone.resolution,
            "prepare": "medcae.preprocess.prepare_image",
            "prepare_version": PREPARE_VERSION,
            "weights_sha256": weights_sha256(cfg.backbone.name, cfg.backbone.weights),
            "grayscale_to_rgb": True,
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "classifier": {"kind": cfg.classifier.kind, **fitted.selection},
        "metrics": {"test": fitted.test, **(metrics or {})},
        "ood": {
            "threshold": float(np.quantile(errors, OOD_QUANTILE)),
            "quantile": OOD_QUANTILE,
            "calibrated_on": "val",
        },
    }
    return write_bundle(path, meta, cae.state_dict(), fitted.head.to_arrays())

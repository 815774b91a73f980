"""From a fitted evaluation to a model bundle: the metadata, the OOD threshold, the card's
intervals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcae.config import PipelineConfig
from medcae.data.preprocess import PREPARE_VERSION
from medcae.evaluation.protocol import Evaluated
from medcae.inference.bundle import write_bundle
from medcae.inference.card import data_summary
from medcae.metrics.findings import bootstrap_findings_intervals
from medcae.metrics.intervals import bootstrap_intervals
from medcae.model.backbones import get_spec, weights_sha256
from medcae.model.cae import ConvAutoEncoder

#: The OOD threshold: this quantile of the validation maps' reconstruction errors.
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
    labels: Mapping[str, np.ndarray] | None = None,
    unlabeled: int = 0,
    representation: Mapping[str, Any] | None = None,
    multilabel: bool = False,
) -> Path:
    """Write a model bundle, calibrating the out-of-distribution threshold on validation maps.

    The model card's test intervals are bootstrapped from ``fitted.test_labels`` and
    ``fitted.test_proba`` when the fit kept them (:func:`fit_and_test` does).

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
        labels: ``{"train"|"val"|"test": (N,)}`` labels of the images each split used, for
            the model card's counts per class and split; without them the card says the
            counts were not recorded.
        unlabeled: Images of the unlabeled pool the auto-encoder also trained on.
        representation: The head's input and why (:class:`medcae.model.representations.Choice`
            as a dict); default: the config's, or ``cae``.
        multilabel: The labels are findings (bitmasks; ``label_names`` the findings).
    """
    spec = get_spec(cfg.backbone.name)
    rep_name = cfg.classifier.representation
    rep_name = "cae" if rep_name == "auto" else rep_name
    errors = np.asarray(val_errors, np.float64)
    meta = {
        "config": cfg.to_dict(),
        "data": data_name,
        "label_names": list(label_names),
        "task": "multilabel" if multilabel else "multiclass",
        "in_channels": cae.in_channels,
        "preprocessing": {
            "resolution": cfg.backbone.resolution,
            "prepare": "medcae.data.preprocess.prepare_image",
            "prepare_version": PREPARE_VERSION,
            "weights_sha256": weights_sha256(cfg.backbone.name, cfg.backbone.weights),
            "grayscale_to_rgb": True,
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "classifier": {"kind": cfg.classifier.kind, **fitted.selection},
        "representation": dict(
            representation or {"name": rep_name, "reason": f"{rep_name}: set by the config"}
        ),
        "metrics": {"test": fitted.test, **(metrics or {}), **_intervals(fitted)},
        **_decision(fitted),
        "ood": {
            "threshold": float(np.quantile(errors, OOD_QUANTILE)),
            "quantile": OOD_QUANTILE,
            "calibrated_on": "val",
        },
    }
    if labels is not None:
        meta["data_summary"] = data_summary(label_names, labels, unlabeled, multilabel)
    figures = {}
    if meta.get("calibration"):
        from medcae.evaluation.report import reliability_png

        figures["reliability.png"] = reliability_png(
            meta["calibration"], f"{data_name}: reliability"
        )
    return write_bundle(path, meta, cae.state_dict(), fitted.head.to_arrays(), figures)


def _intervals(fitted: Evaluated) -> dict[str, Any]:
    """``{"test_ci": ...}`` bootstrapped from the fit's test predictions, if it kept them."""
    if fitted.test_labels is None or fitted.test_proba is None:
        return {}
    pred = fitted.test_pred if fitted.operating_point is not None else None
    if isinstance(fitted.operating_point, list):
        ci = bootstrap_findings_intervals(fitted.test_labels, fitted.test_proba, pred)
        return {"test_ci": ci}
    return {"test_ci": bootstrap_intervals(fitted.test_labels, fitted.test_proba, pred=pred)}


def _decision(fitted: Evaluated) -> dict[str, Any]:
    """The calibration and the operating point the Predictor applies, with their figures
    (nothing for a fit from before them: the bundle then decides by argmax)."""
    if fitted.calibration is None or fitted.operating_point is None:
        return {}
    if isinstance(fitted.operating_point, list) and isinstance(fitted.calibration, list):
        names = list(fitted.test["per_class"])
        methods = sorted({c.method for c in fitted.calibration})
        return {
            "calibration": {
                "method": "/".join(methods),
                "reason": "per finding, each chosen on validation: "
                + "; ".join(f"{n}: {c.reason}" for n, c in zip(names, fitted.calibration)),
                "findings": {n: c.to_dict() for n, c in zip(names, fitted.calibration)},
                "val": fitted.val_calibration,
                "test": {k: v for k, v in fitted.test["calibration"].items() if k != "per_finding"},
            },
            "operating_point": {
                "findings": {n: op.to_dict() for n, op in zip(names, fitted.operating_point)}
            },
        }
    return {
        "calibration": {
            **fitted.calibration.to_dict(),
            "val": fitted.val_calibration,
            "test": fitted.test.get("calibration"),
        },
        "operating_point": fitted.operating_point.to_dict(),
    }

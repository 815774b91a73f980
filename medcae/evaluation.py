"""Fit the classifier on a label budget, choose on validation, and test once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medcae.classifier import LinearHead, fit_classifier
from medcae.config import ClassifierConfig
from medcae.metrics import classification_report


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

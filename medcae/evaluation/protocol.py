"""Fit the classifier on a label budget, choose its input and C on validation, and test once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from medcae.config import ClassifierConfig
from medcae.metrics.calibration import calibration_report
from medcae.metrics.classification import auc_score, classification_report
from medcae.metrics.decision import decision_report
from medcae.metrics.findings import as_matrix, findings_report, mean_finding_auc
from medcae.model.calibration import Calibration, fit_calibration
from medcae.model.classifier import LinearHead, average_heads, fit_classifier, fit_findings
from medcae.model.operating_point import OperatingPoint, choose_operating_point
from medcae.model.representations import (
    PRIOR,
    REPRESENTATIONS,
    Choice,
    Representation,
    choose,
    get_representation,
)


@dataclass
class Evaluated:
    """A fitted, calibrated head with its validation choices and its one test report.

    Attributes:
        head: The fitted classifier, calibrated.
        selection: ``{"C", "val_auc", "n_labels"}`` of the validation choice.
        test: The test report (:func:`medcae.metrics.classification.classification_report`
            of the operating point's decisions, with ``decision``: what they are worth,
            :func:`medcae.metrics.decision.decision_report`, and ``calibration``: ECE, Brier
            and log-loss before and after calibration).
        test_labels: ``(N,)`` test labels the report was computed on.
        test_proba: ``(N, K)`` the head's test probabilities, rows as ``test_labels``.
        calibration: How the probabilities were calibrated on validation (for findings, one
            per finding).
        operating_point: The decision rule chosen on validation (for findings, one each).
        val_calibration: ECE, Brier and log-loss on validation before and after (for
            findings, over every image and finding pooled).
    """

    head: LinearHead
    selection: dict[str, float]
    test: dict[str, Any]
    test_labels: np.ndarray | None = None
    test_proba: np.ndarray | None = None
    calibration: Calibration | list[Calibration] | None = None
    operating_point: OperatingPoint | list[OperatingPoint] | None = None
    val_calibration: dict[str, Any] | None = None

    @property
    def test_pred(self) -> np.ndarray | None:
        """The operating point's test decisions: ``(N,)`` classes, or ``(N, F)`` 0/1
        findings."""
        if self.test_proba is None:
            return None
        if isinstance(self.operating_point, list):
            return decide_findings(self.operating_point, self.test_proba)
        op = self.operating_point or OperatingPoint("argmax")
        return op.decide(self.test_proba)


def decide_findings(ops: list[OperatingPoint], proba: np.ndarray) -> np.ndarray:
    """``(N, F)`` 0/1: each finding's probability against its own threshold."""
    return np.stack([proba[:, j] >= op.threshold for j, op in enumerate(ops)], axis=1).astype(
        np.int64
    )


def _pooled(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (image, finding) pair as one two-class row, for pooled calibration figures."""
    p = proba.ravel()
    return y.ravel(), np.stack([1 - p, p], axis=1)


def calibrate_findings_and_test(
    cfg: ClassifierConfig,
    head: LinearHead,
    selection: dict[str, Any],
    x: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    names: Sequence[str],
) -> Evaluated:
    """:func:`calibrate_and_test` for findings: each finding calibrated on validation and
    given its own operating point there (``auto``: youden), then tested once."""
    f = len(names)
    y_val, y_test = as_matrix(labels["val"], f), as_matrix(labels["test"], f)
    cals, ops, platt = [], [], np.asarray(head.platt, np.float64).copy()
    for j, name in enumerate(names):
        one = head.finding(j)
        cal = fit_calibration(one, x["val"], y_val[:, j], cfg.calibration, seed=cfg.seed)
        cals.append(cal)
        calibrated = cal.apply(one)
        platt[j] = calibrated.platt[0]
        rule = "youden" if cfg.operating_point == "auto" else cfg.operating_point
        p_val = calibrated.predict_proba(x["val"])
        ops.append(choose_operating_point(rule, y_val[:, j], p_val, what=f"finding {name!r}"))
    calibrated = replace(head, platt=platt)
    raw_val, val_proba = head.predict_proba(x["val"]), calibrated.predict_proba(x["val"])
    raw_test, proba = head.predict_proba(x["test"]), calibrated.predict_proba(x["test"])
    pred = decide_findings(ops, proba)
    report = findings_report(y_test, proba, pred, names)
    report["calibration"] = _before_after(*_pooled(y_test, raw_test), _pooled(y_test, proba)[1])
    report["calibration"]["per_finding"] = {
        n: {
            "before": calibration_report(*_pooled(y_test[:, j], raw_test[:, j])),
            "after": calibration_report(*_pooled(y_test[:, j], proba[:, j])),
        }
        for j, n in enumerate(names)
    }
    report["operating_point"] = {n: op.to_dict() for n, op in zip(names, ops)}
    val_cal = _before_after(*_pooled(y_val, raw_val), _pooled(y_val, val_proba)[1])
    return Evaluated(calibrated, selection, report, y_test, proba, cals, ops, val_cal)


def _before_after(y: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    return {"before": calibration_report(y, before), "after": calibration_report(y, after)}


def calibrate_and_test(
    cfg: ClassifierConfig,
    head: LinearHead,
    selection: dict[str, Any],
    x: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    label_names: Sequence[str],
    multilabel: bool = False,
) -> Evaluated:
    """Calibrate ``head`` on validation, choose its operating point there, and test once.

    Args:
        cfg: Classifier configuration (``calibration``, ``operating_point``).
        head: The fitted, uncalibrated head.
        selection: Its validation choice.
        x: ``{"val"|"test": (N, D)}`` its input vectors.
        labels: Labels per split (``train`` gives the prior of several classes).
        label_names: Class names (for findings, the finding names).
        multilabel: A head per finding (:func:`calibrate_findings_and_test`).
    """
    if multilabel:
        return calibrate_findings_and_test(cfg, head, selection, x, labels, label_names)
    y_val, y_test = np.asarray(labels["val"]), np.asarray(labels["test"])
    k = len(label_names)
    prior = np.bincount(np.asarray(labels["train"]), minlength=k) if "train" in labels else None
    cal = fit_calibration(head, x["val"], y_val, cfg.calibration, prior=prior, seed=cfg.seed)
    calibrated = cal.apply(head)
    val_proba = calibrated.predict_proba(x["val"])
    op = choose_operating_point(cfg.operating_point, y_val, val_proba)
    raw_test, proba = head.predict_proba(x["test"]), calibrated.predict_proba(x["test"])
    pred = op.decide(proba)
    report = classification_report(y_test, proba, label_names, pred=pred)
    report["decision"] = decision_report(y_test, proba, pred, label_names, op.positive)
    report["calibration"] = _before_after(y_test, raw_test, proba)
    report["operating_point"] = op.to_dict()
    return Evaluated(
        calibrated,
        selection,
        report,
        y_test,
        proba,
        cal,
        op,
        _before_after(y_val, head.predict_proba(x["val"]), val_proba),
    )


def fit_and_test(
    cfg: ClassifierConfig,
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    label_names: Sequence[str],
    multilabel: bool = False,
) -> Evaluated:
    """Fit on the train budget, pick C on val, then evaluate on test exactly once.

    Args:
        cfg: Classifier configuration.
        feats: ``{"train"|"val"|"test": (N, D)}`` feature vectors.
        labels: ``{"train"|"val"|"test": (N,)}`` labels (for findings, bitmasks).
        label_names: Class names (for findings, the finding names).
        multilabel: One head per finding.
    """
    head, selection = _fit(cfg, feats, labels, label_names, multilabel)
    return calibrate_and_test(cfg, head, selection, feats, labels, label_names, multilabel)


def _fit(
    cfg: ClassifierConfig,
    feats: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray],
    label_names: Sequence[str],
    multilabel: bool,
) -> tuple[LinearHead, dict[str, Any]]:
    if multilabel:
        f = len(label_names)
        y = {s: as_matrix(labels[s], f) for s in ("train", "val")}
        return fit_findings(cfg, feats["train"], y["train"], feats["val"], y["val"])
    k = len(label_names)
    return fit_classifier(cfg, feats["train"], labels["train"], feats["val"], labels["val"], k)


def fit_representations(
    cfg: ClassifierConfig,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    label_names: Sequence[str],
    multilabel: bool = False,
) -> tuple[dict[str, Evaluated], Choice]:
    """Fit the head on each candidate representation and pick one on validation (for
    findings, on the mean validation AUC over findings).

    Args:
        cfg: Classifier configuration; ``cfg.representation`` ``auto`` fits every registered
            representation and applies :func:`medcae.model.representations.choose`, a name fits that
            one (and ``frozen_final``, the baseline every report shows).
        arrays: ``{"train"|"val"|"test": {"codes", "tap", "final"}}``.
        labels: Labels per split.
        label_names: Class names (for findings, the finding names).
        multilabel: One head per finding.

    Returns:
        The fitted heads by representation name (each with its one test report), and the
        choice with its reason.
    """
    auto = cfg.representation == "auto"
    names = (
        list(REPRESENTATIONS) if auto else list(dict.fromkeys([cfg.representation, "frozen_final"]))
    )
    feats = {n: {s: get_representation(n).features(arrays[s]) for s in arrays} for n in names}
    fitted = {
        n: fit_ensemble(cfg, get_representation(n), arrays, labels, label_names, multilabel)
        if get_representation(n).members
        else fit_and_test(cfg, feats[n], labels, label_names, multilabel)
        for n in names
    }
    if not auto:
        name = cfg.representation
        val = {n: float(ev.selection["val_auc"]) for n, ev in fitted.items()}
        return fitted, Choice(name, f"{name}: set by the run's configuration", val, {})
    val_proba = {n: fitted[n].head.predict_proba(feats[n]["val"]) for n in names}
    metric = mean_finding_auc if multilabel else None
    return fitted, choose(
        labels["val"], val_proba, len(label_names), seed=cfg.seed, prior=PRIOR, metric=metric
    )


def fit_ensemble(
    cfg: ClassifierConfig,
    rep: Representation,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    label_names: Sequence[str],
    multilabel: bool = False,
) -> Evaluated:
    """Fit one head per member of ``rep`` (each choosing its C on validation), average them
    into one head on ``rep``'s features, and test that head once.

    ``selection["C"]`` is the first member's C; ``selection["member_C"]`` lists them all.
    """
    k = len(label_names)
    heads, cs = [], []
    for parts in rep.members:
        member = Representation(f"{rep.name}:{'+'.join(parts)}", parts, "")
        f = {s: member.features(arrays[s]) for s in ("train", "val")}
        head, sel = _fit(cfg, f, labels, label_names, multilabel)
        heads.append(head)
        cs.append(float(sel["C"]))
    head = average_heads(heads)
    x = {s: rep.features(arrays[s]) for s in ("val", "test")}
    val_proba = head.predict_proba(x["val"])
    selection = {
        "C": cs[0],
        "member_C": cs,
        "val_auc": mean_finding_auc(labels["val"], val_proba)
        if multilabel
        else auc_score(labels["val"], val_proba, k),
        "n_labels": sel["n_labels"],
    }
    return calibrate_and_test(cfg, head, selection, x, labels, label_names, multilabel)


def describe(name: str, backbone: str, taps: str, kind: str) -> str:
    """A representation's row name in the results table."""
    return {
        "frozen_final": f"frozen {backbone} final + {kind}",
        "frozen_tap": f"frozen {backbone} {taps} avg+max + {kind}",
        "cae": f"CAE on {taps} + {kind}",
        "cae_concat": f"CAE on {taps} + pooled {taps} + {kind}",
        "cae_ensemble": f"CAE on {taps}, pooled {taps}: two {kind} heads averaged",
    }.get(name, f"{name} + {kind}")

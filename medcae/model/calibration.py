"""Calibrating a head's probabilities on validation without changing their ranking.

Two classes (and each finding of a multi-label model): the positive logit ``z`` becomes
``a * z + b`` with ``a > 0``, a strictly increasing map, so every image keeps its rank and the
AUC its value:

- ``temperature``: ``b = 0``, one parameter (Guo et al., 2017);
- ``platt``: both (Platt, 1999), fitted by maximum likelihood.

Several exclusive classes: temperature scaling would reorder each class's one-vs-rest ranking
(``softmax(z / T)_c`` depends on the other classes' logits), so medcae mixes the probabilities
with the training prior, ``w * p + (1 - w) * pi`` with ``0 < w <= 1`` (``prior``): affine per
class, it keeps every class's ranking and sums to one; it can only soften. (No other map does
both: a map that is increasing in each class's probability alone and keeps the sum at one on
the whole simplex is affine, and ``w > 1`` would push a near-zero probability below zero.)
``--calibration temperature`` is there for several classes too, asked for by name: it keeps
the argmax and may reorder a class's one-vs-rest ranking, as the run then says.

``auto`` picks, among ``none`` and the candidates above, the lowest log-loss under 5-fold
cross-validation on the validation split (so a method with more parameters does not win by
fitting the same images it is judged on), then fits it on the whole validation split.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medcae.config import CALIBRATION_CHOICES
from medcae.model.classifier import LinearHead

BINARY_METHODS = ("none", "temperature", "platt")
#: ``auto``'s candidates for several exclusive classes; ``temperature`` only when asked.
MULTICLASS_METHODS = ("none", "prior")
CV_FOLDS = 5
_EPS = 1e-15


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration and why it was chosen.

    Attributes:
        method: ``none``, ``temperature``, ``platt`` or ``prior``.
        slope: ``a`` of ``a * z + b`` on the positive logit (two classes).
        offset: ``b``.
        weight: ``w`` of ``w * p + (1 - w) * prior`` (several classes).
        prior: The training class shares (several classes).
        cv_log_loss: Each candidate's cross-validated log-loss on validation.
        reason: One line: what was chosen and why.
    """

    method: str = "none"
    slope: float = 1.0
    offset: float = 0.0
    weight: float = 1.0
    prior: tuple[float, ...] = ()
    cv_log_loss: dict[str, float] = field(default_factory=dict)
    reason: str = ""

    def apply(self, head: LinearHead) -> LinearHead:
        """A copy of ``head`` whose probabilities are calibrated."""
        if self.method in ("temperature", "platt"):
            platt = np.asarray(head.platt, np.float64) * self.slope
            platt[:, 1] += self.offset
            return replace(head, platt=platt)
        if self.method == "prior":
            return replace(head, shrink=np.asarray([self.weight, *self.prior], np.float64))
        return head

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "method": self.method,
            "slope": self.slope,
            "offset": self.offset,
            "weight": self.weight,
            "prior": list(self.prior),
            "cv_log_loss": dict(self.cv_log_loss),
            "reason": self.reason,
        }


def _nll_binary(z: np.ndarray, y: np.ndarray, a: float, b: float) -> float:
    t = a * z + b
    # -log sigmoid(t) for positives, -log(1 - sigmoid(t)) for negatives, stably
    return float(np.mean(np.logaddexp(0.0, np.where(y == 1, -t, t))))


def _fit_binary(method: str, z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy.optimize import minimize, minimize_scalar

    if method == "none":
        return 1.0, 0.0
    if method == "temperature":
        res = minimize_scalar(
            lambda la: _nll_binary(z, y, float(np.exp(la)), 0.0),
            bounds=(-6.0, 6.0),
            method="bounded",
        )
        return float(np.exp(res.x)), 0.0
    res = minimize(
        lambda v: _nll_binary(z, y, float(np.exp(v[0])), float(v[1])),
        x0=np.zeros(2),
        method="L-BFGS-B",
        bounds=[(-6.0, 6.0), (-50.0, 50.0)],
    )
    return float(np.exp(res.x[0])), float(res.x[1])


def _nll_prior(p: np.ndarray, y: np.ndarray, w: float, prior: np.ndarray) -> float:
    q = w * p[np.arange(len(y)), y] + (1 - w) * prior[y]
    return float(-np.mean(np.log(np.clip(q, _EPS, 1.0))))


def _fit_prior(method: str, p: np.ndarray, y: np.ndarray, prior: np.ndarray) -> float:
    from scipy.optimize import minimize_scalar

    if method == "none":
        return 1.0
    res = minimize_scalar(
        lambda w: _nll_prior(p, y, w, prior), bounds=(1e-3, 1.0), method="bounded"
    )
    return float(res.x)


def _folds(y: np.ndarray, seed: int) -> list[np.ndarray]:
    """Stratified fold ids of the validation images (as many folds as the rarest class
    allows, at most :data:`CV_FOLDS`)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    k = max(2, min(CV_FOLDS, int(np.bincount(y).min())))
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % k
    return [np.flatnonzero(fold == f) for f in range(k)]


def fit_calibration(
    head: LinearHead,
    x_val: np.ndarray,
    y_val: np.ndarray,
    method: str = "auto",
    prior: np.ndarray | None = None,
    seed: int = 0,
) -> Calibration:
    """Choose and fit the calibration of ``head`` on the validation split.

    Args:
        head: The fitted, uncalibrated head.
        x_val: ``(M, D)`` validation features.
        y_val: ``(M,)`` validation labels.
        method: One of :data:`CALIBRATION_CHOICES`; ``auto`` chooses by cross-validated
            log-loss.
        prior: ``(K,)`` training class shares, for ``prior`` (several classes).
        seed: Seed of the folds.

    Raises:
        ValueError: ``method`` is unknown or does not suit the number of classes.
    """
    y = np.asarray(y_val).astype(np.int64)
    k = head.num_classes
    methods = BINARY_METHODS if k == 2 else MULTICLASS_METHODS
    if method not in CALIBRATION_CHOICES:
        raise ValueError(
            f"calibration must be one of {', '.join(CALIBRATION_CHOICES)}, got {method!r}"
        )
    if method != "auto" and method not in (*methods, "temperature"):
        raise ValueError(
            f"calibration {method!r} does not apply to {k} classes; use one of {', '.join(methods)}"
        )
    counts = np.bincount(y, minlength=k)
    if (counts[: 2 if k == 2 else k] < 2).any():
        return Calibration(
            reason=f"none: validation has fewer than 2 images of a class ({counts.tolist()}), "
            "too few to calibrate on"
        )
    candidates = methods if method == "auto" else (method,)
    if k == 2:
        z = head.logits(x_val)[:, 0]

        def cv(m: str) -> float:
            losses = []
            for test in _folds(y, seed):
                train = np.setdiff1d(np.arange(len(y)), test)
                a, b = _fit_binary(m, z[train], y[train])
                losses.append(_nll_binary(z[test], y[test], a, b) * len(test))
            return float(sum(losses) / len(y))

        scores = {m: cv(m) for m in candidates}
        best = min(candidates, key=lambda m: (scores[m], candidates.index(m)))
        a, b = _fit_binary(best, z, y)
        cal = Calibration(best, slope=a, offset=b, cv_log_loss=scores)
    elif method == "temperature":
        from scipy.optimize import minimize_scalar

        z = head.logits(x_val)

        def nll(la: float) -> float:
            q = replace(head, shrink=None).proba_from_logits(z * np.exp(la))
            return float(-np.mean(np.log(np.clip(q[np.arange(len(y)), y], _EPS, 1.0))))

        res = minimize_scalar(nll, bounds=(-6.0, 6.0), method="bounded")
        scores = {"none": nll(0.0), "temperature": float(res.fun)}
        cal = Calibration("temperature", slope=float(np.exp(res.x)), cv_log_loss=scores)
        return replace(
            cal,
            reason=f"temperature: set (validation log-loss {scores['none']:.4f} before, "
            f"{scores['temperature']:.4f} after); with {k} exclusive classes it keeps every "
            "decision but may reorder a class's one-vs-rest ranking",
        )
    else:
        pi = np.asarray(prior if prior is not None else counts / counts.sum(), np.float64)
        pi = pi / pi.sum()
        p = head.predict_proba(x_val)

        def cv(m: str) -> float:
            losses = []
            for test in _folds(y, seed):
                train = np.setdiff1d(np.arange(len(y)), test)
                w = _fit_prior(m, p[train], y[train], pi)
                losses.append(_nll_prior(p[test], y[test], w, pi) * len(test))
            return float(sum(losses) / len(y))

        scores = {m: cv(m) for m in candidates}
        best = min(candidates, key=lambda m: (scores[m], candidates.index(m)))
        w = _fit_prior(best, p, y, pi)
        cal = Calibration(best, weight=w, prior=tuple(map(float, pi)), cv_log_loss=scores)
    how = "chosen by 5-fold cross-validated log-loss on validation" if method == "auto" else "set"
    shown = ", ".join(f"{m} {v:.4f}" for m, v in scores.items())
    return replace(cal, reason=f"{best}: {how} ({shown})")

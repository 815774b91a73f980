"""The operating point: how a probability becomes a decision, chosen on validation.

Rules (``--operating-point``):

- ``youden``: the threshold that maximises sensitivity + specificity on validation (the
  default for two classes and for each finding);
- ``sensitivity=0.95``: the highest threshold whose validation sensitivity is at least 0.95
  (so the best specificity that keeps it);
- ``specificity=0.90``: the lowest threshold whose validation specificity is at least 0.90;
- ``argmax``: the most probable class (the default for several exclusive classes; for two
  classes a threshold of 0.5).

A threshold lies halfway between two neighbouring validation probabilities, so validation's
decisions are exactly those the rule counted; an image is positive when its (calibrated)
positive probability is at or above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medcae.config import ConfigError, parse_operating_point


@dataclass(frozen=True)
class OperatingPoint:
    """A decision rule and its threshold, as chosen on validation.

    Attributes:
        rule: ``youden``, ``sensitivity``, ``specificity`` or ``argmax``.
        target: The asked sensitivity or specificity, else None.
        threshold: On the positive probability; None for ``argmax`` of several classes.
        positive: Index of the positive class (two classes), else None.
        val: Validation sensitivity and specificity at the threshold (two classes).
        note: What the run should say (a target not met exactly), or "".
    """

    rule: str
    target: float | None = None
    threshold: float | None = None
    positive: int | None = None
    val: dict[str, float] | None = None
    note: str = ""

    @property
    def text(self) -> str:
        """The rule as given: ``youden``, ``sensitivity=0.95``."""
        return self.rule if self.target is None else f"{self.rule}={self.target:g}"

    def decide(self, proba: np.ndarray) -> np.ndarray:
        """Class ids ``(N,)`` from probabilities ``(N, K)``."""
        proba = np.asarray(proba)
        if self.threshold is None or self.positive is None:
            return proba.argmax(axis=1)
        negative = 1 - self.positive
        return np.where(proba[:, self.positive] >= self.threshold, self.positive, negative)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as the bundle records it."""
        return {
            "rule": self.rule,
            "target": self.target,
            "threshold": self.threshold,
            "positive": self.positive,
            "val": self.val,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> OperatingPoint:
        """Inverse of :meth:`to_dict`; None (a bundle from before operating points) is
        ``argmax``."""
        if not d:
            return cls("argmax")
        keys = ("target", "threshold", "positive", "val")
        return cls(d["rule"], *(d.get(k) for k in keys), note=d.get("note", ""))


def _cuts(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct cut of the validation probabilities ``p`` (``y``: positive or not):
    thresholds, from "none positive" down to "all positive", and the sensitivity and
    specificity of "positive when p >= threshold" at each."""
    u = np.unique(p)[::-1]  # distinct, descending
    t = np.empty(len(u) + 1)
    t[0] = (u[0] + 1.0) / 2 if u[0] < 1 else 1.0 + 1e-9
    t[1:-1] = (u[:-1] + u[1:]) / 2
    t[-1] = u[-1] / 2
    pos, neg = np.sort(p[y]), np.sort(p[~y])
    sens = (len(pos) - np.searchsorted(pos, t, side="left")) / len(pos)
    spec = np.searchsorted(neg, t, side="left") / len(neg)
    return t, sens, spec


def choose_operating_point(
    text: str, y_val: np.ndarray, proba_val: np.ndarray, positive: int = 1, what: str = ""
) -> OperatingPoint:
    """Choose the operating point ``text`` on validation.

    Args:
        text: A rule (:func:`parse_operating_point`).
        y_val: ``(M,)`` validation labels (class ids; for a finding 0/1).
        proba_val: ``(M, K)`` calibrated validation probabilities.
        positive: The positive class of two.
        what: Names the class or finding in messages.

    Raises:
        ConfigError: A bad rule, a threshold rule for several classes, or validation without
            a positive or a negative.
    """
    rule, target = parse_operating_point(text)
    proba_val = np.asarray(proba_val, np.float64)
    k = proba_val.shape[1]
    if rule == "auto":
        rule = "youden" if k == 2 else "argmax"
    if k != 2:
        if rule != "argmax":
            raise ConfigError(
                f"operating point {text!r}: a threshold needs two classes (or findings); "
                f"this model has {k} exclusive classes, use argmax"
            )
        return OperatingPoint("argmax")
    if rule == "argmax":
        return _at(OperatingPoint("argmax", None, 0.5, positive), y_val, proba_val)
    y = np.asarray(y_val) == positive
    if y.all() or not y.any():
        name = f" of {what}" if what else ""
        raise ConfigError(
            f"cannot choose the operating point {text!r}{name}: validation has "
            f"{int(y.sum())} positive and {int((~y).sum())} negative images; it needs both"
        )
    thresholds, sens, spec = _cuts(y, proba_val[:, positive])
    note = ""
    if rule == "youden":
        i = int(np.argmax(sens + spec))
    elif rule == "sensitivity":
        i = int(np.flatnonzero(sens >= target - 1e-12)[0])
        if sens[i] - target > 0.005:
            note = (
                f"sensitivity {target:g} is not reachable exactly on validation's {int(y.sum())} "
                f"positives; the closest at or above it is {sens[i]:.3f}"
            )
    else:
        i = int(np.flatnonzero(spec >= target - 1e-12)[-1])
        if spec[i] - target > 0.005:
            note = (
                f"specificity {target:g} is not reachable exactly on validation's "
                f"{int((~y).sum())} negatives; the closest at or above it is {spec[i]:.3f}"
            )
    op = OperatingPoint(rule, target, float(thresholds[i]), positive, note=note)
    return _at(op, y_val, proba_val)


def _at(op: OperatingPoint, y_val: np.ndarray, proba_val: np.ndarray) -> OperatingPoint:
    pred = op.decide(proba_val) == op.positive
    y = np.asarray(y_val) == op.positive
    val = {
        "sensitivity": float(pred[y].mean()) if y.any() else float("nan"),
        "specificity": float((~pred[~y]).mean()) if (~y).any() else float("nan"),
    }
    return OperatingPoint(op.rule, op.target, op.threshold, op.positive, val, op.note)

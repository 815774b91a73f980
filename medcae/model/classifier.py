"""Label-budget sampling and a linear classifier on CAE codes, exportable as plain arrays.

scikit-learn fits the model; :class:`LinearHead` holds only arrays (scaler mean/scale,
coefficients, intercepts, Platt parameters for SVMs), so a bundle stores and loads it without
pickle, and prediction needs only NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medcae.config import ClassifierConfig
from medcae.metrics.classification import auc_score


class BudgetError(ValueError):
    """A label budget cannot be met by the labels available."""


def sample_budget(labels: np.ndarray, budget: float, seed: int = 0) -> np.ndarray:
    """Choose a stratified, seeded subset of labeled indices.

    Args:
        labels: ``(N,)`` int class labels.
        budget: A float fraction in (0, 1] of each class (at least one per class), or a count
            per class: an int, or a whole float above 1 (so ``1.0`` means all, ``1`` one each).
        seed: Seed of the sampling.

    Returns:
        Sorted indices into ``labels``.

    Raises:
        BudgetError: If the budget is not positive or a class has fewer labels than asked.
    """
    rng = np.random.default_rng(seed)
    per_class = isinstance(budget, (int, np.integer)) or budget > 1
    if budget <= 0 or (per_class and not float(budget).is_integer()):
        raise BudgetError(
            f"budget must be a fraction in (0, 1] or a whole count >= 1, got {budget}"
        )
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(budget) if per_class else max(1, int(round(budget * len(idx))))
        if k > len(idx):
            raise BudgetError(
                f"label budget asks {k} labels of class {c}, but only {len(idx)} are available"
            )
        picked.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(picked))


@dataclass
class LinearHead:
    """A fitted linear classifier as plain arrays.

    Attributes:
        kind: ``logreg`` or ``linear_svm``.
        mean: ``(D,)`` feature means of the standard scaler.
        scale: ``(D,)`` feature scales.
        coef: ``(K', D)`` weights; ``K' = 1`` for binary problems.
        intercept: ``(K',)``.
        platt: ``(K', 2)`` slope/offset mapping decision values to logits: Platt's for SVMs,
            and for two classes the calibration's too (:mod:`medcae.model.calibration`);
            the identity for an uncalibrated logistic regression.
        num_classes: K.
        shrink: ``(K + 1,)``: a weight ``w`` and a prior ``pi`` mixing several exclusive
            classes' probabilities as ``w * p + (1 - w) * pi`` (their calibration); None: none.
        multilabel: One binary head per finding (``K`` findings, ``K' = K``): probabilities
            ``(N, K)`` are each finding's own, not a distribution over classes.
    """

    kind: str
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    platt: np.ndarray
    num_classes: int
    shrink: np.ndarray | None = None
    multilabel: bool = False

    def decision(self, x: np.ndarray) -> np.ndarray:
        """Decision values ``(N, K')`` for features ``(N, D)``."""
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, K')``: the decision values through :attr:`platt`."""
        d = self.decision(np.asarray(x, np.float64))
        return d * self.platt[:, 0] + self.platt[:, 1]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, K)`` for features ``(N, D)``."""
        return self.proba_from_logits(self.logits(x))

    def proba_from_logits(self, d: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, K)`` from :meth:`logits` (for findings, each one's)."""
        if self.multilabel:
            return _sigmoid(d)
        if self.num_classes == 2:
            p = np.stack([_sigmoid(-d[:, 0]), _sigmoid(d[:, 0])], axis=1)
        elif self.kind == "linear_svm":
            p = _sigmoid(d)
            p = p / p.sum(axis=1, keepdims=True)
        else:
            e = np.exp(d - d.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
        if self.shrink is not None:
            p = self.shrink[0] * p + (1 - self.shrink[0]) * self.shrink[1:]
        return p

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for ``np.savez`` (no object arrays)."""
        arrays = {
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": self.intercept,
            "platt": self.platt,
        }
        if self.shrink is not None:
            arrays["shrink"] = self.shrink
        return arrays

    @classmethod
    def from_arrays(
        cls, kind: str, num_classes: int, arrays: dict[str, np.ndarray], multilabel: bool = False
    ) -> LinearHead:
        """Inverse of :meth:`to_arrays`."""
        return cls(
            kind=kind,
            num_classes=num_classes,
            **{k: np.asarray(arrays[k]) for k in ("mean", "scale", "coef", "intercept", "platt")},
            shrink=np.asarray(arrays["shrink"]) if "shrink" in arrays else None,
            multilabel=multilabel,
        )

    def finding(self, j: int) -> LinearHead:
        """Finding ``j``'s head as a two-class head (its probabilities ``(N, 2)``)."""
        rows = slice(j, j + 1)
        return LinearHead(
            self.kind,
            self.mean,
            self.scale,
            self.coef[rows],
            self.intercept[rows],
            self.platt[rows],
            2,
        )


def _sigmoid(d: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(d)


def average_heads(heads: Sequence[LinearHead]) -> LinearHead:
    """One head on the members' features concatenated, deciding by their mean decision.

    Each member's decision (Platt-scaled for SVMs) is linear in its own standardised features,
    so their mean is one linear head: the members' weights side by side, divided by their
    number, and the mean intercept. Its probabilities average the members' logits (a
    geometric mean of their odds), and it saves, serves and explains like any head.

    Args:
        heads: Fitted heads of one kind and class count, in the order of their features.

    Raises:
        ValueError: No heads, or heads of different kinds or class counts.
    """
    if not heads or len({(h.kind, h.num_classes, h.coef.shape[0]) for h in heads}) != 1:
        raise ValueError(f"average_heads needs heads of one kind and class count, got {heads!r}")
    n = len(heads)
    coef = np.concatenate([h.coef * h.platt[:, :1] for h in heads], axis=1) / n
    intercept = sum(h.intercept * h.platt[:, 0] + h.platt[:, 1] for h in heads) / n
    return LinearHead(
        heads[0].kind,
        np.concatenate([h.mean for h in heads]),
        np.concatenate([h.scale for h in heads]),
        coef,
        np.asarray(intercept),
        np.tile([1.0, 0.0], (len(coef), 1)),
        heads[0].num_classes,
        multilabel=heads[0].multilabel,
    )


def _fit_once(kind: str, x: np.ndarray, y: np.ndarray, c: float, seed: int, k: int) -> LinearHead:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    if kind == "logreg":
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(xs, y)
    else:
        model = LinearSVC(C=c, random_state=seed, max_iter=20000).fit(xs, y)
    coef, intercept = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
    head = LinearHead(
        kind, scaler.mean_, scaler.scale_, coef, intercept, np.tile([1.0, 0.0], (len(coef), 1)), k
    )
    if kind == "linear_svm":
        head.platt = _platt(head.decision(x), y, k)
    return head


def _platt(d: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    targets = [y == 1] if k == 2 else [y == c for c in range(k)]
    out = []
    for j, t in enumerate(targets):
        lr = LogisticRegression(C=1e4, max_iter=1000).fit(d[:, j : j + 1], t.astype(int))
        out.append([lr.coef_[0, 0], lr.intercept_[0]])
    return np.asarray(out)


def fit_classifier(
    cfg: ClassifierConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
) -> tuple[LinearHead, dict[str, float]]:
    """Fit on the labeled budget, choosing C by validation AUC.

    Args:
        cfg: Classifier configuration (kind, budget, C grid, seed).
        x_train: ``(N, D)`` training features (all of them; the budget is sampled here).
        y_train: ``(N,)`` training labels.
        x_val: ``(M, D)`` validation features.
        y_val: ``(M,)`` validation labels.
        num_classes: K.

    Returns:
        The best head and ``{"C": ..., "val_auc": ..., "n_labels": ...}``.
    """
    idx = sample_budget(y_train, cfg.budget, cfg.seed)
    best: tuple[float, float, LinearHead] | None = None
    for c in cfg.C_grid:
        head = _fit_once(cfg.kind, x_train[idx], y_train[idx], c, cfg.seed, num_classes)
        auc = auc_score(y_val, head.predict_proba(x_val), num_classes)
        if best is None or auc > best[0]:
            best = (auc, c, head)
    assert best is not None
    return best[2], {"C": best[1], "val_auc": best[0], "n_labels": float(len(idx))}


def sample_findings_budget(matrix: np.ndarray, budget: float, seed: int = 0) -> np.ndarray:
    """The labeled subset of a multi-label training split, seeded.

    A fraction takes that share of the images at random (at least one positive of every
    finding kept); a count ``n`` takes up to ``n`` positives of each finding and ``n`` images
    without any finding.

    Args:
        matrix: ``(N, F)`` 0/1 findings.
        budget: As :func:`sample_budget`.
        seed: Seed of the sampling.

    Returns:
        Sorted indices.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(matrix)
    per_count = isinstance(budget, (int, np.integer)) or budget > 1
    if budget <= 0 or (per_count and not float(budget).is_integer()):
        raise BudgetError(
            f"budget must be a fraction in (0, 1] or a whole count >= 1, got {budget}"
        )
    if not per_count:
        k = max(1, int(round(budget * len(y))))
        picked = set(rng.choice(len(y), size=k, replace=False).tolist())
        for j in range(y.shape[1]):  # keep every finding seen
            pos = np.flatnonzero(y[:, j] == 1)
            if len(pos) and not picked & set(pos.tolist()):
                picked.add(int(rng.choice(pos)))
        return np.array(sorted(picked))
    n, picked = int(budget), set()
    groups = [np.flatnonzero(y[:, j] == 1) for j in range(y.shape[1])]
    groups.append(np.flatnonzero(y.sum(axis=1) == 0))
    for idx in groups:
        picked |= set(rng.choice(idx, size=min(n, len(idx)), replace=False).tolist())
    return np.array(sorted(picked))


def fit_findings(
    cfg: ClassifierConfig,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
) -> tuple[LinearHead, dict[str, Any]]:
    """One binary head per finding on the same labeled images, each choosing its own C by
    its validation AUC; stacked as one multi-label head (one standard scaler).

    Args:
        cfg: Classifier configuration.
        x_train: ``(N, D)`` training features (the budget is sampled here).
        y_train: ``(N, F)`` 0/1 training findings.
        x_val: ``(M, D)`` validation features.
        y_val: ``(M, F)`` 0/1 validation findings.

    Returns:
        The head and ``{"C": first finding's, "finding_C": [...], "finding_val_auc": [...],
        "val_auc": their mean, "n_labels"}``.
    """
    idx = sample_findings_budget(y_train, cfg.budget, cfg.seed)
    rows, cs, aucs = [], [], []
    for j in range(y_train.shape[1]):
        best: tuple[float, float, LinearHead] | None = None
        for c in cfg.C_grid:
            head = _fit_once(cfg.kind, x_train[idx], y_train[idx, j], c, cfg.seed, 2)
            auc = auc_score(y_val[:, j], head.predict_proba(x_val), 2)
            if best is None or auc > best[0] or not np.isfinite(best[0]):
                best = (auc, c, head)
        assert best is not None
        aucs.append(best[0])
        cs.append(best[1])
        rows.append(best[2])
    head = LinearHead(
        cfg.kind,
        rows[0].mean,
        rows[0].scale,
        np.concatenate([h.coef for h in rows]),
        np.concatenate([h.intercept for h in rows]),
        np.concatenate([h.platt for h in rows]),
        len(rows),
        multilabel=True,
    )
    return head, {
        "C": cs[0],
        "finding_C": cs,
        "finding_val_auc": aucs,
        "val_auc": float(np.nanmean(aucs)),
        "n_labels": float(len(idx)),
    }

"""What the classifier sees: named representations, and the rule that picks one on validation.

Every representation is built from three arrays that one pass of the frozen backbone and the
trained CAE give per image:

- ``codes``: the CAE's code vector (``cae.pool``: flattened by default);
- ``tap``: the tapped feature maps, average- and max-pooled per channel;
- ``final``: the backbone's last layer, average-pooled (the transfer-learning baseline).

``cae_ensemble`` fits one head on the codes and one on the pooled tap, each with its own C, and
averages their logits: with few labels the two views err differently, and their average beat
either one at every PneumoniaMNIST budget (docs/RESULTS.md). The average is itself one linear
head on ``codes + tap``, so it is stored, served and explained like ``cae_concat``.

``--representation auto`` (the default) fits the classifier on each candidate, its C chosen on
validation AUC as always. It **keeps the default representation**, :data:`PRIOR`
(``cae_ensemble``, chosen on the evidence of docs/RESULTS.md, not on this run's data), unless
the best candidate's validation AUC beats it by more than one standard error of their paired
difference (200 seeded bootstrap resamples of the validation split) *and* by more than
:data:`MIN_GAIN` (0.01). Candidates built from the same features are strongly correlated, so
their paired standard error is tiny and one SE alone let the first version of this rule switch
on differences of 0.002 that did not hold on test. A small validation split then cannot move
the choice on noise, while a data set where the CAE truly does not help (a clearly better
frozen baseline) still gets the baseline. Only then does a
**one-standard-error rule** (Breiman et al. 1984) pick among the others: the *simplest*
candidate within one standard error of the best. Candidates, simplest first: ``frozen_final``,
``frozen_tap``, ``cae``, ``cae_concat``, ``cae_ensemble``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from medcae.metrics.classification import auc_score


@dataclass(frozen=True)
class Representation:
    """A named way to turn an image's arrays into the classifier's vector.

    Attributes:
        name: Registry key.
        parts: Which of ``codes``, ``tap``, ``final`` it concatenates, in order.
        description: One line for reports and the model card.
        members: Empty: one head on the concatenated parts. Otherwise an ensemble: one head per
            member (a tuple of parts, together covering ``parts`` in order), each with its own
            C chosen on validation, averaged into one linear head on ``parts``
            (:func:`medcae.model.classifier.average_heads`).
    """

    name: str
    parts: tuple[str, ...]
    description: str
    members: tuple[tuple[str, ...], ...] = ()

    def features(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """``(N, D)`` float32 vectors from ``{"codes", "tap", "final"}`` arrays."""
        missing = [p for p in self.parts if p not in arrays]
        if missing:
            raise KeyError(f"representation {self.name!r} needs {missing}, got {sorted(arrays)}")
        return np.concatenate(
            [np.asarray(arrays[p], np.float32).reshape(len(arrays[p]), -1) for p in self.parts],
            axis=1,
        )


#: Simplest first: the order the one-standard-error rule prefers.
REPRESENTATIONS: dict[str, Representation] = {
    r.name: r
    for r in (
        Representation("frozen_final", ("final",), "frozen backbone, last layer pooled"),
        Representation("frozen_tap", ("tap",), "frozen backbone, tapped maps avg+max pooled"),
        Representation("cae", ("codes",), "CAE codes of the tapped maps (the paper's method)"),
        Representation("cae_concat", ("codes", "tap"), "CAE codes + tapped maps avg+max pooled"),
        Representation(
            "cae_ensemble",
            ("codes", "tap"),
            "a head on the CAE codes and one on the pooled tapped maps, their logits averaged",
            members=(("codes",), ("tap",)),
        ),
    )
}
CHOICES = ("auto", *REPRESENTATIONS)
#: What ``auto`` keeps unless validation shows another candidate clearly better (see module doc).
PRIOR = "cae_ensemble"


def get_representation(name: str) -> Representation:
    """The registered representation ``name``.

    Raises:
        KeyError: An unknown name, listing the known ones.
    """
    try:
        return REPRESENTATIONS[name]
    except KeyError:
        raise KeyError(
            f"unknown representation {name!r}; expected one of {', '.join(CHOICES)}"
        ) from None


def tap_pool(maps: np.ndarray) -> np.ndarray:
    """Average- and max-pooled tapped maps: ``(N, C, h, w)`` -> ``(N, 2C)`` float32."""
    m = np.asarray(maps, np.float32)
    return np.concatenate([m.mean(axis=(2, 3)), m.max(axis=(2, 3))], axis=1)


#: The default is left only for a candidate better on validation by more than this AUC (and
#: more than one standard error): below it, differences are inside every method's seed-to-seed
#: spread on PneumoniaMNIST at small budgets (std 0.006 to 0.018 test AUC).
MIN_GAIN = 0.01


def _keep_or_switch(
    prior: str, best: str, order: list[str], auc: dict[str, float], se: dict[str, float]
) -> Choice:
    """The default unless ``best`` beats it by more than ``max(1 SE, MIN_GAIN)``; then the
    simplest candidate within one standard error of ``best``."""
    bar = max(se[prior], MIN_GAIN)
    gap = auc[best] - auc[prior]
    if gap <= bar:
        reason = f"{prior}: the default representation, kept: validation AUC {auc[prior]:.4f}" + (
            ", the best"
            if prior == best
            else f", {gap:.4f} below the best, {best} ({auc[best]:.4f}), which is within "
            f"the margin to switch (max(1 SE, {MIN_GAIN}) = {bar:.4f})"
        )
        return Choice(prior, reason, auc, se)
    pick = next(n for n in order if auc[best] - auc[n] <= se[n])
    reason = (
        f"{pick}: the default, {prior} ({auc[prior]:.4f}), was {gap:.4f} below the best "
        f"validation AUC, {best} ({auc[best]:.4f}), more than max(1 SE, {MIN_GAIN}) = {bar:.4f}; "
        + (
            f"{pick} is the simplest candidate within one standard error of {best}"
            if pick != best
            else "no simpler candidate was within one standard error of it"
        )
    )
    return Choice(pick, reason, auc, se)


@dataclass
class Choice:
    """The representation picked, and why.

    Attributes:
        name: The chosen representation.
        reason: One sentence for the run's summary and the model card.
        val_auc: Validation AUC of every candidate.
        se: Standard error of each candidate's paired AUC difference to the best.
    """

    name: str
    reason: str
    val_auc: dict[str, float]
    se: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-ready, for the bundle."""
        return {"name": self.name, "reason": self.reason, "val_auc": self.val_auc, "se": self.se}


def choose(
    val_labels: np.ndarray,
    val_proba: Mapping[str, np.ndarray],
    num_classes: int,
    resamples: int = 200,
    seed: int = 0,
    prior: str | None = None,
    metric: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> Choice:
    """Pick by the one-standard-error rule (see the module docstring).

    With ``prior`` (the default representation, :data:`PRIOR`) among the candidates, it is
    kept unless the best validation AUC beats it by more than one standard error of their
    paired difference and by more than :data:`MIN_GAIN`; only then does the
    simplest-within-one-SE rule pick another.

    Args:
        val_labels: ``(N,)`` validation labels.
        val_proba: Per candidate (in :data:`REPRESENTATIONS` order or any subset of it), its
            head's ``(N, K)`` validation probabilities.
        num_classes: K.
        resamples: Bootstrap resamples for the standard errors.
        seed: Seed of the resampling.
        prior: The candidate kept unless clearly beaten (``None``: plain one-SE rule).
        metric: ``metric(labels, proba)`` in place of the AUC (findings: the mean AUC over
            findings); a resample where it is not finite is left out.
    """
    order = [n for n in REPRESENTATIONS if n in val_proba] + [
        n for n in val_proba if n not in REPRESENTATIONS
    ]
    y = np.asarray(val_labels)
    score = metric or (lambda yy, pp: auc_score(yy, pp, num_classes))
    auc = {n: score(y, val_proba[n]) for n in order}
    best = max(order, key=lambda n: auc[n])
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {n: [] for n in order}
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        if metric is None and len(np.unique(y[idx])) < len(np.unique(y)):
            continue  # a resample missing a class has no AUC
        ref = score(y[idx], val_proba[best][idx])
        if not np.isfinite(ref):
            continue
        for n in order:
            diffs[n].append(ref - score(y[idx], val_proba[n][idx]))
    se = {n: float(np.std(d)) if d else 0.0 for n, d in diffs.items()}
    if prior in auc:
        return _keep_or_switch(prior, best, order, auc, se)
    pick = next(n for n in order if auc[best] - auc[n] <= se[n])
    if pick == best:
        reason = (
            f"{pick}: the best validation AUC ({auc[pick]:.4f}); every simpler candidate was "
            f"more than one standard error below it"
        )
    else:
        reason = (
            f"{pick}: validation AUC {auc[pick]:.4f}, within one standard error "
            f"({se[pick]:.4f}) of the best, {best} ({auc[best]:.4f}); the simpler one is kept"
        )
    return Choice(pick, reason, auc, se)

"""A simulated labeling study: which strategy of :mod:`medcae.labeling.strategies` buys AUC fastest.

The training split is the pool and its labels are the oracle. Each (strategy, seed) starts from
the same seeded random labels (:attr:`StudyConfig.start_per_class` per class), then adds
:attr:`StudyConfig.step` images per round, picked by the strategy, until
:attr:`StudyConfig.max_labels`. After every round the default head (``cae_ensemble``: one
logistic head on the CAE codes, one on the pooled tap, logits averaged; C chosen on validation)
is refitted on exactly the labeled images and scored once on the test split.

Plain NumPy and scikit-learn; :mod:`medcae.distributed.study` runs the (strategy, seed) pairs
as Ray tasks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from medcae.config import ClassifierConfig, ConfigError
from medcae.evaluation.protocol import Evaluated, fit_ensemble
from medcae.labeling.strategies import STRATEGIES, Pool, suggest
from medcae.model.classifier import sample_budget
from medcae.model.representations import get_representation

#: The representation the default run keeps (docs/RESULTS.md); the study fits and ranks on it.
REPRESENTATION = "cae_ensemble"
SPLITS = ("train", "val", "test")
#: Columns of ``active.csv``; ``ranked_by`` is ``start`` in round 0, then the strategy that
#: ranked the round (``hybrid:typiclust`` or ``hybrid:margin`` for ``hybrid``).
COLUMNS = ("strategy", "seed", "round", "n_labels", "test_auc", "ranked_by")


@dataclass(frozen=True)
class StudyConfig:
    """The rounds of a study.

    Attributes:
        start_per_class: Labels per class drawn at random (seeded) before the first round.
        step: Images labeled per round.
        max_labels: Labels in all after the last round (the last step is cut to fit).
        strategies: Names in :data:`medcae.labeling.strategies.STRATEGIES`.
    """

    start_per_class: int = 10
    step: int = 20
    max_labels: int = 200
    strategies: tuple[str, ...] = field(default_factory=lambda: tuple(STRATEGIES))

    def __post_init__(self) -> None:
        if self.start_per_class < 1 or self.step < 1:
            raise ConfigError(
                f"study: start_per_class {self.start_per_class} and step {self.step} must be >= 1"
            )
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise ConfigError(f"study: unknown strategy {unknown}; known: {', '.join(STRATEGIES)}")

    def schedule(self, num_classes: int) -> list[int]:
        """Labels after each round, round 0 (the random start) first.

        Raises:
            ConfigError: The start alone exceeds ``max_labels``.
        """
        n = self.start_per_class * num_classes
        if n > self.max_labels:
            raise ConfigError(
                f"study: the start ({self.start_per_class} per class x {num_classes} classes "
                f"= {n}) exceeds max_labels {self.max_labels}"
            )
        out = [n]
        while out[-1] < self.max_labels:
            out.append(min(out[-1] + self.step, self.max_labels))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``strategies`` as a list)."""
        return asdict(self) | {"strategies": list(self.strategies)}


#: ``--smoke-test``: seconds on the demo data.
SMOKE_STUDY = StudyConfig(start_per_class=2, step=4, max_labels=14)


@dataclass
class Trace:
    """What one (strategy, seed) did.

    Attributes:
        rows: One per round, with the :data:`COLUMNS`.
        picks: Pool indices labeled in each round, round 0 (the random start) first.
    """

    rows: list[dict[str, Any]]
    picks: list[np.ndarray]


def fit_on(
    indices: np.ndarray,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    labels: Mapping[str, np.ndarray],
    cfg: ClassifierConfig,
    names: Sequence[str],
) -> Evaluated:
    """The default head fitted on exactly the training images ``indices``, tested once.

    :func:`medcae.evaluation.protocol.fit_ensemble` on the labeled rows with a budget of every label
    (``1.0``), so the head, its C choice on validation and its test report are the ones of the
    evaluation, on a labeled set chosen here rather than sampled. Uncalibrated: the study
    simulates the method's labeling loop, and calibration on the validation labels (which the
    study does not count) would move where margin sampling looks without changing any AUC.

    Args:
        indices: int ``(n,)`` rows of the training split (every class among them).
        arrays: ``{"train"|"val"|"test": {"codes", "tap", ...}}``.
        labels: ``{"train"|"val"|"test": (N,)}``.
        cfg: The classifier's configuration (its budget is ignored).
        names: Class names.
    """
    idx = np.sort(np.asarray(indices, np.int64))
    sub = {**arrays, "train": {k: np.asarray(v)[idx] for k, v in arrays["train"].items()}}
    y = {**labels, "train": np.asarray(labels["train"])[idx]}
    clf = replace(cfg, budget=1.0, calibration="none")
    return fit_ensemble(clf, get_representation(REPRESENTATION), sub, y, names)


def pool_state(
    fitted: Evaluated, vectors: np.ndarray, labeled: np.ndarray, y: np.ndarray, k: int
) -> Pool:
    """The pool a strategy sees: the head's probabilities, the vectors, what is labeled.

    Args:
        fitted: The current head.
        vectors: ``(N, D)`` the head's input vectors of the pool (codes + tap).
        labeled: bool ``(N,)``.
        y: ``(N,)`` the pool's labels (only the labeled ones are counted).
        k: Number of classes.
    """
    return Pool(
        proba=fitted.head.predict_proba(vectors),
        vectors=vectors,
        in_distribution=np.ones(len(vectors), bool),
        labeled=labeled,
        class_counts=np.bincount(y[labeled], minlength=k),
    )


def run_rounds(
    strategy: str,
    seed: int,
    arrays: Mapping[str, Mapping[str, np.ndarray]],
    labels: Mapping[str, np.ndarray],
    names: Sequence[str],
    study: StudyConfig,
    cfg: ClassifierConfig,
) -> Trace:
    """One strategy, one seed: the random start, then a round per step of the schedule.

    Args:
        strategy: A name in :data:`medcae.labeling.strategies.STRATEGIES`.
        seed: Seeds the start (the same for every strategy), the classifier and the strategy.
        arrays: Per split ``{"codes", "tap", "final"}`` (the pool is ``"train"``).
        labels: Per split ``(N,)``; the training labels are the oracle.
        names: Class names.
        study: The rounds.
        cfg: The classifier's configuration.
    """
    y = np.asarray(labels["train"])
    k = len(names)
    vectors = get_representation(REPRESENTATION).features(arrays["train"])
    clf = replace(cfg, seed=seed)
    sizes = study.schedule(k)
    picks = [sample_budget(y, study.start_per_class, seed)]
    labeled = np.zeros(len(y), bool)
    labeled[picks[0]] = True
    fitted = fit_on(picks[0], arrays, labels, clf, names)
    rows = [_row(strategy, seed, 0, labeled, fitted, "start")]
    for r, size in enumerate(sizes[1:], start=1):
        pool = pool_state(fitted, vectors, labeled, y, k)
        ranking = suggest(pool, size - int(labeled.sum()), strategy, seed=seed * 1000 + r).ranking
        labeled[ranking.indices] = True
        picks.append(ranking.indices)
        fitted = fit_on(np.flatnonzero(labeled), arrays, labels, clf, names)
        rows.append(_row(strategy, seed, r, labeled, fitted, ranking.strategy))
    return Trace(rows, picks)


def _row(
    strategy: str, seed: int, r: int, labeled: np.ndarray, fitted: Evaluated, ranked_by: str
) -> dict:
    values = (strategy, seed, r, int(labeled.sum()), float(fitted.test["auc"]), ranked_by)
    return dict(zip(COLUMNS, values))


# --------------------------------------------------------------------------- the report


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std of the test AUC over seeds per (strategy, labels), in first-seen order of
    the strategies, labels ascending."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((r["strategy"], int(r["n_labels"])), []).append(float(r["test_auc"]))
    order = list(dict.fromkeys(r["strategy"] for r in rows))
    keys = sorted(groups, key=lambda key: (order.index(key[0]), key[1]))
    return [
        {
            "strategy": s,
            "n_labels": n,
            "seeds": len(groups[s, n]),
            "auc": float(np.mean(groups[s, n])),
            "auc_std": float(np.std(groups[s, n])),
        }
        for s, n in keys
    ]


@dataclass(frozen=True)
class Goal:
    """The study's question: does a strategy reach, with at most half the labels, the test AUC
    that ``random`` has with all of them (means over seeds)?

    Attributes:
        target: ``random``'s mean AUC at ``max_labels``.
        target_std: Its std over seeds.
        max_labels: The last round's labels.
        within: Half of them: the most labels the best strategy may use.
        best: The strategy other than ``random`` that reaches ``target`` with the fewest labels
            (ties, or none reaching it: the highest mean AUC at ``at``, then at ``max_labels``).
        reached_at: The fewest labels at which ``best``'s mean AUC is ``>= target`` (None:
            never within ``max_labels``).
        at: The round compared at ``within``: the most labels ``<= within``.
        best_auc: ``best``'s mean AUC at ``at``.
        best_std: Its std over seeds.
        random_auc: ``random``'s mean AUC at ``at``.
    """

    target: float
    target_std: float
    max_labels: int
    within: int
    best: str
    reached_at: int | None
    at: int
    best_auc: float
    best_std: float
    random_auc: float

    @property
    def met(self) -> bool:
        return self.reached_at is not None and self.reached_at <= self.within

    def text(self) -> str:
        """The verdict in two sentences, with the numbers."""
        goal = (
            f"**Goal**: the best strategy reaches the test AUC that `random` has at "
            f"{self.max_labels} labels ({self.target:.3f} ± {self.target_std:.3f}) with at most "
            f"{self.within} labels."
        )
        at = (
            f"first reaches {self.target:.3f} at {self.reached_at} labels"
            if self.reached_at is not None
            else f"does not reach {self.target:.3f} within {self.max_labels} labels"
        )
        verdict = "**Met**" if self.met else "**Not met**"
        return (
            f"{goal}\n\n{verdict}: the best strategy, `{self.best}`, {at}; at {self.at} labels "
            f"it has {self.best_auc:.3f} ± {self.best_std:.3f} (`random`: {self.random_auc:.3f})."
        )


def goal(agg: Sequence[Mapping[str, Any]]) -> Goal | None:
    """The :class:`Goal` of a :func:`summarize` table (None without ``random`` and another)."""
    curves: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in agg:
        curves.setdefault(r["strategy"], {})[int(r["n_labels"])] = r
    others = [s for s in curves if s != "random"]
    if "random" not in curves or not others:
        return None
    top = max(curves["random"])
    target = curves["random"][top]
    within = top // 2

    def at_within(s: str) -> Mapping[str, Any]:
        return curves[s][max(n for n in curves[s] if n <= within)]

    def reached(s: str) -> int | None:
        return next((n for n in sorted(curves[s]) if curves[s][n]["auc"] >= target["auc"]), None)

    def rank(s: str) -> tuple:
        return (reached(s) or top + 1, -at_within(s)["auc"], -curves[s][max(curves[s])]["auc"])

    best = min(others, key=rank)
    return Goal(
        target["auc"],
        target["auc_std"],
        top,
        within,
        best,
        reached(best),
        int(at_within(best)["n_labels"]),
        at_within(best)["auc"],
        at_within(best)["auc_std"],
        at_within("random")["auc"],
    )


def study_table(agg: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one row per label count, one column per strategy, test AUC mean ± std over
    seeds, the best of each row in bold."""
    strategies = list(dict.fromkeys(r["strategy"] for r in agg))
    cell = {(r["strategy"], r["n_labels"]): r for r in agg}
    lines = [
        "| labels | " + " | ".join(strategies) + " |",
        "|---" * (len(strategies) + 1) + "|",
    ]
    for n in sorted({r["n_labels"] for r in agg}):
        present = [cell[s, n] for s in strategies if (s, n) in cell]
        best = max(round(r["auc"], 3) for r in present)
        texts = []
        for s in strategies:
            r = cell.get((s, n))
            text = "" if r is None else f"{r['auc']:.3f} ± {r['auc_std']:.3f}"
            texts.append(f"**{text}**" if r is not None and round(r["auc"], 3) == best else text)
        lines.append(f"| {n} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def delegation_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """What ``hybrid`` (or any strategy that hands a round to another) ranked with, e.g.
    ``hybrid ranked 27 rounds: margin 27``; empty when no strategy delegated."""
    used: dict[str, dict[str, int]] = {}
    for r in rows:
        strategy, by = str(r["strategy"]), str(r.get("ranked_by", ""))
        if ":" in by:
            counts = used.setdefault(strategy, {})
            counts[by.split(":", 1)[1]] = counts.get(by.split(":", 1)[1], 0) + 1
    return "; ".join(
        f"`{s}` ranked {sum(c.values())} rounds: "
        + ", ".join(f"{name} {n}" for name, n in sorted(c.items()))
        for s, c in used.items()
    )

"""Which images to label next: ranking strategies on arrays, each picked by name.

A strategy ranks the *candidates* of a :class:`Pool` (images not labeled yet and, unless asked
otherwise, in distribution) and returns the best ``k`` first, each with a score where higher
means more worth labeling by that strategy's measure:

- ``random``: the control; a seeded permutation (score: the uniform draw that ordered it).
- ``margin``: uncertainty sampling; the smallest gap between the classifier's two most likely
  classes first (score: ``1 - gap``).
- ``typiclust``: TypiClust (Hacohen, Dekel and Weinshall, ICML 2022), for a cold start: k-means
  of the classifier's input vectors into ``labels known + k`` clusters (at most
  :data:`MAX_CLUSTERS`); clusters without a labeled image first, largest first, each giving
  its most *typical* image: the inverse of the mean distance to its
  :data:`TYPICALITY_NEIGHBOURS` nearest neighbours in the cluster (score: that typicality).
- ``hybrid``: ``typiclust`` while labels are scarce, ``margin`` afterwards
  (:func:`hybrid_choice`).

Plain NumPy and scikit-learn: ``medcae suggest`` (:mod:`medcae.cli.suggest`) computes the
arrays with the batch-prediction stage and ranks them here on the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from medcae.config import ConfigError

#: ``hybrid`` keeps to ``typiclust`` while some class has fewer labels than this.
HYBRID_MIN_PER_CLASS = 5
#: Most k-means clusters ``typiclust`` makes (the paper's cap).
MAX_CLUSTERS = 500
#: Neighbours that define an image's typicality (the paper's ``K_NN``).
TYPICALITY_NEIGHBOURS = 20
#: Above this many clusters, mini-batch k-means (as the paper's code switches at 50).
MINIBATCH_ABOVE = 50


@dataclass(frozen=True)
class Pool:
    """The unlabeled pool as arrays, one row per image.

    Attributes:
        proba: float ``(N, K)`` class probabilities of the current classifier.
        vectors: float ``(N, D)`` the classifier's input vectors, or None (``typiclust``
            needs them).
        in_distribution: bool ``(N,)`` the bundle's out-of-distribution check passed.
        labeled: bool ``(N,)`` already labeled: never suggested; covers its cluster.
        class_counts: int ``(K,)`` labels known per class, in the pool or not (for findings,
            positive labels known per finding).
        thresholds: ``(F,)`` a multi-label model's thresholds, one per finding (``proba`` then
            holds each finding's probability); None for classes.
    """

    proba: np.ndarray
    vectors: np.ndarray | None
    in_distribution: np.ndarray
    labeled: np.ndarray
    class_counts: np.ndarray
    thresholds: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.proba)


@dataclass(frozen=True)
class Ranking:
    """A strategy's picks, best first.

    Attributes:
        indices: int ``(n,)`` rows of the pool, ``n <= k``.
        scores: float ``(n,)`` the strategy's score of each pick (higher: more worth labeling).
        strategy: The strategy that ranked them (``hybrid:typiclust`` for a hybrid's choice).
    """

    indices: np.ndarray
    scores: np.ndarray
    strategy: str


@dataclass(frozen=True)
class Suggestions:
    """What :func:`suggest` returns.

    Attributes:
        ranking: The picks.
        out_of_distribution: int ``(m,)`` unlabeled rows left out as out of distribution.
        candidates: How many images were ranked.
    """

    ranking: Ranking
    out_of_distribution: np.ndarray
    candidates: int


#: ``strategy(pool, candidates, k, rng)``: ``candidates`` is bool ``(N,)``, the rows it may pick.
Strategy = Callable[[Pool, np.ndarray, int, np.random.Generator], Ranking]
STRATEGIES: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    """Add a strategy to :data:`STRATEGIES` under ``name``."""

    def add(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return add


def get_strategy(name: str) -> Strategy:
    """Look up a strategy.

    Raises:
        ConfigError: ``name`` is not registered; the message lists the known names.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def suggest(
    pool: Pool, k: int, strategy: str = "hybrid", seed: int = 0, include_ood: bool = False
) -> Suggestions:
    """The ``k`` images to label next.

    Args:
        pool: The pool.
        k: How many to suggest (fewer when fewer candidates remain).
        strategy: A name in :data:`STRATEGIES`.
        seed: Seeds ``random`` and the k-means of ``typiclust``.
        include_ood: Rank images that the out-of-distribution check flagged too.

    Raises:
        ConfigError: Unknown strategy, or ``k < 1``.
    """
    fn = get_strategy(strategy)
    if k < 1:
        raise ConfigError(f"k {k}: expected at least 1")
    ood = ~pool.labeled & ~pool.in_distribution
    candidates = ~pool.labeled & (pool.in_distribution | include_ood)
    ranking = fn(pool, candidates, k, np.random.default_rng(seed))
    left_out = np.flatnonzero(ood) if not include_ood else np.zeros(0, np.int64)
    return Suggestions(ranking, left_out, int(candidates.sum()))


# --------------------------------------------------------------------------- strategies


@register("random")
def random_order(pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator) -> Ranking:
    """A seeded random order of the candidates: the control."""
    rows = np.flatnonzero(candidates)
    draws = rng.random(len(rows))
    order = np.argsort(-draws, kind="stable")[:k]
    return Ranking(rows[order], draws[order], "random")


@register("margin")
def margin(pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator) -> Ranking:
    """Smallest gap between the two most likely classes first (ties: pool order). For
    findings: the image whose most uncertain finding is closest to its threshold first."""
    rows = np.flatnonzero(candidates)
    gap = (
        top_two_gap(pool.proba[rows])
        if pool.thresholds is None
        else threshold_gap(pool.proba[rows], pool.thresholds)
    )
    order = np.argsort(gap, kind="stable")[:k]
    return Ranking(rows[order], 1.0 - gap[order], "margin")


def threshold_gap(proba: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per image, the least distance of a finding's probability to that finding's threshold,
    on the scale of :func:`top_two_gap` (0: a finding on its threshold); ``(N,)``."""
    p = np.asarray(proba, np.float64)
    return np.clip(2 * np.abs(p - np.asarray(thresholds)[None, :]).min(axis=1), 0.0, 1.0)


def top_two_gap(proba: np.ndarray) -> np.ndarray:
    """``p(first) - p(second)`` per row of ``proba`` ``(N, K)``; ``(N,)``."""
    top = np.sort(np.asarray(proba, np.float64), axis=1)
    return top[:, -1] - (top[:, -2] if top.shape[1] > 1 else 0.0)


@register("typiclust")
def typiclust(pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator) -> Ranking:
    """TypiClust: the most typical image of each cluster without a label, largest first.

    The candidates and the labeled images are clustered (k-means of the standardized vectors)
    into ``labels known + k`` clusters, at most :data:`MAX_CLUSTERS` and the number of images.
    Clusters are visited by how many labeled images they hold (none first), then by size
    (largest first); each gives its most typical candidate. When fewer clusters than ``k``
    lack a label, the visit goes round again, each cluster giving its next most typical one.
    """
    if pool.vectors is None:
        raise ValueError("typiclust needs the pool's vectors")
    rows = np.flatnonzero(candidates | pool.labeled)
    if not candidates.any():
        return Ranking(np.zeros(0, np.int64), np.zeros(0), "typiclust")
    x = standardize(pool.vectors[rows])
    n_clusters = cluster_count(int(pool.class_counts.sum()), k, len(rows))
    clusters = kmeans(x, n_clusters, rng)
    typ = typicality(x, clusters)
    order = cluster_visits(clusters, typ, pool.labeled[rows], candidates[rows])[:k]
    return Ranking(rows[order], typ[order], "typiclust")


@register("hybrid")
def hybrid(pool: Pool, candidates: np.ndarray, k: int, rng: np.random.Generator) -> Ranking:
    """``typiclust`` while labels are scarce, then ``margin`` (:func:`hybrid_choice`)."""
    choice = hybrid_choice(pool.class_counts)
    ranking = STRATEGIES[choice](pool, candidates, k, rng)
    return Ranking(ranking.indices, ranking.scores, f"hybrid:{choice}")


def hybrid_choice(class_counts: np.ndarray) -> str:
    """The rule of ``hybrid``: ``typiclust`` when no label is known or some class has fewer
    than :data:`HYBRID_MIN_PER_CLASS` labels (a classifier that has seen so few examples of a
    class cannot tell what it is unsure about), else ``margin``.

    Args:
        class_counts: int ``(K,)`` labels known per class.
    """
    counts = np.asarray(class_counts)
    scarce = counts.size == 0 or counts.sum() == 0 or counts.min() < HYBRID_MIN_PER_CLASS
    return "typiclust" if scarce else "margin"


# --------------------------------------------------------------------------- typiclust parts


def cluster_count(labels_known: int, k: int, n_images: int) -> int:
    """``labels_known + k`` clusters, at most :data:`MAX_CLUSTERS` and ``n_images``."""
    return max(1, min(labels_known + k, MAX_CLUSTERS, n_images))


def standardize(x: np.ndarray) -> np.ndarray:
    """Each column of ``x`` ``(N, D)`` to zero mean and unit variance (constant columns to 0),
    as the classifier's scaler sees its input."""
    x = np.asarray(x, np.float32)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def kmeans(x: np.ndarray, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster ids ``(N,)`` of ``x`` ``(N, D)``: k-means, mini-batch above
    :data:`MINIBATCH_ABOVE` clusters, seeded from ``rng``."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    seed = int(rng.integers(2**31 - 1))
    if n_clusters > MINIBATCH_ABOVE:
        model = MiniBatchKMeans(n_clusters, random_state=seed, n_init=3, batch_size=4096)
    else:
        model = KMeans(n_clusters, random_state=seed, n_init=3)
    return model.fit_predict(x).astype(np.int64)


def typicality(x: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Per image: 1 / mean distance to its :data:`TYPICALITY_NEIGHBOURS` nearest neighbours in
    its cluster (all of them in a smaller cluster); 0 for an image alone in its cluster.

    Args:
        x: ``(N, D)`` vectors.
        clusters: int ``(N,)`` cluster ids.
    """
    from sklearn.neighbors import NearestNeighbors

    out = np.zeros(len(x))
    for members in _groups(clusters):
        n = min(TYPICALITY_NEIGHBOURS, len(members) - 1)
        if n < 1:
            continue
        dist, _ = NearestNeighbors(n_neighbors=n + 1).fit(x[members]).kneighbors(x[members])
        out[members] = 1.0 / (dist[:, 1:].mean(axis=1) + 1e-12)
    return out


def _groups(clusters: np.ndarray) -> list[np.ndarray]:
    """The rows of each cluster, clusters in id order, rows ascending."""
    _, index, sizes = np.unique(clusters, return_inverse=True, return_counts=True)
    return np.split(np.argsort(index, kind="stable"), np.cumsum(sizes)[:-1])


def cluster_visits(
    clusters: np.ndarray, typ: np.ndarray, labeled: np.ndarray, candidate: np.ndarray
) -> np.ndarray:
    """Every candidate in the order TypiClust picks them.

    Clusters are sorted by labeled images held (fewest first), then size (largest first); each
    round takes, from each cluster in that order, its most typical candidate not taken yet.

    Args:
        clusters: int ``(N,)`` cluster ids.
        typ: ``(N,)`` typicality.
        labeled: bool ``(N,)`` labeled images (cover their cluster, never picked).
        candidate: bool ``(N,)`` images that may be picked.

    Returns:
        int indices into the ``N`` images.
    """
    _, index, sizes = np.unique(clusters, return_inverse=True, return_counts=True)
    held = np.bincount(index[labeled], minlength=len(sizes))
    visit = np.empty(len(sizes), np.int64)
    visit[np.lexsort((-sizes, held))] = np.arange(len(sizes))  # each cluster's turn
    rows = np.flatnonzero(candidate)
    rows = rows[np.lexsort((-typ[rows], index[rows]))]  # by cluster, most typical first
    turn = _rank_in_group(index[rows])  # 0 for a cluster's most typical, 1 for the next, ...
    return rows[np.lexsort((visit[index[rows]], turn))]


def _rank_in_group(groups: np.ndarray) -> np.ndarray:
    """``0, 1, 2, ...`` within each run of equal values of ``groups`` ``(n,)``."""
    if not len(groups):
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(len(groups)) - np.repeat(starts, np.diff(np.r_[starts, len(groups)]))

"""Split assignment: the stratified, seeded 70/15/15 split and split names from a column.

A split assignment is an int64 array ``(N,)`` with 0 for train, 1 for val and 2 for test
(indices into ``SPLITS``). It is computed from labels alone, never from pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medcae.data.decode import DataError

SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
_SPLIT_ALIASES = {
    "train": 0,
    "training": 0,
    "val": 1,
    "valid": 1,
    "validation": 1,
    "test": 2,
    "testing": 2,
}


def _split_counts(n: int) -> tuple[int, int, int]:
    """Train/val/test counts for ``n`` samples of one class (>= 1 each where possible)."""
    n_val = max(1, int(n * SPLIT_FRACTIONS[1] + 0.5)) if n >= 3 else 0
    n_test = max(1, int(n * SPLIT_FRACTIONS[2] + 0.5)) if n >= 2 else 0
    return n - n_val - n_test, n_val, n_test


def _stratified_split(labels: np.ndarray, seed: int) -> np.ndarray:
    """Split index per sample, stratified 70/15/15 and seeded.

    Args:
        labels: int ``(N,)`` class ids.
        seed: Seed; the same labels and seed give the same assignment.

    Returns:
        int64 ``(N,)``: 0 train, 1 val, 2 test.
    """
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(labels), np.int64)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_train, n_val, _ = _split_counts(len(idx))
        assignment[idx[n_train : n_train + n_val]] = 1
        assignment[idx[n_train + n_val :]] = 2
    return assignment


def _parse_splits(values: Sequence[object], path: Path) -> np.ndarray:
    """Map a ``split`` column (``train``/``training``/``val``/``valid``/... ) to int64 ``(N,)``."""
    keys = [str(v).strip().lower() for v in values]
    bad = sorted({v for v in keys if v not in _SPLIT_ALIASES})
    if bad:
        raise DataError(f"{path}: column 'split' has values {bad[:5]}; expected train, val or test")
    return np.array([_SPLIT_ALIASES[v] for v in keys], np.int64)

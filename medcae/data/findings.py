"""Multi-label findings: several findings per image (``Effusion|Infiltration``), or none.

A multi-label source carries, per image, one int64 **bitmask** in the ``label`` column that
single-label sources use for a class id: bit ``i`` set means finding ``i``
(``label_names[i]``) is present, 0 means no finding. Every listing, store and split therefore
carries findings as it carries classes; :func:`decode` turns the masks into an ``(N, F)`` 0/1
matrix where a head is fitted or scored. At most :data:`MAX_FINDINGS` findings.

Sources:

- a CSV (or Parquet) with a ``labels`` column: findings separated by ``|``; an empty cell or
  the declared "no finding" name (default ``No Finding``, as ChestX-ray14 writes it) means none;
- a CSV with one 0/1 column per finding, named with ``--label-columns``;
- a MedMNIST ``.npz`` whose labels have several columns (ChestMNIST's ``(N, 14)``).

Without a split column, :func:`iterative_split` cuts 70/15/15 keeping each finding's share in
every split as far as its count allows (Sechidis, Tsoumakas and Vlahavas, 2011).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medcae.data.decode import DataError

log = logging.getLogger(__name__)

MAX_FINDINGS = 62
#: The "no finding" name of ChestX-ray14; ``--no-finding`` declares another.
NO_FINDING = "No Finding"
SEPARATOR = "|"


def encode(matrix: np.ndarray) -> np.ndarray:
    """``(N, F)`` 0/1 findings as int64 ``(N,)`` bitmasks."""
    m = np.asarray(matrix).astype(np.int64)
    if m.ndim != 2 or m.shape[1] > MAX_FINDINGS:
        raise DataError(f"findings: expected (N, F <= {MAX_FINDINGS}) 0/1, got shape {m.shape}")
    return (m << np.arange(m.shape[1], dtype=np.int64)).sum(axis=1).astype(np.int64)


def decode(labels: np.ndarray, num_findings: int) -> np.ndarray:
    """int64 ``(N,)`` bitmasks as ``(N, F)`` int64 0/1 findings."""
    y = np.asarray(labels, np.int64)
    return (y[:, None] >> np.arange(num_findings, dtype=np.int64)) & 1


def parse_findings(
    values: Sequence[str], where: Sequence[str], no_finding: str = NO_FINDING
) -> tuple[np.ndarray, list[str]]:
    """``labels`` cells (``"Effusion|Infiltration"``) as bitmasks and the sorted finding names.

    Args:
        values: One cell per image.
        where: One name per image for messages (``file.csv#row=3``).
        no_finding: The name that means none (compared case-insensitively), besides empty.

    Raises:
        DataError: More than :data:`MAX_FINDINGS` findings, or the no-finding name beside a
            finding in one cell.
    """
    none = no_finding.strip().lower()
    parsed = []
    for cell, at in zip(values, where):
        names = [v.strip() for v in str(cell).split(SEPARATOR) if v.strip()]
        if any(n.lower() == none for n in names):
            if len(names) > 1:
                raise DataError(
                    f"{at}: 'labels' is {cell!r}: {no_finding!r} (no finding) beside findings"
                )
            names = []
        parsed.append(sorted(set(names)))
    found = sorted({n for names in parsed for n in names})
    _check_count(found, where[0].split("#")[0] if where else "labels")
    index = {n: i for i, n in enumerate(found)}
    matrix = np.zeros((len(parsed), len(found)), np.int64)
    for r, names in enumerate(parsed):
        matrix[r, [index[n] for n in names]] = 1
    return encode(matrix), found


def parse_columns(
    rows: Sequence[dict[str, str]], columns: Sequence[str], path: Path, where: Sequence[str]
) -> tuple[np.ndarray, list[str]]:
    """One 0/1 column per finding (``--label-columns``) as bitmasks and the names as given.

    Raises:
        DataError: A column missing from the file, or a cell that is not 0 or 1 (naming the
            row, column and value).
    """
    _check_count(list(columns), str(path))
    matrix = np.zeros((len(rows), len(columns)), np.int64)
    for j, col in enumerate(columns):
        key = col.strip().lower()
        if rows and key not in rows[0]:
            raise DataError(
                f"{path}: --label-columns names {col!r}, which is not a column; found columns "
                f"{sorted(rows[0])}"
            )
        for r, (row, at) in enumerate(zip(rows, where)):
            cell = row.get(key, "").strip()
            if cell in ("1", "1.0"):
                matrix[r, j] = 1
            elif cell not in ("0", "0.0"):
                raise DataError(
                    f"{at}: finding column {col!r} holds {cell!r}; expected 0 or 1 (map "
                    "uncertain or blank values to 0 or 1 first)"
                )
    return encode(matrix), [c.strip() for c in columns]


def _check_count(names: Sequence[str], where: str) -> None:
    if len(names) > MAX_FINDINGS:
        raise DataError(f"{where}: {len(names)} findings; at most {MAX_FINDINGS} are supported")


def iterative_split(
    matrix: np.ndarray, seed: int, fractions: Sequence[float] = (0.70, 0.15, 0.15)
) -> np.ndarray:
    """Split ids (0 train, 1 val, 2 test) keeping every finding's share in every split as far
    as its count allows: iterative stratification (Sechidis et al., 2011), seeded.

    The rarest finding left is dealt first, each of its images to the split that most lacks
    that finding (ties: the split lacking most images, then at random); images without a
    finding fill the splits to their sizes last.
    """
    y = np.asarray(matrix, np.int64)
    n, f = y.shape
    rng = np.random.default_rng(seed)
    frac = np.asarray(fractions, np.float64)
    want_rows = frac * n
    want = frac[:, None] * y.sum(axis=0)[None, :]
    out = np.full(n, -1, np.int64)
    left = y.sum(axis=1) > 0
    while left.any():
        counts = y[left].sum(axis=0)
        counts = np.where(counts > 0, counts, np.iinfo(np.int64).max)
        rarest = np.flatnonzero(counts == counts.min())
        j = int(rng.choice(rarest))
        for r in rng.permutation(np.flatnonzero(left & (y[:, j] == 1))):
            key = np.lexsort((rng.random(len(frac)), -want_rows, -want[:, j]))
            s = int(key[0])
            out[r] = s
            want[s] -= y[r]
            want_rows[s] -= 1
            left[r] = False
    for r in rng.permutation(np.flatnonzero(out < 0)):
        s = int(np.argmax(want_rows + rng.random(len(frac)) * 1e-9))
        out[r] = s
        want_rows[s] -= 1
    return out


def split_presence(
    labels: np.ndarray, assignment: np.ndarray, names: Sequence[str]
) -> dict[str, list[int]]:
    """Positive images of each finding in train, val and test."""
    y = decode(labels, len(names))
    return {n: [int(y[assignment == s, j].sum()) for s in range(3)] for j, n in enumerate(names)}


def check_splits(
    labels: np.ndarray, splits: Sequence[str], names: Sequence[str], where: str
) -> None:
    """Refuse findings that cannot be fitted, calibrated and given a threshold: none positive
    in train (never seen in training) or in val; warn of a finding with none in test.

    Args:
        labels: int64 bitmasks of the labeled images.
        splits: Their split names (``train``, ``val``, ``test``).
        names: The finding names.
        where: The source, for messages.

    Raises:
        DataError: Naming each such finding and its counts per split.
    """
    ids = np.array([{"train": 0, "val": 1, "test": 2}.get(s, -1) for s in splits])
    counts = split_presence(labels, ids, names)
    for split, problem, hint in (
        (0, "never seen in training", "every finding needs positive images in train"),
        (
            1,
            "with no positive image in validation",
            "its calibration and threshold are "
            "chosen there. Give it more images, or drop it from the labels",
        ),
    ):
        missing = {n: c for n, c in counts.items() if c[split] == 0}
        if missing:
            listed = ", ".join(f"{n!r} (train/val/test positives {c})" for n, c in missing.items())
            raise DataError(f"{where}: finding(s) {problem}: {listed}; {hint}")
    for n, c in counts.items():
        if c[2] == 0:
            log.warning("%s: finding %r has no positive image in test: no test AUC", where, n)

"""Retraining on the labels of a labeling loop, and the challenger's comparison (Ray-free).

A retraining job (``medcae retrain``, :mod:`medcae.cli.retrain`) trains the champion's
configuration again on its own labels plus the loop's:

- the champion's data is listed as it was; of its training split, the labels the champion used
  (its budget, drawn again with its seed, :func:`budget_rows`) stay labeled, the other training
  images join the CAE's unlabeled images;
- each loop label becomes a row of the training split, or of the test split when its image is
  *held out* (:func:`held_out`: a fixed share chosen by the image id's hash, so an image is held
  out in every round or in none, and the share is fixed when the job starts: the snapshot of
  labels the server hands the job records each label's split);
- every training label is used (the budget is the labels given).

The challenger and the champion are then compared on the same images, the champion's test
split plus the held-out labels (:func:`compare`): AUC with DeLong's interval and paired test,
accuracy and balanced accuracy with Wilson intervals.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medcae.data import DataError, Rows
from medcae.data.findings import NO_FINDING, SEPARATOR
from medcae.labeling.pool import LabelPool

#: Share of the loop's labels held out for the comparison (by image id; fixed).
HELD_OUT_SHARE = 0.2
#: Columns of a labels snapshot (the ``GET .../labels`` export adds the audit columns).
SNAPSHOT_COLUMNS = ("image_id", "label", "split")


def held_out(image_id: str, share: float = HELD_OUT_SHARE) -> bool:
    """Whether a loop label is held out for the comparison: ``sha256(id)`` below ``share``."""
    h = int(hashlib.sha256(f"held-out:{image_id}".encode()).hexdigest()[:12], 16)
    return h / float(16**12) < share


def read_snapshot(path: str | Path) -> list[tuple[str, str, str]]:
    """``(image_id, label, split)`` rows of a labels snapshot CSV.

    Raises:
        DataError: A missing column, an empty label or a split that is not ``train``/``test``,
            named by file and line.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in SNAPSHOT_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; expected {SNAPSHOT_COLUMNS}")
            rows = []
            for n, row in enumerate(reader, 2):
                image, label, split = (row[c].strip() for c in SNAPSHOT_COLUMNS)
                if not image or not label or split not in ("train", "test"):
                    raise DataError(
                        f"{path}, line {n}: expected an image id, a label and the split "
                        f"train or test, got {image!r}, {label!r}, {split!r}"
                    )
                rows.append((image, label, split))
    except OSError as err:
        raise DataError(f"{path}: cannot read the labels ({err.strerror or err})") from err
    return rows


def label_values(
    labels: Sequence[str], names: Sequence[str], multilabel: bool, where: str
) -> np.ndarray:
    """Class ids (or findings bitmasks) of label texts, against the model's names.

    Raises:
        DataError: A label that is not one of ``names`` (a finding: ``A|B``), naming it.
    """
    index = {n: i for i, n in enumerate(names)}
    if multilabel:
        out = np.zeros(len(labels), np.int64)
        for row, text in enumerate(labels):
            parts = [p.strip() for p in text.split(SEPARATOR) if p.strip()]
            if [p.lower() for p in parts] == [NO_FINDING.lower()]:
                continue
            unknown = [p for p in parts if p not in index]
            if unknown:
                raise DataError(
                    f"{where}: {text!r}: {unknown} are not findings of the model: {list(names)}"
                    f" (or {NO_FINDING!r})"
                )
            for p in parts:
                out[row] |= 1 << index[p]
        return out
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise DataError(f"{where}: label(s) {unknown} are not classes of the model: {list(names)}")
    return np.asarray([index[lab] for lab in labels], np.int64)


def budget_rows(labels: np.ndarray, budget: float, seed: int, findings: int = 0) -> np.ndarray:
    """Indices (into ``labels``, rows sorted by id as the pipeline embeds them) of the
    training labels a model of this budget and seed used (``findings``: how many, for
    bitmask labels)."""
    from medcae.model.classifier import sample_budget, sample_findings_budget

    if findings:
        from medcae.data.findings import decode

        return sample_findings_budget(decode(labels, findings), budget, seed)
    return sample_budget(labels, budget, seed)


def loop_rows(
    original: Rows,
    pool: LabelPool,
    snapshot: Sequence[tuple[str, str, str]],
    budget: float,
    seed: int,
    where: str = "labels",
) -> Rows:
    """The retraining listing: ``original`` with its unused training labels unlabeled, plus
    one row per loop label (see the module docstring).

    Raises:
        DataError: A labeled id that is no longer in the pool, or a label the model does not
            know (both name the label's image).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = original.table
    names = list(original.label_names)
    train = np.flatnonzero(np.asarray(table.column("split").to_pylist()) == "train")
    if len(train):
        ids = table.column("id").take(pa.array(train)).to_pylist()
        order = train[np.argsort(np.asarray(ids, dtype=object), kind="stable")]
        y = table.column("label").to_numpy()[order]
        findings = len(names) if original.multilabel else 0
        kept = set(order[budget_rows(y, budget, seed, findings)].tolist())
        unused = np.asarray([i for i in train if i not in kept], np.int64)
        if len(unused):
            mask = np.zeros(len(table), bool)
            mask[unused] = True
            splits = pc.if_else(pa.array(mask), "unlabeled", table.column("split"))
            labels = pc.if_else(pa.array(mask), pa.scalar(-1, pa.int64()), table.column("label"))
            table = table.set_column(table.schema.get_field_index("split"), "split", splits)
            table = table.set_column(table.schema.get_field_index("label"), "label", labels)
    missing = [image for image, _, _ in snapshot if image not in pool]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} labeled image(s) are no longer in the pool {pool.source} "
            f"(first: {missing[0]}); list the pool as it was labeled"
        )
    values = label_values([lab for _, lab, _ in snapshot], names, original.multilabel, where)
    new: dict[str, list[Any]] = {"id": [], "split": [], "label": [], "path": [], "data": []}
    for (image, _, split), value in zip(snapshot, values):
        payload = pool.payload(image)
        new["id"].append(f"label:{image}")
        new["split"].append(split)
        new["label"].append(int(value))
        new["path"].append(None if isinstance(payload, bytes) else str(payload))
        new["data"].append(payload if isinstance(payload, bytes) else None)
    added = pa.table(
        {
            "id": pa.array(new["id"], pa.string()),
            "split": pa.array(new["split"], pa.string()),
            "label": pa.array(new["label"], pa.int64()),
            "path": pa.array(new["path"], pa.string()),
            "data": pa.array(new["data"], pa.binary()),
        }
    )
    for column, kind in (("path", pa.string()), ("data", pa.binary())):
        if column not in table.column_names:
            table = table.append_column(column, pa.nulls(len(table), kind))
    combined = pa.concat_tables([table.select(added.column_names), added])
    return replace(original, table=combined)


def _accuracy(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, Any]:
    from medcae.metrics.decision import wilson_interval

    hits = int((y == pred).sum())
    recalls = [float((pred[y == c] == c).mean()) for c in range(k) if (y == c).any()]
    return {
        "accuracy": {"value": hits / len(y), "ci": list(wilson_interval(hits, len(y)))},
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
    }


def compare(
    y: np.ndarray,
    champion: np.ndarray,
    challenger: np.ndarray,
    names: Sequence[str],
    multilabel: bool = False,
    champion_pred: np.ndarray | None = None,
    challenger_pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """The challenger against the champion on the same images.

    Args:
        y: ``(N,)`` class ids (or findings bitmasks).
        champion, challenger: ``(N, K)`` probabilities of each.
        names: Classes (or findings).
        multilabel: Findings.
        champion_pred, challenger_pred: ``(N,)`` each model's decisions at its operating
            point (default: the most probable class).

    Returns:
        ``{"n", "champion": {...}, "challenger": {...}, "tests": [...]}``: per model the AUC
        (two classes: the positive class's with DeLong's interval; more: the mean one-vs-rest;
        findings: the mean per finding), accuracy (Wilson interval) and balanced accuracy
        (single-label); ``tests`` holds DeLong's paired test per compared score (``class``
        names it; ``difference`` is challenger minus champion, ``p`` two-sided).
    """
    from medcae.metrics.decision import delong_interval, delong_test

    y = np.asarray(y)
    k = len(names)
    out: dict[str, Any] = {"n": int(len(y)), "champion": {}, "challenger": {}, "tests": []}
    scored = [1] if k == 2 and not multilabel else list(range(k))
    aucs: dict[str, list[float]] = {"champion": [], "challenger": []}
    for c in scored:
        truth = ((y >> c) & 1) == 1 if multilabel else y == c
        if truth.all() or not truth.any():
            continue
        for who, p in (("champion", champion), ("challenger", challenger)):
            aucs[who].append(delong_interval(truth, p[:, c])["value"])
            if len(scored) == 1:
                out[who]["auc"] = delong_interval(truth, p[:, c])
        t = delong_test(truth, challenger[:, c], champion[:, c])
        out["tests"].append(
            {
                "class": names[c],
                "auc_champion": t["auc_b"],
                "auc_challenger": t["auc_a"],
                "difference": t["difference"],
                "z": t["z"],
                "p": t["p"],
            }
        )
    for who in ("champion", "challenger"):
        if len(scored) > 1 and aucs[who]:
            out[who]["auc"] = {"value": float(np.mean(aucs[who])), "ci": None}
    if not multilabel:
        for who, p, pred in (
            ("champion", champion, champion_pred),
            ("challenger", challenger, challenger_pred),
        ):
            decided = np.asarray(pred) if pred is not None else p.argmax(1)
            out[who].update(_accuracy(y, decided, k))
    return out


def compare_summary(result: Mapping[str, Any]) -> str:
    """One line: ``challenger AUC 0.912 vs champion 0.874 (+0.038, DeLong p=0.04, n=96)``."""
    ch, cp = result.get("challenger", {}), result.get("champion", {})
    a, b = (ch.get("auc") or {}).get("value"), (cp.get("auc") or {}).get("value")
    tests = result.get("tests") or []
    n = result.get("n", 0)
    if a is None or b is None:
        acc_a = (ch.get("accuracy") or {}).get("value", float("nan"))
        acc_b = (cp.get("accuracy") or {}).get("value", float("nan"))
        return f"challenger accuracy {acc_a:.3f} vs champion {acc_b:.3f} (n={n})"
    p = f", DeLong p={tests[0]['p']:.3g}" if len(tests) == 1 else ""
    return f"challenger AUC {a:.3f} vs champion {b:.3f} ({a - b:+.3f}{p}, n={n})"

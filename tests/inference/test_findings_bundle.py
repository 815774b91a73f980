"""A multi-label bundle (the demo's findings variant) from fit to prediction: one head,
calibration and threshold per finding, and every reader of the bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medcae.data.findings import decode
from medcae.inference.explain import explain
from medcae.inference.predictions import prediction_schema, prediction_table
from medcae.inference.predictor import NO_FINDING_LABEL, Predictor

NAMES = ["nodule", "ring", "effusion"]


@pytest.fixture(scope="module")
def loaded(findings_bundle):
    return Predictor.from_bundle(findings_bundle.path)


def test_the_bundle_records_a_head_threshold_and_calibration_per_finding(findings_bundle):
    meta = json.loads((findings_bundle.path / "bundle.json").read_text())
    assert meta["task"] == "multilabel" and meta["label_names"] == NAMES
    ops = meta["operating_point"]["findings"]
    assert list(ops) == NAMES and all(op["rule"] == "youden" for op in ops.values())
    assert all(0 < op["threshold"] < 1 for op in ops.values())
    assert set(meta["calibration"]["findings"]) == set(NAMES)
    test = meta["metrics"]["test"]
    per = test["decision"]["per_finding"]
    assert set(per) == set(NAMES) and test["auc"] == pytest.approx(
        np.mean([per[n]["auc"]["value"] for n in NAMES])
    )
    assert meta["data_summary"]["totals"]["test"] == 80


def test_labels_follow_each_findings_own_threshold(findings_bundle, loaded):
    out = loaded.predict_arrays(findings_bundle.test_images)
    np.testing.assert_allclose(out["proba"], findings_bundle.expected_proba, atol=1e-9)
    assert not np.allclose(out["proba"].sum(axis=1), 1)  # each finding its own probability
    preds = loaded.predictions(out)
    thresholds = preds[0].thresholds
    assert list(thresholds) == NAMES
    for p, q in zip(preds, out["proba"]):
        present = [n for n, v in zip(NAMES, q) if v >= thresholds[n]]
        assert p.label == ("|".join(present) or NO_FINDING_LABEL)
        assert p.findings == {n: n in present for n in NAMES}
    labels = {p.label for p in preds}
    assert NO_FINDING_LABEL in labels and any("|" in lab for lab in labels)
    # the decisions agree with the truth better than chance, per finding
    truth = decode(findings_bundle.test_labels, 3)
    decided = np.array([[p.findings[n] for n in NAMES] for p in preds])
    assert ((decided == truth).mean(axis=0) > 0.6).all()


def test_the_prediction_table_has_a_column_per_finding(findings_bundle, loaded):
    preds = loaded.predict(findings_bundle.test_images[:5])
    table = prediction_table([f"{i}.png" for i in range(5)], preds, NAMES)
    assert table.schema == prediction_schema(NAMES, findings=True)
    for n in NAMES:
        assert table.column(f"finding_{n}").to_pylist() == [int(p.findings[n]) for p in preds]
    assert table.column("threshold").to_pylist() == [None] * 5


def test_explain_draws_a_map_per_finding(findings_bundle, loaded):
    image = findings_bundle.test_images[0]
    for n in NAMES:
        exp = explain(loaded, image, n)
        assert exp.label == n
        assert exp.contributions.sum() + exp.intercept == pytest.approx(exp.decision, abs=1e-6)
    top = max(NAMES, key=loaded.predict([image])[0].probabilities.__getitem__)
    assert explain(loaded, image).label == top


def test_the_card_gives_each_finding_its_threshold_and_intervals(loaded):
    card = loaded.card
    for n, op in loaded.meta["operating_point"]["findings"].items():
        assert f"| {n} | `youden` | {op['threshold']:.3f} |" in card
    assert "Positive images per finding and split" in card and "| images |" in card
    assert "AUC (macro over findings)" in card and "Micro (every image and finding pooled)" in card

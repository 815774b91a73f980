import numpy as np
import pytest

from medcae.config import ClassifierConfig
from medcae.metrics.classification import auc_score, classification_report, format_results
from medcae.model.classifier import BudgetError, LinearHead, fit_classifier, sample_budget

LABELS = np.array([0] * 100 + [1] * 300 + [2] * 50)


@pytest.mark.parametrize(
    "budget, per_class",
    [
        (1.0, [100, 300, 50]),
        (0.1, [10, 30, 5]),
        (0.01, [1, 3, 1]),
        (20, [20, 20, 20]),
        (1, [1, 1, 1]),
        (50.0, [50, 50, 50]),
    ],
)
def test_budget_is_stratified(budget, per_class):
    idx = sample_budget(LABELS, budget, seed=3)
    assert np.bincount(LABELS[idx], minlength=3).tolist() == per_class
    assert len(np.unique(idx)) == len(idx)


def test_budget_is_reproducible_and_seeded():
    a = sample_budget(LABELS, 0.1, seed=1)
    assert np.array_equal(a, sample_budget(LABELS, 0.1, seed=1))
    assert not np.array_equal(a, sample_budget(LABELS, 0.1, seed=2))


@pytest.mark.parametrize(
    "budget, match", [(51, "only 50"), (0, "budget"), (2.5, "budget"), (-0.1, "budget")]
)
def test_budget_errors(budget, match):
    with pytest.raises(BudgetError, match=match):
        sample_budget(LABELS, budget)


def _blobs(rng, n, k, d=6):
    y = rng.integers(0, k, n)
    centers = rng.normal(0, 2.0, (k, d))
    return centers[y] + rng.normal(0, 1.0, (n, d)), y


@pytest.mark.parametrize("kind", ["logreg", "linear_svm"])
@pytest.mark.parametrize("k", [2, 3])
def test_head_matches_sklearn_and_round_trips_as_arrays(kind, k, rng):
    x, y = _blobs(rng, 400, k)
    cfg = ClassifierConfig(kind=kind, budget=1.0, C_grid=(0.1, 1.0))
    head, sel = fit_classifier(cfg, x[:300], y[:300], x[300:], y[300:], k)
    p = head.predict_proba(x[300:])
    assert p.shape == (100, k) and np.allclose(p.sum(1), 1)
    assert sel["C"] in (0.1, 1.0) and sel["val_auc"] > 0.8
    again = LinearHead.from_arrays(kind, k, head.to_arrays())
    np.testing.assert_array_equal(again.predict_proba(x[300:]), p)
    assert (p.argmax(1) == y[300:]).mean() > 0.7


def test_auc_multiclass_is_macro_ovr():
    y = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y]
    assert auc_score(y, perfect, 3) == 1.0
    assert auc_score(y, np.roll(perfect, 1, axis=1), 3) == pytest.approx(0.25)


def test_report_and_table():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    r = classification_report(y, p, ["normal", "pneumonia"])
    assert r["acc"] == 0.75 and r["auc"] == 1.0
    assert r["per_class"]["pneumonia"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["normal"]["recall"] == 0.5
    table = format_results({"m": r}, ["normal", "pneumonia"])
    assert "0.750" in table and "P/R pneumonia" in table


@pytest.mark.parametrize(
    "kind, k", [("logreg", 2), ("logreg", 3), ("linear_svm", 2), ("linear_svm", 3)]
)
def test_average_heads_decides_by_the_members_mean_decision(kind, k):
    from medcae.model.classifier import _fit_once, average_heads

    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 90)
    a = rng.normal(size=(90, 5)) + y[:, None] * 0.8
    b = rng.normal(size=(90, 3)) * 4 - y[:, None]
    ha, hb = _fit_once(kind, a, y, 1.0, 0, k), _fit_once(kind, b, y, 0.1, 0, k)
    both = average_heads([ha, hb])
    x = np.concatenate([a, b], axis=1)

    def scaled(h, f):  # each member's decision as its probabilities see it
        return h.decision(f) * h.platt[:, 0] + h.platt[:, 1]

    np.testing.assert_allclose(both.decision(x), (scaled(ha, a) + scaled(hb, b)) / 2, atol=1e-10)
    p = both.predict_proba(x)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert p.shape == (90, k) and auc_score(y, p, k) > 0.7


def test_average_heads_refuses_mixed_heads():
    from medcae.model.classifier import _fit_once, average_heads

    rng = np.random.default_rng(0)
    x, y2, y3 = rng.normal(size=(30, 4)), np.arange(30) % 2, np.arange(30) % 3
    with pytest.raises(ValueError, match="one kind and class count"):
        average_heads(
            [_fit_once("logreg", x, y2, 1.0, 0, 2), _fit_once("logreg", x, y3, 1.0, 0, 3)]
        )
    with pytest.raises(ValueError, match="one kind and class count"):
        average_heads([])

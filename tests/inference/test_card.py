"""Model cards: the bootstrap, the rendering, and the card a bundle carries and verifies."""

import json
import re
import shutil

import numpy as np
import pytest

from medcae.inference.bundle import BundleError, read_bundle, write_bundle
from medcae.inference.card import MIN_TEST_PER_CLASS, model_card
from medcae.inference.predictor import Predictor
from medcae.metrics.classification import accuracy, auc_score, balanced_accuracy, rank_auc
from medcae.metrics.intervals import bootstrap_ci, bootstrap_intervals

SECTIONS = (
    "## Model",
    "## Intended use",
    "## Not intended use",
    "## Data",
    "## Evaluation",
    "## Decisions and calibration",
    "## Out-of-distribution flag",
    "## Known limitations",
    "## Versions",
)


def _scores(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(n,)`` and informative probabilities ``(n, k)``."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    p[np.arange(n), y] += 0.6
    return y, p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_brackets_the_estimate_and_repeats_with_its_seed():
    y, p = _scores(200, 2)
    low, high = bootstrap_ci(y, p, rank_auc, n=300, seed=3)
    assert low < rank_auc(y, p) < high
    assert (low, high) == bootstrap_ci(y, p, rank_auc, n=300, seed=3)
    assert (low, high) != bootstrap_ci(y, p, rank_auc, n=300, seed=4)


def test_bootstrap_narrows_with_more_data():
    widths = [np.diff(bootstrap_ci(*_scores(n, 3), accuracy, n=300)).item() for n in (60, 2000)]
    assert widths[1] < widths[0] / 3  # about sqrt(2000 / 60) = 5.8 times narrower


def test_bootstrap_redraws_resamples_that_miss_a_class():
    y = np.array([1] + [0] * 19)  # one positive: about a third of resamples miss it
    p = np.stack([1 - np.linspace(0, 1, 20), np.linspace(0, 1, 20)], axis=1)
    seen = []

    def metric(yy: np.ndarray, pp: np.ndarray) -> float:
        seen.append(len(np.unique(yy)))
        return rank_auc(yy, pp)

    low, high = bootstrap_ci(y, p, metric, n=200)
    assert len(seen) == 200 and set(seen) == {2}
    assert 0 <= low <= high <= 1
    assert np.isnan(bootstrap_ci(np.zeros(10, int), p[:10], rank_auc, n=50)).all()


@pytest.mark.parametrize(
    ("y", "p", "kw", "match"),
    [
        (np.zeros(0, int), np.zeros((0, 2)), {}, "non-empty"),
        (np.zeros(3, int), np.zeros((4, 2)), {}, "matching"),
        (np.zeros(3, int), np.zeros((3, 2)), {"alpha": 1.5}, "alpha"),
        (np.zeros(3, int), np.zeros((3, 2)), {"n": 0}, "n >= 1"),
    ],
)
def test_bootstrap_refuses_bad_input(y, p, kw, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(y, p, accuracy, **kw)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_card_metrics_agree_with_the_test_report(k):
    from sklearn.metrics import balanced_accuracy_score

    y, p = _scores(150, k, seed=k)
    p = np.round(p, 1) + 1e-3  # ties
    p /= p.sum(axis=1, keepdims=True)  # rows sum to 1, as the report's multi-class AUC wants
    assert rank_auc(y, p) == pytest.approx(auc_score(y, p, k), abs=1e-12)
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p.argmax(1)))
    assert accuracy(y, p) == pytest.approx((p.argmax(1) == y).mean())


# --------------------------------------------------------------------------- rendering


def test_a_card_of_sparse_metadata_says_what_was_not_recorded():
    text = model_card({"label_names": ["a", "b"], "data": "x"})
    assert all(s in text for s in SECTIONS)
    assert "Images per class and split: not recorded" in text
    assert "Confidence intervals: not recorded" in text


def test_few_test_images_of_a_class_are_named_as_a_limitation():
    counts = {"test": {"a": 50, "b": MIN_TEST_PER_CLASS - 1}}
    meta = {"label_names": ["a", "b"], "data_summary": {"counts": counts, "unlabeled": 0}}
    text = model_card({**meta, "data_summary": {**meta["data_summary"], "cae_train_images": 0}})
    assert f"class(es) b ({MIN_TEST_PER_CLASS - 1})" in text and "a (50)" not in text


def test_the_card_says_why_the_representation_was_chosen_and_lists_baselines():
    base = {"acc": 0.7, "auc": 0.81, "balanced_acc": 0.69}
    meta = {"metrics": {"test": base, "baseline_frozen_test": base, "cae_history": [{}]}}
    assert "not searched" in model_card(meta)
    assert "| baseline_frozen_test | 0.810 | 0.700 | 0.690 |" in model_card(meta)
    searched = {**meta, "metrics": {"test": base, "search_best_trial": {"cae.width": 32}}}
    why = model_card(searched)
    assert "hyperparameter search" in why and "cae.width=32" in why
    chosen = {"representation": {"name": "pooled stage3 maps", "reason": "best on val"}}
    assert "Representation: pooled stage3 maps" in model_card(chosen)
    assert "Why this representation: best on val" in model_card(chosen)


# --------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def loaded(demo_bundle):
    meta, _, _ = read_bundle(demo_bundle.path)
    return meta


def test_the_bundle_card_has_every_section_and_the_real_numbers(demo_bundle, demo_npz, loaded):
    from medcae.data import load_dataset

    card = (demo_bundle.path / "MODEL_CARD.md").read_text()
    assert loaded["model_card"] == card == Predictor.from_bundle(demo_bundle.path).card
    positions = [card.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    ds, names = load_dataset(str(demo_npz)), loaded["label_names"]
    for split, n in {"train": 240, "val": 80, "test": 80}.items():  # the fixture's sizes
        c = np.bincount(ds.splits[split].labels[:n], minlength=len(names))
        assert f"| {split} | " + " | ".join(map(str, c)) + f" | {n} |" in card
    assert np.bincount(demo_bundle.test_labels).tolist() == [
        loaded["data_summary"]["counts"]["test"][k] for k in names
    ]
    assert "trained without labels on 240 images" in card
    assert f"{loaded['ood']['threshold']:.6g}" in card and "99th percentile" in card
    assert loaded["created"] in card and "Bundle format version: 3" in card
    assert all(f"- {k}: {v}" in card for k, v in loaded["versions"].items())


def test_the_card_intervals_bracket_the_test_metrics(demo_bundle, loaded):
    test, ci = loaded["metrics"]["test"], loaded["metrics"]["test_ci"]
    again = bootstrap_intervals(demo_bundle.test_labels, demo_bundle.expected_proba)
    assert json.loads(json.dumps(again)) == ci  # from the real test predictions, seeded
    card = loaded["model_card"]
    for key, name in [("auc", "AUC"), ("acc", "Accuracy"), ("balanced_acc", "Balanced")]:
        low, high = ci[key]
        assert low <= test[key] <= high
        row = re.search(rf"^\| {name}[^|]* \| ([\d.]+) \| ([\d.]+) - ([\d.]+) \|$", card, re.M)
        assert row, f"no {name} row in the card"
        assert [float(v) for v in row.groups()] == pytest.approx([test[key], low, high], abs=5e-4)
    assert f"spans {ci['auc'][1] - ci['auc'][0]:.3f}" in card


def test_a_tampered_or_missing_card_is_refused_naming_it(demo_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(demo_bundle.path, bad)
    with open(bad / "MODEL_CARD.md", "a") as f:
        f.write("\nAlso approved for diagnosis.\n")
    with pytest.raises(BundleError, match=r"MODEL_CARD\.md: its sha256 does not match"):
        read_bundle(bad)
    (bad / "MODEL_CARD.md").unlink()
    with pytest.raises(BundleError, match=r"misses files .*\['MODEL_CARD\.md'\]"):
        read_bundle(bad)


def _as_format_1(src, dest):
    """A bundle as medcae wrote them before model cards."""
    shutil.copytree(src, dest)
    (dest / "MODEL_CARD.md").unlink()
    (dest / "reliability.png").unlink()
    meta = json.loads((dest / "bundle.json").read_text())
    del meta["files"]["MODEL_CARD.md"], meta["data_summary"], meta["metrics"]["test_ci"]
    del meta["files"]["reliability.png"]
    (dest / "bundle.json").write_text(json.dumps({**meta, "format_version": 1}))
    return dest


def test_a_format_1_bundle_loads_with_a_card_that_says_so(demo_bundle, tmp_path):
    old = _as_format_1(demo_bundle.path, tmp_path / "old")
    pred = Predictor.from_bundle(old)
    np.testing.assert_allclose(
        pred.predict_proba(demo_bundle.test_images[:4]), demo_bundle.expected_proba[:4], atol=1e-6
    )
    assert "format version 1" in pred.card and "Retrain" in pred.card
    assert all(s in pred.card for s in SECTIONS)
    assert "not recorded" in pred.card and f"{pred.ood_threshold:.6g}" in pred.card
    (old / "MODEL_CARD.md").write_text("# planted\n")  # a format 1 bundle lists no card
    with pytest.raises(BundleError, match=r"does not list: \['MODEL_CARD\.md'\]"):
        read_bundle(old)


@pytest.mark.parametrize(("version", "match"), [(4, "newer medcae"), ("3", "expected one of")])
def test_unknown_format_versions_are_refused(demo_bundle, tmp_path, version, match):
    dest = tmp_path / "b"
    shutil.copytree(demo_bundle.path, dest)
    meta = json.loads((dest / "bundle.json").read_text())
    (dest / "bundle.json").write_text(json.dumps({**meta, "format_version": version}))
    with pytest.raises(BundleError, match=match):
        read_bundle(dest)


def test_rewriting_a_loaded_bundle_renders_a_fresh_card(demo_bundle, tmp_path):
    meta, state, arrays = read_bundle(demo_bundle.path)
    dest = write_bundle(tmp_path / "again", {**meta, "format_version": 1}, state, arrays)
    stored = json.loads((dest / "bundle.json").read_text())
    assert "model_card" not in stored and stored["format_version"] == 3
    again, _, _ = read_bundle(dest)
    assert again["model_card"] == (dest / "MODEL_CARD.md").read_text()
    assert again["created"] in again["model_card"]


def test_the_card_states_the_operating_point_and_the_calibration(demo_bundle, loaded):
    card, cal = loaded["model_card"], loaded["calibration"]
    assert "Operating point: `argmax`" in card  # three exclusive classes
    assert f"Calibration: {cal['reason']}." in card
    for split in ("val", "test"):
        for when in ("before", "after"):
            r = cal[split][when]
            assert f"| {r['ece']:.3f} | {r['brier']:.3f} | {r['log_loss']:.3f} |" in card
    assert "![Reliability diagram: validation and test](reliability.png)" in card
    per = loaded["metrics"]["test"]["decision"]["per_class"]
    assert set(per) == set(loaded["label_names"]) and "Wilson score" in card
    assert "Probability calibration was not evaluated" not in card


def test_a_binary_card_gives_the_threshold_and_the_decisions_with_intervals():
    from medcae.metrics.decision import decision_report
    from medcae.model.operating_point import choose_operating_point

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = 1 / (1 + np.exp(-(rng.normal(size=200) + 2 * y - 1)))
    p = np.stack([1 - s, s], 1)
    op = choose_operating_point("sensitivity=0.9", y, p)
    decision = decision_report(y, p, op.decide(p), ["normal", "pneumonia"], 1)
    meta = {
        "label_names": ["normal", "pneumonia"],
        "operating_point": op.to_dict(),
        "calibration": {"method": "platt", "reason": "platt: chosen"},
        "metrics": {"test": {"decision": decision}},
    }
    card = model_card(meta)
    assert f"`pneumonia` when its probability is at least **{op.threshold:.4f}**" in card
    assert "`sensitivity=0.9`" in card
    sens = decision["sensitivity"]
    row = f"| Sensitivity | {sens['value']:.3f} | {sens['ci'][0]:.3f} - {sens['ci'][1]:.3f} | "
    assert row + f"{sens['k']}/{sens['n']} |" in card
    assert "| AUC (DeLong) |" in card

"""Calibration, the operating point and what a decision is worth, on synthetic heads.

The heads are real scikit-learn fits on Gaussian features; overconfident ones come from a
weak regularisation on few labels, underconfident ones from a strong one.
"""

from __future__ import annotations

import numpy as np
import pytest

from medcae.config import ClassifierConfig, ConfigError, parse_operating_point
from medcae.metrics.calibration import (
    brier_score,
    calibration_report,
    expected_calibration_error,
    log_loss,
)
from medcae.metrics.classification import rank_auc
from medcae.metrics.decision import (
    decision_report,
    delong,
    delong_interval,
    delong_test,
    wilson_interval,
)
from medcae.metrics.intervals import bootstrap_ci
from medcae.model.calibration import fit_calibration
from medcae.model.classifier import fit_classifier
from medcae.model.operating_point import OperatingPoint, choose_operating_point


def _data(rng, n, k, signal=1.2, dim=30):
    y = rng.integers(0, k, n)
    x = rng.normal(size=(n, dim))
    x[:, :k] += signal * np.eye(k)[y]
    return x, y


def _head(k, c, n_train, seed=0):
    rng = np.random.default_rng(seed)
    xs = {s: _data(rng, n, k) for s, n in (("train", n_train), ("val", 300), ("test", 3000))}
    cfg = ClassifierConfig(C_grid=(c,), seed=seed)
    head, _ = fit_classifier(cfg, *xs["train"], *xs["val"], k)
    return head, xs


def _per_class_auc(y, p):
    return [
        rank_auc((y == c).astype(int), np.stack([1 - p[:, c], p[:, c]], 1))
        for c in range(p.shape[1])
    ]


@pytest.mark.parametrize("method", ["auto", "temperature", "platt"])
# (C = 10 keeps the logits within +-37, where float64 probabilities of 0 and 1 stay distinct;
# beyond, a saturated 1.0 ties images that calibration would tell apart)
@pytest.mark.parametrize("c", [10.0, 1e-3], ids=["overconfident", "underconfident"])
def test_binary_calibration_keeps_the_ranking_and_lowers_the_ece(method, c):
    head, xs = _head(2, c, 40)
    cal = fit_calibration(head, *xs["val"], method)
    after = cal.apply(head)
    x, y = xs["test"]
    p0, p1 = head.predict_proba(x), after.predict_proba(x)
    np.testing.assert_allclose(_per_class_auc(y, p1), _per_class_auc(y, p0), atol=1e-9)
    assert cal.slope > 0
    if method != "auto":
        assert cal.method == method
    else:  # auto never picks what did worse under cross-validation
        assert cal.cv_log_loss[cal.method] == min(cal.cv_log_loss.values())
    assert expected_calibration_error(y, p1) < expected_calibration_error(y, p0)
    assert log_loss(y, p1) < log_loss(y, p0)


def test_several_classes_auto_keeps_each_class_ranking_and_sums_to_one():
    head, xs = _head(3, 10.0, 45)  # overconfident: the prior mixture softens it
    cal = fit_calibration(head, *xs["val"], prior=np.array([1, 1, 1]))
    assert cal.method == "prior" and 0 < cal.weight < 1
    x, y = xs["test"]
    p0, p1 = head.predict_proba(x), cal.apply(head).predict_proba(x)
    np.testing.assert_allclose(p1.sum(axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(_per_class_auc(y, p1), _per_class_auc(y, p0), atol=1e-9)
    assert brier_score(y, p1) < brier_score(y, p0)
    # the calibrated head round-trips through the bundle's arrays
    again = type(head).from_arrays(head.kind, 3, cal.apply(head).to_arrays())
    np.testing.assert_allclose(again.predict_proba(x), p1, atol=1e-12)


def test_temperature_for_several_classes_is_asked_for_and_keeps_the_decisions():
    head, xs = _head(3, 1e3, 45)
    cal = fit_calibration(head, *xs["val"], "temperature")
    assert "may reorder" in cal.reason and cal.slope < 1  # overconfident: cooled
    x, _ = xs["test"]
    p1 = cal.apply(head).predict_proba(x)
    np.testing.assert_array_equal(p1.argmax(1), head.predict_proba(x).argmax(1))
    with pytest.raises(ValueError, match="does not apply to 3 classes"):
        fit_calibration(head, *xs["val"], "platt")


def test_calibration_with_too_few_validation_images_of_a_class_is_none_and_says_why():
    head, xs = _head(2, 1.0, 40)
    x, y = xs["val"]
    keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:1]]
    cal = fit_calibration(head, x[keep], y[keep])
    assert cal.method == "none" and "fewer than 2" in cal.reason


def test_calibration_metrics_on_known_values():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])
    assert brier_score(y, p) == pytest.approx((0.01 + 0.16 + 0.16 + 0.04) / 4)
    assert log_loss(y, p) == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.6, 0.8])))
    # bins of p(positive): 0.1 -> 0/1, 0.4 -> 0/1, 0.6 -> 1/1, 0.8 -> 1/1
    assert expected_calibration_error(y, p) == pytest.approx((0.1 + 0.4 + 0.4 + 0.2) / 4)
    r = calibration_report(y, p)
    assert r["judged"] == "p(positive)" and sum(b["n"] for b in r["bins"]) == 4


# --------------------------------------------------------------------------- operating point


def _val(seed=0, n=400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * (2 * y - 1))))
    return y, np.stack([1 - s, s], 1)


def _sens_spec(y, pred):
    return (pred[y == 1] == 1).mean(), (pred[y == 0] == 0).mean()


def test_youden_maximises_sensitivity_plus_specificity_on_validation():
    y, p = _val()
    op = choose_operating_point("youden", y, p)
    sens, spec = _sens_spec(y, op.decide(p))
    assert (sens, spec) == (op.val["sensitivity"], op.val["specificity"])
    best = max(sum(_sens_spec(y, (p[:, 1] >= t).astype(int))) for t in np.unique(p[:, 1]))
    assert sens + spec == pytest.approx(best)
    assert choose_operating_point("auto", y, p).threshold == op.threshold


@pytest.mark.parametrize("target", [0.8, 0.95, 0.99])
def test_a_sensitivity_target_is_met_with_the_best_specificity(target):
    y, p = _val()
    op = choose_operating_point(f"sensitivity={target}", y, p)
    sens, spec = _sens_spec(y, op.decide(p))
    assert sens >= target
    # the next cut up (the lowest validation probability above the threshold leaves the
    # positives) loses the target
    higher = np.unique(p[:, 1])[np.unique(p[:, 1]) > op.threshold]
    assert _sens_spec(y, (p[:, 1] > higher[0]).astype(int))[0] < target
    op2 = choose_operating_point(f"specificity={target}", y, p)
    assert _sens_spec(y, op2.decide(p))[1] >= target


def test_a_target_not_reachable_exactly_uses_the_closest_and_says_so():
    y = np.array([0] * 10 + [1] * 10)
    s = np.r_[np.linspace(0.0, 0.5, 10), np.linspace(0.3, 1.0, 10)]
    op = choose_operating_point("sensitivity=0.95", y, np.stack([1 - s, s], 1))
    assert op.val["sensitivity"] == 1.0
    assert "not reachable exactly" in op.note and "1.000" in op.note


def test_operating_point_errors_name_the_problem():
    y, p = _val()
    for bad, match in [
        ("sensitivity", "needs a target"),
        ("sensitivity=1.5", r"in \(0, 1\]"),
        ("sens=0.9", "unknown rule 'sens'"),
        ("youden=0.2", "takes no value"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_operating_point(bad)
        with pytest.raises(ConfigError, match=match):
            ClassifierConfig(operating_point=bad)
    with pytest.raises(ConfigError, match="0 positive and 400 negative"):
        choose_operating_point("youden", np.zeros(400, int), p, what="finding effusion")
    with pytest.raises(ConfigError, match="3 exclusive classes, use argmax"):
        choose_operating_point("youden", np.arange(6) % 3, np.full((6, 3), 1 / 3))
    assert choose_operating_point("auto", np.arange(6) % 3, np.full((6, 3), 1 / 3)).rule == "argmax"


def test_operating_point_round_trips_and_an_old_bundle_decides_by_argmax():
    y, p = _val()
    op = choose_operating_point("specificity=0.9", y, p)
    assert OperatingPoint.from_dict(op.to_dict()) == op
    old = OperatingPoint.from_dict(None)
    np.testing.assert_array_equal(old.decide(p), p.argmax(1))


# --------------------------------------------------------------------------- intervals and tests


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert np.isnan(wilson_interval(0, 0)).all()


def test_delong_auc_matches_ranks_and_its_se_the_bootstrap():
    y, p = _val(n=300)
    auc, cov = delong(y, [p[:, 1]])
    assert auc[0] == pytest.approx(rank_auc(y, p), abs=1e-12)
    se = np.sqrt(cov[0, 0])
    rng = np.random.default_rng(1)
    boot = []
    for _ in range(400):
        i = rng.integers(0, len(y), len(y))
        boot.append(rank_auc(y[i], p[i]))
    assert se == pytest.approx(np.std(boot), rel=0.2)
    ci = delong_interval(y, p[:, 1])["ci"]
    assert ci[0] < auc[0] < ci[1]


def test_delong_paired_test_finds_a_real_difference_and_not_a_fake_one():
    y, p = _val(n=300)
    noisy = p[:, 1] + np.random.default_rng(2).normal(scale=0.5, size=len(y))
    assert delong_test(y, p[:, 1], noisy)["p"] < 0.01
    same = delong_test(y, p[:, 1], 2 * p[:, 1] + 1)  # same ranking
    assert same["difference"] == 0 and np.isnan(same["p"])


def test_decision_report_counts_and_intervals():
    y, p = _val(n=200)
    op = choose_operating_point("youden", y, p)
    pred = op.decide(p)
    r = decision_report(y, p, pred, ["normal", "pneumonia"], positive=1)
    c = r["counts"]
    assert c["tp"] + c["fn"] == (y == 1).sum() and c["tn"] + c["fp"] == (y == 0).sum()
    assert r["sensitivity"]["value"] == pytest.approx(c["tp"] / (c["tp"] + c["fn"]))
    assert r["ppv"]["value"] == pytest.approx(c["tp"] / (c["tp"] + c["fp"]))
    for key in ("sensitivity", "specificity", "ppv", "npv", "accuracy", "balanced_accuracy"):
        low, high = r[key]["ci"]
        assert low <= r[key]["value"] <= high, key
    assert r["positive"] == "pneumonia" and r["auc"]["ci"][0] < r["auc"]["value"]
    three = decision_report(
        np.arange(30) % 3, np.eye(3)[np.arange(30) % 3], np.arange(30) % 3, "abc", None
    )
    assert three["accuracy"]["value"] == 1.0 and set(three["per_class"]) == {"a", "b", "c"}


def test_bootstrap_ci_of_decided_accuracy_uses_the_decisions():
    y, p = _val(n=200)
    op = choose_operating_point("sensitivity=0.99", y, p)
    from medcae.metrics.intervals import bootstrap_intervals

    ci = bootstrap_intervals(y, p, n=200, pred=op.decide(p))
    acc = (op.decide(p) == y).mean()
    assert ci["acc"][0] <= acc <= ci["acc"][1]
    low, high = bootstrap_ci(y, p, rank_auc, n=200)
    assert ci["auc"] == [low, high]


# --------------------------------------------------------------------------- findings


def _findings(rng, n, rates=(0.4, 0.2, 0.1)):
    y = (rng.random((n, len(rates))) < np.asarray(rates)).astype(np.int64)
    x = rng.normal(size=(n, 20))
    x[:, : len(rates)] += 1.5 * y
    return x, y


def test_findings_calibration_keeps_each_findings_ranking_and_decides_at_its_threshold():
    from medcae.data.findings import encode
    from medcae.evaluation.protocol import calibrate_findings_and_test
    from medcae.model.classifier import fit_findings

    rng = np.random.default_rng(0)
    xs = {s: _findings(rng, n) for s, n in (("train", 150), ("val", 400), ("test", 2000))}
    cfg = ClassifierConfig(C_grid=(10.0,))
    head, sel = fit_findings(cfg, xs["train"][0], xs["train"][1], xs["val"][0], xs["val"][1])
    assert head.multilabel and len(sel["finding_C"]) == 3
    x = {s: v[0] for s, v in xs.items()}
    labels = {s: encode(v[1]) for s, v in xs.items()}
    ev = calibrate_findings_and_test(cfg, head, sel, x, labels, ["a", "b", "c"])
    y = xs["test"][1]
    raw, cal = head.predict_proba(x["test"]), ev.head.predict_proba(x["test"])
    for j in range(3):
        before = rank_auc(y[:, j], np.stack([1 - raw[:, j], raw[:, j]], 1))
        after = rank_auc(y[:, j], np.stack([1 - cal[:, j], cal[:, j]], 1))
        assert after == pytest.approx(before, abs=1e-9)
    thresholds = [op.threshold for op in ev.operating_point]
    np.testing.assert_array_equal(ev.test_pred, (cal >= thresholds).astype(int))
    assert ev.test["calibration"]["after"]["ece"] < ev.test["calibration"]["before"]["ece"]
    micro = ev.test["decision"]["micro"]["counts"]
    assert sum(micro.values()) == y.size


def test_a_finding_without_a_validation_positive_is_named():
    from medcae.data.findings import encode
    from medcae.evaluation.protocol import calibrate_findings_and_test
    from medcae.model.classifier import fit_findings

    rng = np.random.default_rng(1)
    xs = {s: _findings(rng, 200) for s in ("train", "val", "test")}
    xs["val"][1][:, 2] = 0
    cfg = ClassifierConfig(C_grid=(1.0,))
    head, sel = fit_findings(cfg, xs["train"][0], xs["train"][1], xs["val"][0], xs["val"][1])
    x = {s: v[0] for s, v in xs.items()}
    labels = {s: encode(v[1]) for s, v in xs.items()}
    with pytest.raises(ConfigError, match=r"of finding 'effusion': validation has 0 positive"):
        calibrate_findings_and_test(cfg, head, sel, x, labels, ["nodule", "ring", "effusion"])

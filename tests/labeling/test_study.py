"""The labeling study's core (no Ray): the schedule, the rounds on synthetic separable data,
the head fitted on exactly the labeled rows, and the table, verdict and plot it reports."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medcae.config import ClassifierConfig, ConfigError
from medcae.labeling.report import plot_active
from medcae.labeling.strategies import STRATEGIES, hybrid_choice
from medcae.labeling.study import (
    COLUMNS,
    SMOKE_STUDY,
    StudyConfig,
    delegation_text,
    fit_on,
    goal,
    run_rounds,
    study_table,
    summarize,
)

NAMES = ["a", "b"]
CLF = ClassifierConfig(C_grid=(0.1, 1.0))
STUDY = StudyConfig(start_per_class=2, step=6, max_labels=22)


def _split(n: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two classes apart along a few of many noisy dimensions: few labels do not find them."""
    y = np.arange(n) % 2
    codes = rng.normal(size=(n, 12))
    codes[:, :3] += 1.2 * y[:, None]
    tap = rng.normal(size=(n, 8))
    tap[:, :2] += 1.2 * y[:, None]
    return {"codes": codes, "tap": tap, "final": rng.normal(size=(n, 3))}, y


@pytest.fixture(scope="module")
def synthetic() -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    arrays, labels = {}, {}
    for s, n in (("train", 300), ("val", 120), ("test", 300)):
        arrays[s], labels[s] = _split(n, rng)
    return arrays, labels


@pytest.mark.parametrize(
    "study, classes, expected",
    [
        (StudyConfig(), 2, list(range(20, 201, 20))),
        (SMOKE_STUDY, 3, [6, 10, 14]),
        (StudyConfig(start_per_class=3, step=5, max_labels=12), 2, [6, 11, 12]),  # last cut
        (StudyConfig(start_per_class=5, step=5, max_labels=10), 2, [10]),  # the start only
    ],
)
def test_schedule(study, classes, expected):
    assert study.schedule(classes) == expected


def test_bad_study_names_the_values():
    with pytest.raises(ConfigError, match=r"10 per class x 3 classes = 30\) exceeds max_labels 20"):
        StudyConfig(max_labels=20).schedule(3)
    with pytest.raises(ConfigError, match="unknown strategy \\['entropy'\\]; known: random"):
        StudyConfig(strategies=("entropy",))
    with pytest.raises(ConfigError, match="step 0 must be >= 1"):
        StudyConfig(step=0)


@pytest.fixture(scope="module")
def traces(synthetic):
    arrays, labels = synthetic
    return {s: run_rounds(s, 0, arrays, labels, NAMES, STUDY, CLF) for s in STRATEGIES}


def test_labeled_sets_grow_by_the_step_and_never_repeat(traces, synthetic):
    y = synthetic[1]["train"]
    for strategy, trace in traces.items():
        sizes = [len(p) for p in trace.picks]
        assert sizes == [4, 6, 6, 6], strategy
        every = np.concatenate(trace.picks)
        assert len(set(every.tolist())) == len(every), strategy  # no image labeled twice
        assert [r["n_labels"] for r in trace.rows] == [4, 10, 16, 22]
        assert [r["round"] for r in trace.rows] == [0, 1, 2, 3]
        assert list(trace.rows[0]) == list(COLUMNS) and trace.rows[0]["ranked_by"] == "start"
        assert np.bincount(y[trace.picks[0]]).tolist() == [2, 2]  # the start: 2 per class
    starts = {tuple(t.picks[0]) for t in traces.values()}
    assert len(starts) == 1  # every strategy starts from the same labels
    assert len({t.rows[0]["test_auc"] for t in traces.values()}) == 1


def test_auc_rises_with_the_rounds(traces):
    first = np.mean([t.rows[0]["test_auc"] for t in traces.values()])
    last = np.mean([t.rows[-1]["test_auc"] for t in traces.values()])
    assert last > first + 0.03 and last > 0.9, (first, last)


def test_strategies_rank_by_their_own_rule(traces, synthetic):
    y = synthetic[1]["train"]
    assert {r["ranked_by"] for r in traces["margin"].rows[1:]} == {"margin"}
    hybrid = traces["hybrid"]
    known = [np.bincount(y[np.concatenate(hybrid.picks[:r])], minlength=2) for r in (1, 2, 3)]
    assert [r["ranked_by"] for r in hybrid.rows[1:]] == [
        f"hybrid:{hybrid_choice(k)}" for k in known
    ]
    assert hybrid.rows[1]["ranked_by"] == "hybrid:typiclust"  # 2 labels per class: cold
    n = {c: [r["ranked_by"] for r in hybrid.rows].count(f"hybrid:{c}") for c in STRATEGIES}
    parts = ", ".join(f"{c} {k}" for c, k in sorted(n.items()) if k)
    assert (
        delegation_text(traces["random"].rows + hybrid.rows) == f"`hybrid` ranked 3 rounds: {parts}"
    )
    assert len({tuple(t.picks[1]) for t in traces.values()}) >= 3  # they pick differently


def test_rounds_are_reproducible_and_seeded(synthetic, traces):
    arrays, labels = synthetic
    again = run_rounds("typiclust", 0, arrays, labels, NAMES, STUDY, CLF)
    assert [p.tolist() for p in again.picks] == [p.tolist() for p in traces["typiclust"].picks]
    assert again.rows == traces["typiclust"].rows
    other = run_rounds("typiclust", 1, arrays, labels, NAMES, STUDY, CLF)
    assert other.picks[0].tolist() != again.picks[0].tolist()


def test_fit_on_reads_the_oracle_only_at_the_labeled_rows(synthetic):
    arrays, labels = synthetic
    idx = np.array([7, 0, 3, 10, 12, 5])
    fitted = fit_on(idx, arrays, labels, CLF, NAMES)
    flipped = labels["train"].copy()
    others = np.setdiff1d(np.arange(len(flipped)), idx)
    flipped[others] = 1 - flipped[others]
    refit = fit_on(idx[::-1], arrays, {**labels, "train": flipped}, CLF, NAMES)
    np.testing.assert_allclose(refit.head.coef, fitted.head.coef)
    assert refit.test["auc"] == fitted.test["auc"] and fitted.selection["n_labels"] == 6


def _agg(curves: dict[str, list[float]], labels=(20, 60, 100, 140, 200)) -> list[dict]:
    rows = [
        {"strategy": s, "seed": seed, "n_labels": n, "test_auc": auc + d}
        for s, aucs in curves.items()
        for n, auc in zip(labels, aucs)
        for seed, d in enumerate((-0.01, 0.01))
    ]
    return summarize(rows)


def test_summarize_mean_and_std_over_seeds():
    agg = _agg({"random": [0.8, 0.9, 0.9, 0.9, 0.9]})
    assert agg[0] == {
        "strategy": "random",
        "n_labels": 20,
        "seeds": 2,
        "auc": pytest.approx(0.8),
        "auc_std": pytest.approx(0.01),
    }


@pytest.mark.parametrize(
    "curves, best, reached, met",
    [
        (  # margin reaches random's 200-label AUC at 60 labels
            {"random": [0.7, 0.8, 0.85, 0.88, 0.9], "margin": [0.7, 0.9, 0.92, 0.93, 0.94]},
            "margin",
            60,
            True,
        ),
        (  # typiclust reaches it, but only at 140 labels
            {"random": [0.7, 0.8, 0.85, 0.88, 0.9], "typiclust": [0.7, 0.8, 0.86, 0.9, 0.91]},
            "typiclust",
            140,
            False,
        ),
        (  # neither reaches it: the better one at 100 labels is named
            {
                "random": [0.7, 0.8, 0.85, 0.88, 0.9],
                "margin": [0.7, 0.8, 0.84, 0.86, 0.88],
                "hybrid": [0.7, 0.8, 0.87, 0.87, 0.89],
            },
            "hybrid",
            None,
            False,
        ),
        (  # neither reaches it, a tie at 100 labels: the better one at 200 labels
            {
                "random": [0.7, 0.8, 0.85, 0.88, 0.9],
                "margin": [0.7, 0.8, 0.86, 0.87, 0.87],
                "typiclust": [0.7, 0.8, 0.86, 0.86, 0.89],
            },
            "typiclust",
            None,
            False,
        ),
    ],
    ids=["met", "too-late", "never", "tie-at-half"],
)
def test_goal_verdict(curves, best, reached, met):
    g = goal(_agg(curves))
    assert g is not None
    assert (g.best, g.reached_at, g.met) == (best, reached, met)
    assert (g.within, g.at, g.max_labels) == (100, 100, 200)
    assert g.target == pytest.approx(0.9) and g.random_auc == pytest.approx(0.85)
    text = g.text()
    assert ("**Met**" in text) == met and "at 200 labels (0.900 ± 0.010)" in text
    assert f"`{best}`" in text and "with at most 100 labels" in text


def test_no_goal_without_random_and_another():
    assert goal(_agg({"margin": [0.8] * 5})) is None
    assert goal(_agg({"random": [0.8] * 5})) is None


def test_table_and_plot(tmp_path):
    agg = _agg({"random": [0.7, 0.8, 0.85, 0.88, 0.9], "margin": [0.7, 0.9, 0.92, 0.93, 0.94]})
    table = study_table(agg).splitlines()
    assert table[0] == "| labels | random | margin |" and len(table) == 2 + 5
    assert table[2] == "| 20 | **0.700 ± 0.010** | **0.700 ± 0.010** |"  # a tie: both bold
    assert table[3] == "| 60 | 0.800 ± 0.010 | **0.900 ± 0.010** |"
    out = plot_active(agg, tmp_path / "a.png", "demo")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 300

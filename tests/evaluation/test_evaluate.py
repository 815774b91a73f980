"""The evidence run: smoke mode end to end on Ray, and the aggregation it reports."""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT

from medcae.evaluation.comparison import aggregate
from medcae.evaluation.report import evidence_table


def test_aggregate_mean_and_std_over_seeds():
    rows = [
        {
            "method": "cae",
            "seed": s,
            "budget": 0.1,
            "auc": a,
            "acc": 0.5,
            "balanced_acc": 0.5,
            "n_labels": 10,
        }
        for s, a in enumerate([0.8, 0.9])
    ]
    (agg,) = aggregate(rows)
    assert agg["auc"] == pytest.approx(0.85) and agg["auc_std"] == pytest.approx(0.05)
    assert agg["seeds"] == 2
    table = evidence_table([agg], {"ResNet-18 (28)": (0.944, 0.854)})
    assert "0.850 ± 0.050" in table and "quoted, not re-run" in table


def _evaluate_smoke(ray, demo_npz: Path, tmp_path: Path, out: Path, *extra: str) -> None:
    """``ray_jobs/evaluate.py --smoke-test`` on the demo set into ``out``, a driver of its own
    on the session's Ray (``--address``: no Ray of its own to start); it must succeed."""
    cmd = [sys.executable, str(ROOT / "ray_jobs" / "evaluate.py"), "--data", str(demo_npz)]
    cmd += ["--smoke-test", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    address = ray.get_runtime_context().gcs_address
    run = subprocess.run(
        [*cmd, "--address", address, *extra], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_smoke_writes_report_table_and_plots(ray_session, demo_npz, tmp_path):
    out = tmp_path / "ev"
    _evaluate_smoke(
        ray_session, demo_npz, tmp_path, out, "--mlflow", f"sqlite:///{tmp_path / 'mlruns.db'}"
    )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("medcae-evaluate")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert sum(k.endswith(".auc") for k in mlrun.data.metrics) == 9 * 3, mlrun.data.metrics
    assert "report/report.md" in {
        a.path for a in client.list_artifacts(mlrun.info.run_id, "report")
    }
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    methods = {r["method"] for r in rows}
    assert methods == {
        "frozen_final",
        "frozen_tap",
        "cae",
        "cae_pixels",
        "cae_concat",
        "cae_ensemble",
        "cae_spread",
        "auto",
        "finetune",
    }
    assert len(rows) == 9 * 3  # nine methods x three budgets x one seed
    chosen = {r["chosen"] for r in rows if r["method"] == "auto"}
    assert chosen <= {"frozen_final", "frozen_tap", "cae", "cae_concat", "cae_ensemble"} and chosen
    assert all(0.0 <= float(r["auc"]) <= 1.0 for r in rows)
    for png in ("auc_vs_budget.png", "confusion_best.png", "reconstructions.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "Command:" in report and "| method |" in report
    with open(out / "delong.csv") as f:
        tests = list(csv.DictReader(f))
    assert len(tests) == 8 * 3 * 3  # eight baselines x three budgets x three classes (one seed)
    assert {t["baseline"] for t in tests} == methods - {"auto"}
    assert all(0 <= float(t["p"]) <= 1 for t in tests if t["p"] != "nan")
    assert "Paired DeLong tests" in report


@pytest.mark.ray
@pytest.mark.slow
def test_active_smoke_writes_the_study(ray_session, demo_npz, tmp_path):
    """``--active --smoke-test``: every strategy, rounds that grow by the step, the plot."""
    from medcae.labeling.strategies import STRATEGIES
    from medcae.labeling.study import COLUMNS, SMOKE_STUDY

    out = tmp_path / "active"
    _evaluate_smoke(ray_session, demo_npz, tmp_path, out, "--active")
    with open(out / "active.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == COLUMNS
    sizes = SMOKE_STUDY.schedule(3)  # the demo's three classes: [6, 10, 14]
    assert len(rows) == len(STRATEGIES) * len(sizes)  # one seed
    assert {r["strategy"] for r in rows} == set(STRATEGIES)
    for s in STRATEGIES:
        mine = sorted((r for r in rows if r["strategy"] == s), key=lambda r: int(r["round"]))
        assert [int(r["n_labels"]) for r in mine] == sizes, s
        assert all(0.0 <= float(r["test_auc"]) <= 1.0 for r in mine)
    assert len({r["test_auc"] for r in rows if r["round"] == "0"}) == 1  # one shared start
    assert (out / "active_auc.png").stat().st_size > 1000
    report = (out / "active.md").read_text()
    assert "| labels | random | margin | typiclust | hybrid |" in report and "**Goal**" in report
    log = (out / "run.log").read_text()
    assert all(f"active: {s}, seed 0 done (" in log for s in STRATEGIES) and "ETA" in log


def test_label_spreading_uses_the_unlabeled_codes():
    """Two labels per class, clusters that only the unlabeled points reveal: spreading along
    the k-NN graph classifies the test points that a two-point classifier would not."""
    from medcae.evaluation.comparison import spread_row

    rng = np.random.default_rng(0)

    def moons(n):  # two interleaved half circles in 2-D, padded to 6-D with noise
        t = rng.uniform(0, np.pi, n)
        y = rng.integers(0, 2, n)
        x = np.stack([np.cos(t) + y * 1.0, np.sin(t) * (1 - 2 * y) + y * 0.4], 1)
        x = np.concatenate([x + rng.normal(0, 0.05, x.shape), rng.normal(0, 0.01, (n, 4))], 1)
        return x, y

    feats, labels = {}, {}
    for split, n in (("train", 400), ("val", 100), ("test", 200)):
        feats[split], labels[split] = moons(n)
    row = spread_row(feats, labels, 2, 0, ["a", "b"])
    assert row["method"] == "cae_spread" and row["n_labels"] == 4
    assert row["auc"] > 0.95, row


def test_methods_on_the_tap_cae_share_one_cae_per_seed():
    """cae, cae_concat, cae_ensemble and auto of one seed: one CAE trained, rows for each."""
    from medcae.config import CAEConfig, PipelineConfig
    from medcae.distributed.evaluate import task_groups
    from medcae.evaluation.comparison import run_feature_methods

    rng = np.random.default_rng(0)
    data = {}
    for s, n in (("train", 60), ("val", 30), ("test", 30)):
        y = np.arange(n) % 2
        maps = rng.normal(size=(n, 6, 3, 3)).astype(np.float32) + y[:, None, None, None]
        data[s] = {"maps": maps, "final": maps.mean(axis=(2, 3)), "labels": y}
    cfg = PipelineConfig(cae=CAEConfig(channels=(8,), latent_channels=2, epochs=2))
    methods = ["cae", "cae_concat", "cae_ensemble", "auto"]
    rows, models = run_feature_methods(methods, 0, [5, 1.0], data, cfg, ["a", "b"])
    assert [r["method"] for r in rows] == [m for m in methods for _ in (5, 1.0)]
    assert len({id(m) for m in models.values()}) == 1  # one CAE for all four
    assert all(r["auc"] > 0.8 for r in rows), rows
    groups = task_groups(["frozen_final", "cae", "cae_pixels", "auto", "finetune", "cae_hier"])
    assert groups == [["cae", "auto"], ["frozen_final"], ["cae_pixels"], ["cae_hier"]]


def test_report_header_names_fine_tuning_only_when_it_ran():
    from medcae.evaluation.report import finetune_clause
    from medcae.model.finetune import FinetuneConfig

    ft = FinetuneConfig(epochs=4)
    frozen = [{"method": "frozen_tap", "budget": 20}, {"method": "cae", "budget": 20}]
    assert finetune_clause(frozen, ft, 112) == "."
    summary = {"best_epoch": 3, "epochs_run": 4, "steps": 80, "seconds": 12.0}
    tuned = [*frozen, {"method": "finetune", "budget": 20, "finetune": summary}]
    text = finetune_clause(tuned, ft, 112)
    assert text.startswith("; fine-tuning the whole backbone") and "at 112 px" in text
    assert "20: best epoch 3.0 of 4.0 run, 80 steps, 12 s per run" in text


def test_paired_delong_compares_the_default_with_each_baseline_on_the_same_images():
    from medcae.evaluation.comparison import paired_delong

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    good = 1 / (1 + np.exp(-(3 * y - 1.5 + rng.normal(size=300))))
    weak = 1 / (1 + np.exp(-(0.6 * y - 0.3 + rng.normal(size=300))))

    def row(method, p, seed=0, budget=1.0):
        return {
            "method": method,
            "seed": seed,
            "budget": budget,
            "test_proba": np.stack([1 - p, p], 1).tolist(),
        }

    rows = [
        row("auto", good),
        row("cae", weak),
        row("frozen_final", good),
        row("finetune", weak, 1),
    ]
    tests = {t["baseline"]: t for t in paired_delong(rows, y)}
    assert set(tests) == {"cae", "frozen_final"}  # finetune ran with another seed only
    assert tests["cae"]["difference"] > 0.1 and tests["cae"]["p"] < 1e-6
    assert tests["frozen_final"]["difference"] == 0 and np.isnan(tests["frozen_final"]["p"])


def test_findings_evaluate_the_feature_methods_and_test_each_finding_paired():
    """The Ray-free core of ``medcae evaluate`` on multi-label data: a head per finding for
    every feature method, and DeLong's paired test per finding."""
    from medcae.config import CAEConfig, PipelineConfig
    from medcae.data.findings import encode
    from medcae.evaluation.comparison import paired_delong, run_feature_methods

    rng = np.random.default_rng(0)
    data = {"multilabel": True}
    for s, n in (("train", 90), ("val", 60), ("test", 60)):
        y = (rng.random((n, 2)) < 0.4).astype(int)
        y[:4] = [[1, 1], [0, 0], [1, 0], [0, 1]]
        maps = rng.normal(size=(n, 8, 3, 3)).astype(np.float32)
        maps[:, :2] += 2 * y[:, :, None, None]
        data[s] = {"maps": maps, "final": maps.mean(axis=(2, 3)), "labels": encode(y)}
    cfg = PipelineConfig(cae=CAEConfig(channels=(8,), latent_channels=4, epochs=1))
    rows, _ = run_feature_methods(["frozen_final", "auto"], 0, [1.0], data, cfg, ["a", "b"])
    assert {r["method"] for r in rows} == {"frozen_final", "auto"}
    assert all(r["confusion"] is None and 0.5 < r["auc"] <= 1 for r in rows)
    tests = paired_delong(rows, data["test"]["labels"], multilabel=True)
    assert [t["class"] for t in tests] == [0, 1] and all(
        t["baseline"] == "frozen_final" for t in tests
    )
    with pytest.raises(ValueError, match="cae_spread has no multi-label form"):
        run_feature_methods(["cae_spread"], 0, [1.0], data, cfg, ["a", "b"])


def test_findings_evaluate_refuses_single_label_methods_asked_by_name(tmp_path):
    from helpers import medcae_subprocess

    out = medcae_subprocess(
        "evaluate",
        "--data",
        "demo-findings",
        "--data-dir",
        str(tmp_path),
        "--methods",
        "cae,finetune",
        "--smoke-test",
        "--out",
        str(tmp_path / "ev"),
        ray_imported_ok=True,  # the job imports Ray; it must not start it
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "finetune take one class per image" in out.stderr.strip().splitlines()[-1]

"""Accuracy check of reduced backbone precision: the same `medcae run` in fp32 and in bf16.

bf16 is opt-in (``--precision bf16``) and ships only with this check: on PneumoniaMNIST, each
method's test AUC in bf16 must be within ``--tolerance`` (0.002) of fp32. Both runs use the same
data, seeds, settings and runtime; only the backbone's precision differs, so its features (and
every model fitted on them) differ. With ``--seeds 0,1,2`` each precision runs once per CAE and
classifier seed (the feature store is built once per precision and reused), and the check is on
the mean over seeds, which separates the precision's effect from seed-to-seed training noise.
Prints, per method, the mean test AUC of each precision, the difference, the spread over seeds,
and the extraction time; exits 1 when a mean difference exceeds the tolerance.

    MEDCAE_DATA_DIR=../shared/data python bench/precision.py [--seeds 0,1,2] [--runtime auto]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(precision: str, seed: int, out: Path, store: Path, a: argparse.Namespace) -> dict:
    """One `medcae run` in a subprocess; its results.json."""
    cmd = [
        sys.executable,
        "-m",
        "medcae.cli.main",
        "run",
        "--data",
        a.data,
        "--precision",
        precision,
        "--seed",
        str(seed),
        "--runtime",
        a.runtime,
        "--feature-store",
        str(store),
        "--out",
        str(out),
        *(["--epochs", str(a.epochs)] if a.epochs else []),
    ]
    if os.environ.get("MEDCAE_DATA_DIR"):
        cmd += ["--data-dir", os.environ["MEDCAE_DATA_DIR"]]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="pneumoniamnist")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--epochs", type=int, default=0, help="CAE epochs (0: the run's default)")
    p.add_argument("--seeds", default="0", help="comma-separated CAE/classifier seeds")
    p.add_argument("--tolerance", type=float, default=0.002)
    p.add_argument("--out", default="runs/precision", help="where both runs are kept")
    a = p.parse_args()
    out = Path(a.out)
    seeds = [int(x) for x in a.seeds.split(",")]
    res: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as store:  # fresh features: extraction is timed
        for prec in ("fp32", "bf16"):
            res[prec] = [run(prec, s, out / f"{prec}-seed{s}", Path(store), a) for s in seeds]
    print(f"\n{a.data}, runtime {a.runtime}, seeds {seeds}: test AUC by backbone precision")
    print(f"{'method':44s} {'fp32':>7s} {'bf16':>7s} {'diff':>8s} {'seed spread fp32/bf16':>22s}")
    worst = 0.0
    for method in res["fp32"][0]["reports"]:
        aucs = {k: np.array([r["reports"][method]["auc"] for r in v]) for k, v in res.items()}
        diff = aucs["bf16"].mean() - aucs["fp32"].mean()
        worst = max(worst, abs(diff))
        spread = f"{np.ptp(aucs['fp32']):.4f}/{np.ptp(aucs['bf16']):.4f}"
        print(
            f"{method:44s} {aucs['fp32'].mean():7.4f} {aucs['bf16'].mean():7.4f} {diff:+8.4f} "
            f"{spread:>22s}"
        )
    for prec in ("fp32", "bf16"):
        t = res[prec][0]["timings"]
        print(f"{prec}: features {t.get('features_s', 0):.1f}s, total {t.get('total_s', 0):.1f}s")
    verdict = "within" if worst <= a.tolerance else "OUTSIDE"
    print(f"largest |mean diff| {worst:.4f}: {verdict} the tolerance {a.tolerance}")
    sys.exit(0 if worst <= a.tolerance else 1)


if __name__ == "__main__":
    main()

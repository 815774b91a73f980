"""Accuracy check of reduced backbone precision: the same `medcae run` in fp32 and in bf16.

bf16 is opt-in (``--precision bf16``) and ships only with this check: on PneumoniaMNIST, each
method's test AUC in bf16 must be within ``--tolerance`` (0.002) of fp32. Both runs use the same
data, seeds, settings and runtime; only the backbone's precision differs, so its features (and
every model fitted on them) differ. Prints, per method, the test AUC of each run, the
difference, and the extraction time of each run; exits 1 when a difference exceeds the
tolerance.

    MEDCAE_DATA_DIR=../shared/data python bench/precision.py [--runtime auto] [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(precision: str, out: Path, store: Path, a: argparse.Namespace) -> dict:
    """One `medcae run` in a subprocess; its results.json."""
    cmd = [
        sys.executable,
        "-m",
        "medcae.cli",
        "run",
        "--data",
        a.data,
        "--precision",
        precision,
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
    p.add_argument("--tolerance", type=float, default=0.002)
    p.add_argument("--out", default="runs/precision", help="where both runs are kept")
    a = p.parse_args()
    out = Path(a.out)
    with tempfile.TemporaryDirectory() as store:  # fresh features: extraction is timed
        res = {prec: run(prec, out / prec, Path(store), a) for prec in ("fp32", "bf16")}
    print(f"\n{a.data}, runtime {a.runtime}: test AUC by backbone precision")
    print(f"{'method':44s} {'fp32':>7s} {'bf16':>7s} {'diff':>8s}")
    worst = 0.0
    for method, fp32 in res["fp32"]["reports"].items():
        bf16 = res["bf16"]["reports"][method]
        diff = bf16["auc"] - fp32["auc"]
        worst = max(worst, abs(diff))
        print(f"{method:44s} {fp32['auc']:7.4f} {bf16['auc']:7.4f} {diff:+8.4f}")
    for prec in ("fp32", "bf16"):
        t = res[prec]["timings"]
        print(f"{prec}: features {t.get('features_s', 0):.1f}s, total {t.get('total_s', 0):.1f}s")
    verdict = "within" if worst <= a.tolerance else "OUTSIDE"
    print(f"largest |diff| {worst:.4f}: {verdict} the tolerance {a.tolerance}")
    sys.exit(0 if worst <= a.tolerance else 1)


if __name__ == "__main__":
    main()

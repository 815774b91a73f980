"""Multi-label findings against one single-label model per finding, on generated data whose
per-finding signal is known (``demo-findings``: nodule, ring, effusion, independent).

Backbone features and the CAE are computed once (seed 0); then the heads are fitted twice on
the same codes: once as one multi-label model (a head per finding, each with its own C,
calibration and threshold, ``auto`` judged on the mean AUC over findings), and once per
finding as a two-class model of that finding alone. Prints each finding's test AUC both ways,
for the representation each run chose and for one fixed representation, and the seconds the
heads took.

    python bench/findings.py [--train 1200] [--epochs 15] [--representation cae]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SPLITS = ("train", "val", "test")


def main() -> None:
    from bench.decisions import features, representations
    from medcae.data.demo import make_findings_dataset
    from medcae.data.findings import decode
    from medcae.evaluation.comparison import train_cae_on_arrays
    from medcae.evaluation.protocol import fit_representations

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=1200)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--representation", default="cae", help="the fixed one compared too")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medcae-findings-"))
    npz = make_findings_dataset(
        tmp / "findings.npz", n_train=a.train, n_val=a.train // 3, n_test=a.train // 2
    )
    ds, maps, cfg = features(str(npz), 112)
    names = list(ds.label_names)
    cfg = replace(cfg, cae=replace(cfg.cae, epochs=a.epochs))
    cae = train_cae_on_arrays(maps["train"]["maps"], cfg, 0, maps["val"]["maps"])
    arrays = representations(cae, maps)
    masks = {s: ds.splits[s].labels for s in SPLITS}
    y = {s: decode(masks[s], len(names)) for s in SPLITS}
    prevalence = ", ".join(f"{n} {y['train'][:, j].mean():.2f}" for j, n in enumerate(names))
    print(f"{ds.name}: train {len(masks['train'])}; prevalence in train: {prevalence}")

    results: dict[str, dict] = {}
    for rep in ("auto", a.representation):
        clf = replace(cfg.classifier, representation=rep)
        t0 = time.perf_counter()
        fitted, choice = fit_representations(clf, arrays, masks, names, multilabel=True)
        multi_s = time.perf_counter() - t0
        multi = fitted[choice.name].test["per_class"]
        singles, single_s, chosen = {}, [], {}
        for j, n in enumerate(names):
            one = {s: y[s][:, j] for s in SPLITS}
            t0 = time.perf_counter()
            f1, c1 = fit_representations(clf, arrays, one, [f"no {n}", n])
            single_s.append(time.perf_counter() - t0)
            singles[n], chosen[n] = f1[c1.name].test["auc"], c1.name
        results[rep] = {"multi": multi, "singles": singles, "chosen": chosen}
        print(f"\nrepresentation {rep}: multi-label chose {choice.name}")
        print(f"{'finding':>10} {'multi-label AUC':>16} {'alone AUC':>10} {'alone chose':>12}")
        for n in names:
            print(f"{n:>10} {multi[n]['auc']:>16.4f} {singles[n]:>10.4f} {chosen[n]:>12}")
        mean_multi = np.mean([multi[n]["auc"] for n in names])
        print(
            f"{'mean':>10} {mean_multi:>16.4f} {np.mean(list(singles.values())):>10.4f}\n"
            f"heads: multi-label {multi_s:.1f}s for {len(names)} findings; alone "
            f"{np.mean(single_s):.1f}s per finding, {sum(single_s):.1f}s for all "
            f"(multi-label / one alone: {multi_s / np.mean(single_s):.2f}x)"
        )


if __name__ == "__main__":
    main()

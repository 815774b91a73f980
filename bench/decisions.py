"""Calibration and operating points on real data: ECE and Brier before and after, and the
decisions at ``youden`` and at a sensitivity target, per seed.

The default run's road without Ray: backbone features once, then per seed the CAE (the
defaults, seeded), every representation fitted and one chosen on validation
(``representation auto``), calibrated on validation, tested once. The chosen head is then
given each operating point on validation and tested at it.

    MEDCAE_DATA_DIR=../shared/data python bench/decisions.py [--data pneumoniamnist]
        [--seeds 3] [--epochs 15] [--target 0.95]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

SPLITS = ("train", "val", "test")


def features(data: str, resolution: int) -> tuple[object, dict, object]:
    """The data set, each split's backbone ``maps`` and ``final``, and the config."""
    from medcae.config import BackboneConfig, PipelineConfig
    from medcae.data import load_dataset
    from medcae.distributed.pipeline import resolved_backbone
    from medcae.model.features import FeatureExtractor

    cfg = resolved_backbone(
        PipelineConfig(data=data, backbone=BackboneConfig(resolution=resolution))
    )
    ds = load_dataset(data)
    ext = FeatureExtractor(cfg.backbone)
    out = {}
    t0 = time.perf_counter()
    for s in SPLITS:
        parts = [ext(ds.splits[s].images[i : i + 256]) for i in range(0, len(ds.splits[s]), 256)]
        out[s] = {k: np.concatenate([p[k] for p in parts]) for k in ("maps", "final")}
    n = sum(len(ds.splits[s]) for s in SPLITS)
    print(f"features: {n} images in {time.perf_counter() - t0:.0f}s", flush=True)
    return ds, out, cfg


def representations(cae: object, maps: dict) -> dict:
    """Each split's ``codes``, ``tap`` and ``final``: what the representations are built of."""
    from medcae.model.epoch import embed_all
    from medcae.model.representations import tap_pool

    return {
        s: {
            "codes": embed_all(cae, maps[s]["maps"]),
            "tap": tap_pool(maps[s]["maps"]),
            "final": maps[s]["final"],
        }
        for s in SPLITS
    }


def _ci(p: dict) -> str:
    return f"{p['value']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]"


def main() -> None:
    from medcae.evaluation.comparison import train_cae_on_arrays
    from medcae.evaluation.protocol import fit_representations
    from medcae.metrics.decision import decision_report
    from medcae.model.operating_point import choose_operating_point
    from medcae.model.representations import get_representation

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="pneumoniamnist")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--resolution", type=int, default=112)
    p.add_argument("--target", type=float, default=0.95, help="the sensitivity operating point")
    p.add_argument("--calibration", default="auto", help="as medcae run's --calibration")
    a = p.parse_args()
    ds, maps, cfg = features(a.data, a.resolution)
    names = list(ds.label_names)
    binary = len(names) == 2
    labels = {s: ds.splits[s].labels for s in SPLITS}
    rows = []
    for seed in range(a.seeds):
        t0 = time.perf_counter()
        run = replace(cfg, cae=replace(cfg.cae, epochs=a.epochs, seed=seed))
        run = replace(run, classifier=replace(run.classifier, seed=seed, calibration=a.calibration))
        cae = train_cae_on_arrays(maps["train"]["maps"], run, seed, maps["val"]["maps"])
        arrays = representations(cae, maps)
        fitted, choice = fit_representations(run.classifier, arrays, labels, names, ds.multilabel)
        ev = fitted[choice.name]
        cal = ev.test["calibration"]
        if ds.multilabel:  # one calibration per finding: name them, pooled figures below
            methods = "/".join(c.method for c in ev.calibration)
            ev.calibration = ev.calibration[0]
            for n, c in cal["per_finding"].items():
                print(f"  {n}: ECE {c['before']['ece']:.4f} -> {c['after']['ece']:.4f}")
        else:
            methods = ev.calibration.method
        row = {
            "seed": seed,
            "chosen": choice.name,
            "calibration": methods,
            "ece": (cal["before"]["ece"], cal["after"]["ece"]),
            "brier": (cal["before"]["brier"], cal["after"]["brier"]),
            "auc": ev.test["auc"],
            "s": time.perf_counter() - t0,
        }
        print(
            f"seed {seed}: {choice.name}, calibration {methods} "
            f"(slope {ev.calibration.slope:.3f}, offset {ev.calibration.offset:+.3f}); test AUC "
            f"{ev.test['auc']:.4f}; ECE {row['ece'][0]:.4f} -> {row['ece'][1]:.4f}, Brier "
            f"{row['brier'][0]:.4f} -> {row['brier'][1]:.4f} ({row['s']:.0f}s)",
            flush=True,
        )
        if len(names) > 2 and not ds.multilabel:  # what calibration did to each class's AUC
            from medcae.metrics.findings import finding_aucs

            x = get_representation(choice.name).features(arrays["test"])
            raw = ev.head.predict_proba(x) if ev.calibration.method == "none" else None
            onehot = np.eye(len(names), dtype=np.int64)[labels["test"]]
            after = finding_aucs(onehot, ev.test_proba)
            if raw is None:
                from dataclasses import replace as _r

                raw = _r(ev.head, platt=ev.head.platt / ev.calibration.slope, shrink=None)
                raw = raw.predict_proba(x)
            before = finding_aucs(onehot, raw)
            print(f"  per-class AUC change: {np.abs(after - before).max():.2e} (max)")
        if binary and not ds.multilabel:
            x = {s: get_representation(choice.name).features(arrays[s]) for s in ("val", "test")}
            pv, pt = ev.head.predict_proba(x["val"]), ev.head.predict_proba(x["test"])
            for rule in ("youden", f"sensitivity={a.target:g}"):
                op = choose_operating_point(rule, labels["val"], pv)
                d = decision_report(labels["test"], pt, op.decide(pt), names, 1)
                row[rule] = (op, d)
                inside = d["sensitivity"]["ci"][0] <= (op.target or 0) <= d["sensitivity"]["ci"][1]
                check = (
                    f"; target {op.target:g} inside the test interval: {inside}"
                    if op.target
                    else ""
                )
                print(
                    f"  {rule:>16}: threshold {op.threshold:.4f}, val sens "
                    f"{op.val['sensitivity']:.3f} spec {op.val['specificity']:.3f}; test sens "
                    f"{_ci(d['sensitivity'])}, spec {_ci(d['specificity'])}, PPV "
                    f"{d['ppv']['value']:.3f}, NPV {d['npv']['value']:.3f}{check}",
                    flush=True,
                )
        rows.append(row)
    ece = np.array([r["ece"] for r in rows])
    brier = np.array([r["brier"] for r in rows])
    print(
        f"\nmean over {len(rows)} seeds: ECE {ece[:, 0].mean():.4f} -> {ece[:, 1].mean():.4f} "
        f"(lower after in {int((ece[:, 1] < ece[:, 0]).sum())} of {len(rows)}), Brier "
        f"{brier[:, 0].mean():.4f} -> {brier[:, 1].mean():.4f}; test AUC "
        f"{np.mean([r['auc'] for r in rows]):.4f}"
    )


if __name__ == "__main__":
    main()

"""Model cards: a bundle's ``MODEL_CARD.md``, rendered from its ``bundle.json`` metadata.

The card is a pure function of the metadata, so what it says is what the bundle records:
:func:`data_summary` and :func:`bootstrap_intervals` turn a run's labels and test predictions into
JSON-ready entries of that metadata, and :func:`model_card` writes the Markdown. A bundle of
format 1 (written before cards) gets the same rendering at load time, marked as such.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

#: Fewer test images of a class than this, and the card warns about it.
MIN_TEST_PER_CLASS = 30

SPLITS = ("train", "val", "test")
_NAMES = {"auc": "AUC", "acc": "Accuracy (argmax)", "balanced_acc": "Balanced accuracy"}
_NOT_RECORDED = "not recorded in this bundle"


def data_summary(
    label_names: Sequence[str],
    labels: Mapping[str, np.ndarray],
    unlabeled: int = 0,
    multilabel: bool = False,
) -> dict[str, Any]:
    """Images per class and split, and what the auto-encoder trained on, JSON-ready.

    Args:
        label_names: K class names (or findings).
        labels: ``{"train"|"val"|"test": (N,)}`` labels of the images each split used.
        unlabeled: Images of the unlabeled pool the auto-encoder also trained on.
        multilabel: Labels are findings' bitmasks: counts are each finding's positive images,
            and ``totals`` the images per split.
    """
    k = len(label_names)
    if multilabel:
        from medcae.data.findings import decode

        counts = {
            s: dict(zip(label_names, map(int, decode(y, k).sum(axis=0)))) for s, y in labels.items()
        }
        totals = {s: int(len(y)) for s, y in labels.items()}
    else:
        counts = {
            s: dict(zip(label_names, map(int, np.bincount(np.asarray(y, np.int64), minlength=k))))
            for s, y in labels.items()
        }
        totals = {s: sum(c.values()) for s, c in counts.items()}
    return {
        "counts": counts,
        "totals": totals,
        "unlabeled": int(unlabeled),
        "cae_train_images": totals.get("train", 0) + unlabeled,
    }


# --------------------------------------------------------------------------- rendering


def model_card(meta: Mapping[str, Any]) -> str:
    """Render a bundle's ``MODEL_CARD.md`` from its metadata.

    Entries a bundle lacks (counts, intervals, an older format's fields) are stated as not
    recorded rather than guessed.

    Args:
        meta: ``bundle.json`` content (``files`` may list only the weight files).

    Returns:
        Markdown text.
    """
    sections = [
        _title(meta),
        _model(meta),
        _use(meta),
        _data(meta),
        _evaluation(meta),
        _decisions(meta),
        _ood(meta),
        _limitations(meta),
        _provenance(meta),
    ]
    return "\n\n".join(s.strip("\n") for s in sections) + "\n"


def _cfg(meta: Mapping[str, Any], part: str) -> dict[str, Any]:
    return meta.get("config", {}).get(part, {}) or {}


def _title(meta: Mapping[str, Any]) -> str:
    names = ", ".join(meta.get("label_names", [])) or "?"
    head = f"# Model card: {meta.get('data', 'unknown data')} classifier ({names})"
    if meta.get("format_version") == 1:
        head += (
            "\n\n> This bundle was written before bundles carried a model card (format "
            "version 1). This card was generated from its `bundle.json` when it was loaded; "
            "the data counts and confidence intervals were not recorded. Retrain to get a "
            "full card."
        )
    return head


def _model(meta: Mapping[str, Any]) -> str:
    bb, cae, clf = _cfg(meta, "backbone"), _cfg(meta, "cae"), meta.get("classifier", {})
    taps = "+".join(bb.get("taps", [])) or "?"
    rep = meta.get("representation")
    if isinstance(rep, Mapping):
        rep = rep.get("name")
    rep = rep or (
        f"CAE codes of backbone tap `{taps}` + linear classifier ({clf.get('kind', '?')})"
    )
    return "\n".join(
        [
            "## Model",
            "",
            f"- Representation: {rep}",
            f"- Backbone: `{bb.get('name', '?')}` (frozen, weights {_weights(bb)}), "
            f"tap `{taps}`, input {bb.get('resolution', '?')} px",
            f"- Auto-encoder: encoder channels {cae.get('channels', '?')}, "
            f"{cae.get('latent_channels', '?')} latent channels, pooling "
            f"`{cae.get('pool', '?')}`, {cae.get('epochs', '?')} epochs",
            f"- Classifier: `{clf.get('kind', '?')}`, C = {clf.get('C', '?')} "
            f"(validation AUC {_num(clf.get('val_auc'))})",
            f"- Why this representation: {_why(meta)}",
        ]
    )


def _weights(bb: Mapping[str, Any]) -> str:
    w = bb.get("weights")
    return "ImageNet" if w is None else "random (for tests only)" if w == "random" else "custom"


def _why(meta: Mapping[str, Any]) -> str:
    rep = meta.get("representation")
    if isinstance(rep, Mapping) and rep.get("reason"):
        return str(rep["reason"])
    grid = _cfg(meta, "classifier").get("C_grid", "?")
    metrics = meta.get("metrics", {})
    if "search_best_trial" in metrics:
        params = ", ".join(f"{k}={v}" for k, v in metrics["search_best_trial"].items())
        return (
            "best trial of the hyperparameter search (Ray Tune, TPE + ASHA) by validation "
            f"AUC; the test split was not read during the search. Trial: {params}. "
            f"C chosen from {grid} by validation AUC."
        )
    base = ""
    if _baselines(meta):
        base = " The run also fitted the baselines under Evaluation for comparison."
    return (
        "set by the run's configuration (not searched): a small auto-encoder on frozen "
        "backbone maps learns from unlabeled images, so the classifier needs few labels. "
        f"C chosen from {grid} by validation AUC.{base}"
    )


def _use(meta: Mapping[str, Any]) -> str:
    data = meta.get("data", "the training data")
    return "\n".join(
        [
            "## Intended use",
            "",
            f"- Research, and triage support reviewed by a clinician, on images like those of "
            f"`{data}`: same modality, view, acquisition and population.",
            "- Each prediction carries an out-of-distribution flag (`in_distribution`); "
            "treat flagged images as unsupported.",
            "",
            "## Not intended use",
            "",
            "- Not a diagnostic device and not cleared as one; not for decisions without a "
            "clinician.",
            "- Not for other modalities, body parts, scanners, sites or populations than the "
            "training data without new validation.",
            "- Not for images the out-of-distribution flag marks, nor as an anomaly detector: "
            "the flag is a coarse guard, not a guarantee.",
        ]
    )


def _data(meta: Mapping[str, Any]) -> str:
    summary, names = meta.get("data_summary"), meta.get("label_names", [])
    clf, budget = meta.get("classifier", {}), _cfg(meta, "classifier").get("budget", "?")
    lines = ["## Data", "", f"- Source: `{meta.get('data', '?')}`"]
    unl = meta.get("config", {}).get("unlabeled")
    if unl:
        lines.append(f"- Unlabeled pool: `{PurePath(str(unl)).name or unl}`")
    if not summary:
        return "\n".join([*lines, f"- Images per class and split: {_NOT_RECORDED}"])
    counts, totals = summary["counts"], summary.get("totals") or {}
    findings = meta.get("task") == "multilabel"
    head = "| split | " + " | ".join(names) + (" | images |" if findings else " | total |")
    rows = [head, "|" + " --- |" * (len(names) + 2)]
    for s in [s for s in SPLITS if s in counts] + [s for s in counts if s not in SPLITS]:
        c = counts[s]
        rows.append(f"| {s} | " + " | ".join(str(c.get(n, 0)) for n in names))
        rows[-1] += f" | {totals.get(s, sum(c.values()))} |"
    train = totals.get("train", sum(counts.get("train", {}).values()))
    lines += [
        f"- Auto-encoder: trained without labels on {summary['cae_train_images']} images "
        f"({train} of the train split, {summary['unlabeled']} of an unlabeled pool).",
        f"- Classifier: fitted on {_int(clf.get('n_labels'))} labeled train images "
        f"(label budget {budget}); C chosen on the val split; the test split was used once.",
        "",
        "Positive images per finding and split (an image may have several, or none):"
        if findings
        else "Images per class and split:",
        "",
        *rows,
    ]
    return "\n".join(lines)


def _evaluation(meta: Mapping[str, Any]) -> str:
    metrics = meta.get("metrics", {})
    test, ci = metrics.get("test", {}), metrics.get("test_ci")
    level = f"{100 * ci['level']:.0f}% CI" if ci else "CI"
    rows = [f"| metric | test | {level} |", "| --- | --- | --- |"]
    names = dict(_NAMES)
    if meta.get("operating_point"):
        names["acc"] = "Accuracy (at the operating point)"
    if meta.get("task") == "multilabel":
        names = {
            "auc": "AUC (macro over findings)",
            "acc": "Accuracy (mean over findings, at their thresholds)",
            "balanced_acc": "Balanced accuracy (mean over findings)",
        }
    for key, name in names.items():
        if key in test:
            rows.append(f"| {name} | {_num(test[key])} | {_interval(ci, key)} |")
    lines = ["## Evaluation", "", *rows, ""]
    if ci:
        lines.append(
            f"Intervals: {ci['method']}; {ci['resamples']} resamples of the {ci['n']} test "
            f"images, seed {ci['seed']}."
            + (
                ""
                if meta.get("task") == "multilabel"
                else " Multi-class AUC is the one-vs-rest macro average."
            )
        )
    else:
        lines.append(f"Confidence intervals: {_NOT_RECORDED}.")
    lines += _per_class(test) + _baseline_rows(meta)
    return "\n".join(lines)


#: What a bundle from before calibration and operating points says of itself.
UNCALIBRATED = (
    "This bundle predates calibration and operating points: its label is the most probable "
    "class (argmax; 0.5 for two classes) and its probabilities are not calibrated."
)
_DECISION_ROWS = (
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("accuracy", "Accuracy"),
)


def _decisions(meta: Mapping[str, Any]) -> str:
    op, cal = meta.get("operating_point"), meta.get("calibration")
    if not op or not cal:
        return f"## Decisions and calibration\n\n{UNCALIBRATED}"
    if "findings" in op:
        return _finding_decisions(meta)
    names = meta.get("label_names", [])
    lines = ["## Decisions and calibration", ""]
    if op.get("threshold") is not None and op.get("positive") is not None:
        pos = names[op["positive"]] if op["positive"] < len(names) else op["positive"]
        val = op.get("val") or {}
        lines.append(
            f"- Operating point: `{_rule(op)}`, chosen on the val split: `{pos}` when its "
            f"probability is at least **{op['threshold']:.4f}** (val sensitivity "
            f"{_num(val.get('sensitivity'))}, specificity {_num(val.get('specificity'))})."
        )
    else:
        lines.append("- Operating point: `argmax`: the label is the most probable class.")
    if op.get("note"):
        lines.append(f"- Note: {op['note']}.")
    lines.append(f"- Calibration: {cal.get('reason') or cal.get('method')}.")
    decision = meta.get("metrics", {}).get("test", {}).get("decision") or {}
    if "sensitivity" in decision:
        lines += ["", "On test, at the operating point:", ""] + _decision_table(decision)
    elif "per_class" in decision:
        lines += ["", "On test, each class against the rest, at the operating point:", ""]
        lines += [
            "| class | sensitivity | specificity | PPV | NPV |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, d in decision["per_class"].items():
            cells = [_with_ci(d[k]) for k, _ in _DECISION_ROWS[:4]]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if decision.get("intervals"):
        how = decision["intervals"]
        lines += [
            "",
            f"Intervals: {how['proportions']} for proportions; {how['auc']} for the AUC; "
            f"{how['balanced_accuracy']} for the balanced accuracy.",
        ]
    lines += ["", *_calibration_table(cal)]
    if "reliability.png" in (meta.get("files") or {}):
        lines += ["", "![Reliability diagram: validation and test](reliability.png)"]
    return "\n".join(lines)


def _finding_decisions(meta: Mapping[str, Any]) -> str:
    ops, cal = meta["operating_point"]["findings"], meta["calibration"]
    test = meta.get("metrics", {}).get("test", {})
    per = (test.get("decision") or {}).get("per_finding", {})
    lines = [
        "## Decisions and calibration",
        "",
        "Each finding has its own head, calibration and operating point, chosen on the val "
        "split; an image may have several findings, or none.",
        "",
        "On test, per finding (95% intervals: DeLong for the AUC, Wilson for the proportions):",
        "",
        "| finding | rule | threshold | AUC | sensitivity | specificity | PPV | NPV "
        "| calibration |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, op in ops.items():
        d = per.get(name, {})
        method = (cal.get("findings", {}).get(name) or {}).get("method", "?")
        cells = [_with_ci(d.get(k)) for k in ("auc", "sensitivity", "specificity", "ppv", "npv")]
        threshold = op.get("threshold")
        lines.append(
            f"| {name} | `{_rule(op)}` | {_num(threshold)} | "
            + " | ".join(cells)
            + f" | {method} |"
        )
        if op.get("note"):
            lines.append(f"| | note: {op['note']} | | | | | | | |")
    macro, micro = (
        (test.get("decision") or {}).get("macro"),
        (test.get("decision") or {}).get("micro"),
    )
    if macro and micro:
        lines += [
            "",
            f"Macro (mean over findings): AUC {_num(test.get('auc'))}, sensitivity "
            f"{_num(macro['sensitivity'])}, specificity {_num(macro['specificity'])}. Micro "
            f"(every image and finding pooled): AUC {_num(test.get('micro_auc'))}, sensitivity "
            f"{_with_ci(micro['sensitivity'])}, specificity {_with_ci(micro['specificity'])}.",
        ]
    lines += ["", *_calibration_table(cal)]
    lines[-1] = "ECE: 10 equal-width bins of p(finding), every image and finding pooled."
    if "reliability.png" in (meta.get("files") or {}):
        lines += ["", "![Reliability diagram: validation and test](reliability.png)"]
    return "\n".join(lines)


def _rule(op: Mapping[str, Any]) -> str:
    t = op.get("target")
    return op["rule"] if t is None else f"{op['rule']}={t:g}"


def _with_ci(p: Mapping[str, Any] | None) -> str:
    if not p or not isinstance(p.get("value"), (int, float)):
        return "?"
    ci = p.get("ci") or [float("nan")] * 2
    return f"{_num(p['value'])} ({_num(ci[0])} - {_num(ci[1])})"


def _decision_table(d: Mapping[str, Any]) -> list[str]:
    rows = ["| metric | test | 95% CI | count |", "| --- | --- | --- | --- |"]
    for key, name in _DECISION_ROWS:
        p = d.get(key) or {}
        ci = p.get("ci") or [None, None]
        rows.append(
            f"| {name} | {_num(p.get('value'))} | {_num(ci[0])} - {_num(ci[1])} | "
            f"{p.get('k', '?')}/{p.get('n', '?')} |"
        )
    for key, name in (("balanced_accuracy", "Balanced accuracy"), ("auc", "AUC (DeLong)")):
        p = d.get(key) or {}
        ci = p.get("ci") or [None, None]
        rows.append(f"| {name} | {_num(p.get('value'))} | {_num(ci[0])} - {_num(ci[1])} | |")
    return rows


def _calibration_table(cal: Mapping[str, Any]) -> list[str]:
    rows = ["| split | probabilities | ECE | Brier | log-loss |", "| --- | --- | --- | --- | --- |"]
    for split in ("val", "test"):
        for when in ("before", "after"):
            r = (cal.get(split) or {}).get(when)
            if r:
                label = "uncalibrated" if when == "before" else f"calibrated ({cal['method']})"
                rows.append(
                    f"| {split} | {label} | {_num(r['ece'])} | {_num(r['brier'])} | "
                    f"{_num(r['log_loss'])} |"
                )
    judged = ((cal.get("test") or {}).get("after") or {}).get("judged", "")
    return [*rows, "", f"ECE: 10 equal-width bins of the {judged}." if judged else ""]


def _per_class(test: Mapping[str, Any]) -> list[str]:
    per = test.get("per_class")
    if not per:
        return []
    what = "finding" if test.get("task") == "multilabel" else "class"
    rows = ["", f"Per {what} on test:", "", f"| {what} | precision | recall | support |"]
    rows.append("| --- | --- | --- | --- |")
    for name, r in per.items():
        rows.append(
            f"| {name} | {_num(r.get('precision'))} | {_num(r.get('recall'))} | "
            f"{r.get('support', '?')} |"
        )
    return rows


def _baselines(meta: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {
        k: v
        for k, v in meta.get("metrics", {}).items()
        if k != "test"
        and isinstance(v, Mapping)
        and all(isinstance(v.get(m), (int, float)) for m in ("acc", "auc"))
    }


def _baseline_rows(meta: Mapping[str, Any]) -> list[str]:
    base = _baselines(meta)
    if not base:
        return []
    rows = ["", "Baselines on the same test split (point estimates):", ""]
    rows += ["| baseline | AUC | accuracy | balanced accuracy |", "| --- | --- | --- | --- |"]
    for name, r in base.items():
        rows.append(
            f"| {name} | {_num(r['auc'])} | {_num(r['acc'])} | {_num(r.get('balanced_acc'))} |"
        )
    return rows


def _ood(meta: Mapping[str, Any]) -> str:
    ood = meta.get("ood")
    if not ood:
        return f"## Out-of-distribution flag\n\n{_NOT_RECORDED}."
    q = ood.get("quantile", float("nan"))
    split = ood.get("calibrated_on", "?")
    n = sum(meta.get("data_summary", {}).get("counts", {}).get(split, {}).values())
    return "\n".join(
        [
            "## Out-of-distribution flag",
            "",
            f"- Threshold: {ood.get('threshold', float('nan')):.6g} (auto-encoder "
            "reconstruction error of the backbone maps).",
            f"- Set as the {100 * q:g}th percentile of the reconstruction errors of the "
            f"`{split}` split" + (f" ({n} images)." if n else "."),
            f"- An image above it is flagged `in_distribution: false`; by construction about "
            f"{100 * (1 - q):g}% of images like the {split} split are flagged too. The flag "
            "catches gross shifts (other modality, corrupt input), not subtle ones.",
        ]
    )


def _limitations(meta: Mapping[str, Any]) -> str:
    items = _derived_limits(meta) + [
        "Trained and tested on one data set: the test split comes from the same source as "
        "training, so the metrics say nothing about other sites, scanners or populations.",
        "Label noise in the source data is unknown; metrics count the given labels as truth.",
    ]
    if not meta.get("calibration"):
        items.append(
            "Probability calibration was not evaluated; do not read the probabilities as risks."
        )
    res = _cfg(meta, "backbone").get("resolution")
    if res:
        items.append(
            f"Images are resized to {res} x {res} px before the backbone; detail finer than "
            "that is invisible to the model."
        )
    return "\n".join(["## Known limitations", "", *(f"- {i}" for i in items)])


def _derived_limits(meta: Mapping[str, Any]) -> list[str]:
    out = []
    ci = meta.get("metrics", {}).get("test_ci")
    if ci and np.isfinite(ci["auc"]).all():
        width = ci["auc"][1] - ci["auc"][0]
        size = "wide: a small test set" if width > 0.1 else "the sampling uncertainty"
        out.append(f"The test AUC's {100 * ci['level']:.0f}% CI spans {width:.3f} ({size}).")
    test = meta.get("data_summary", {}).get("counts", {}).get("test", {})
    few = {c: n for c, n in test.items() if n < MIN_TEST_PER_CLASS}
    if few:
        listed = ", ".join(f"{c} ({n})" for c, n in few.items())
        out.append(
            f"Fewer than {MIN_TEST_PER_CLASS} test images in class(es) {listed}: their "
            "per-class precision and recall are unreliable."
        )
    train = meta.get("data_summary", {}).get("counts", {}).get("train", {})
    if train and min(train.values()) and max(train.values()) / min(train.values()) > 3:
        out.append("The training classes are imbalanced by more than 3 to 1.")
    if _cfg(meta, "backbone").get("weights") == "random":
        out.append("The backbone has random weights: this bundle is for tests only.")
    return out


def _provenance(meta: Mapping[str, Any]) -> str:
    lines = ["## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in (meta.get("versions") or {}).items()] or [
        f"- {_NOT_RECORDED}"
    ]
    pre = meta.get("preprocessing", {})
    if pre.get("weights_sha256"):
        lines.append(f"- backbone weights sha256: `{pre['weights_sha256']}`")
    if pre.get("prepare_version") is not None:
        lines.append(f"- image preparation: `{pre.get('prepare')}` v{pre['prepare_version']}")
    lines += [f"- {f} sha256: `{h}`" for f, h in (meta.get("files") or {}).items()]
    lines += [
        "",
        f"Created: {meta.get('created', '?')}. Bundle format version: "
        f"{meta.get('format_version', '?')}.",
    ]
    return "\n".join(lines)


def _interval(ci: Mapping[str, Any] | None, key: str) -> str:
    if not ci or key not in ci:
        return "not recorded"
    low, high = ci[key]
    return f"{_num(low)} - {_num(high)}"


def _num(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "?"


def _int(x: Any) -> str:
    return str(int(x)) if isinstance(x, (int, float)) and np.isfinite(x) else "?"

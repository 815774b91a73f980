"""The bodies of the ``medcae`` jobs: ``run``, ``train``, ``tune`` and ``evaluate``.

Each module has ``main(args) -> int``, called by :mod:`medcae.cli.main` with the flags of
:mod:`medcae.cli.args`. They are the top layer: they check the input, open ``run.log``, start Ray
and call the distributed layer once per stage. Ray is imported inside ``main``, so importing
a module here stays cheap.
"""

from __future__ import annotations

from typing import Any


def check_budget(dataset: Any, budget: float | int, seed: int) -> None:
    """Fail before Ray starts if the training split lacks labels or the budget asks too many.

    Args:
        dataset: A loaded ``Dataset`` (``.splits["train"].labels``) or a ``Rows`` listing
            (``.table`` with ``split`` and ``label`` columns).
    """
    import numpy as np

    from medcae.data import DataError
    from medcae.model.classifier import sample_budget

    if hasattr(dataset, "table"):
        t = dataset.table
        split = np.asarray(t.column("split").to_pylist())
        labels = np.asarray(t.column("label").to_pylist())[split == "train"]
    else:
        labels = dataset.splits["train"].labels
    if labels is None:
        raise DataError(f"{dataset.name}: the training split has no labels for the classifier")
    if getattr(dataset, "multilabel", False):
        from medcae.data.findings import decode
        from medcae.model.classifier import sample_findings_budget

        sample_findings_budget(decode(labels, len(dataset.label_names)), budget, seed)
        return
    sample_budget(labels, budget, seed)

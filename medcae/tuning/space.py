"""The hyperparameter search space, as data (no Ray, no Optuna).

A space maps a parameter path to a distribution::

    cae.lr: {loguniform: [1.0e-4, 1.0e-2]}
    cae.latent_channels: {choice: [8, 16, 32]}

Kinds: ``choice`` (list of values), ``uniform`` / ``loguniform`` ([low, high]), ``int``
([low, high], inclusive). :data:`DEFAULT_SPACE` is the built-in space; a YAML file with the same
shape overrides or extends it (``--space FILE``). :func:`apply_params` turns one sampled point
into a :class:`~medcae.config.PipelineConfig`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from medcae.config import ConfigError, PipelineConfig

KINDS = ("choice", "uniform", "loguniform", "int")

# Parameter path -> what it sets. ``cae.depth`` and ``cae.width`` build ``cae.channels``
# (width, width/2, ...); ``classifier.C`` fixes the regularisation instead of a grid.
PARAMS = (
    "backbone.taps",
    "backbone.resolution",
    "cae.depth",
    "cae.width",
    "cae.latent_channels",
    "cae.noise_std",
    "cae.lr",
    "cae.weight_decay",
    "cae.epochs",
    "cae.pool",
    "cae.downsample",
    "classifier.kind",
    "classifier.C",
    "classifier.budget",
)

DEFAULT_SPACE: dict[str, dict[str, list[Any]]] = {
    "backbone.taps": {"choice": ["stage4", "stage5"]},
    "backbone.resolution": {"choice": [112]},
    "cae.depth": {"int": [1, 3]},
    "cae.width": {"choice": [32, 64, 128]},
    "cae.latent_channels": {"choice": [8, 16, 32, 64]},
    "cae.noise_std": {"uniform": [0.0, 0.5]},
    "cae.lr": {"loguniform": [1.0e-4, 1.0e-2]},
    "cae.weight_decay": {"loguniform": [1.0e-6, 1.0e-2]},
    "cae.epochs": {"choice": [15]},
    "classifier.kind": {"choice": ["logreg", "linear_svm"]},
    "classifier.C": {"loguniform": [1.0e-3, 10.0]},
}


def validate_space(space: Any, where: str = "search space") -> dict[str, dict[str, list[Any]]]:
    """Check a space's shape; errors name the bad key.

    Raises:
        ConfigError: Unknown parameter, unknown kind, or bad bounds/choices.
    """
    if not isinstance(space, dict):
        raise ConfigError(
            f"{where}: expected a mapping of parameter -> distribution, got {type(space).__name__}"
        )
    for key, dist in space.items():
        if key not in PARAMS:
            raise ConfigError(f"{where}: unknown parameter {key!r}; known: {', '.join(PARAMS)}")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in KINDS:
            raise ConfigError(
                f"{where}: {key}: expected one of {{{', '.join(KINDS)}: ...}}, got {dist!r}"
            )
        kind, args = next(iter(dist.items()))
        if key.startswith("backbone.") and kind != "choice":
            raise ConfigError(
                f"{where}: {key}: backbone parameters must be a choice (their "
                f"features are extracted once per value), got {kind}"
            )
        _check_args(key, kind, args, where)
    return space


def _check_args(key: str, kind: str, args: Any, where: str) -> None:
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {key}: choice needs a non-empty list, got {args!r}")
        if key == "classifier.budget":
            _check_budgets(args, where)
        return
    if key == "classifier.budget":
        raise ConfigError(
            f"{where}: classifier.budget must be a choice of budgets, e.g. {{choice: [5, 20, 0.1]}}"
            f" (counts per class and fractions do not lie on one scale), got {kind}"
        )
    ok = (
        isinstance(args, list)
        and len(args) == 2
        and all(isinstance(v, (int, float)) for v in args)
        and args[0] < args[1]
    )
    if not ok or (kind == "loguniform" and args[0] <= 0):
        raise ConfigError(
            f"{where}: {key}: {kind} needs [low, high] with low < high"
            f"{' and low > 0' if kind == 'loguniform' else ''}, got {args!r}"
        )


def _check_budgets(values: list[Any], where: str) -> None:
    """Each budget is a count per class (an int >= 1) or a fraction of each class in (0, 1]."""
    for v in values:
        count = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        fraction = isinstance(v, float) and 0 < v <= 1
        if not (count or fraction):
            raise ConfigError(
                f"{where}: classifier.budget: {v!r} is neither a count per class (an int >= 1, "
                "e.g. 20) nor a fraction of each class (a float in (0, 1], e.g. 0.1)"
            )


def load_space(path: str | Path | None) -> dict[str, dict[str, list[Any]]]:
    """The default space, overridden key by key by a YAML file when given."""
    if path is None:
        return dict(DEFAULT_SPACE)
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return {**DEFAULT_SPACE, **validate_space(data, str(path))}


def apply_params(base: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The config of one sampled point: ``base`` with ``params`` (paths of :data:`PARAMS`)."""
    p = {k: v for k, v in params.items() if k in PARAMS}
    bb, cae, clf = base.backbone, base.cae, base.classifier
    if "backbone.taps" in p:
        taps = p["backbone.taps"]
        bb = replace(bb, taps=tuple(taps.split("+")) if isinstance(taps, str) else tuple(taps))
    if "backbone.resolution" in p:
        bb = replace(bb, resolution=int(p["backbone.resolution"]))
    depth = int(p.get("cae.depth", len(cae.channels)))
    width = int(p.get("cae.width", cae.channels[0]))
    cae = replace(
        cae,
        channels=tuple(max(4, width >> i) for i in range(depth)),
        **{
            k[4:]: _cast(k, v)
            for k, v in p.items()
            if k.startswith("cae.") and k not in ("cae.depth", "cae.width")
        },
    )
    clf = replace(
        clf,
        **{k[11:]: v for k, v in p.items() if k.startswith("classifier.") and k != "classifier.C"},
    )
    if "classifier.C" in p:
        clf = replace(clf, C_grid=(float(p["classifier.C"]),))
    return replace(base, backbone=bb, cae=cae, classifier=clf)


def _cast(key: str, value: Any) -> Any:
    return int(value) if key in ("cae.latent_channels", "cae.epochs") else value


def backbone_variants(space: dict[str, dict[str, list[Any]]], base: PipelineConfig) -> list:
    """Every (taps, resolution) the space can pick: their features are extracted up front."""
    taps = space.get("backbone.taps", {}).get("choice", [base.backbone.taps or None])
    res = space.get("backbone.resolution", {}).get("choice", [base.backbone.resolution])
    out = []
    for t in taps:
        for r in res:
            params = {"backbone.resolution": r} | ({"backbone.taps": t} if t else {})
            out.append(apply_params(base, params).backbone)
    return out

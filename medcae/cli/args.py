"""Every flag of the ``medcae`` jobs, defined once, and the config they build.

Groups (``add_*_args``) are shared; ``add_<job>_args`` picks the groups of one job and adds the
flags that only it has. Nothing here imports Ray.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields, replace
from typing import Any

from medcae.cli.tracking import DEFAULT_URI
from medcae.config import (
    CALIBRATION_CHOICES,
    REPRESENTATION_CHOICES,
    SMOKE_ROWS,
    BackboneConfig,
    CAEConfig,
    ClassifierConfig,
    ConfigError,
    PipelineConfig,
    TrainConfig,
    parse_operating_point,
)
from medcae.labeling.strategies import HYBRID_MIN_PER_CLASS, STRATEGIES

#: Images per split kept by ``--smoke-test``, in every job (defined in the core config).
SMOKE_SIZES = SMOKE_ROWS


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _taps(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def budget(text: str) -> float | int:
    """``0.1`` is a fraction of each class; ``20`` (no dot) is a count per class."""
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"label budget {text!r}: give a fraction with a dot (0.1) or a count per class (20)"
        ) from None


def budgets(text: str) -> list[float | int]:
    """Comma-separated label budgets, each as for :func:`budget`."""
    return [budget(t) for t in text.split(",") if t]


def add_data_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default="demo",
        help="data set: .npz / folder / .csv / .parquet path, a MedMNIST name "
        "(pneumoniamnist, chestmnist, ...), 'demo' (built-in synthetic set) or 'demo-findings' "
        "(its multi-label variant); a CSV with a 'labels' column ('Effusion|Mass') is "
        "multi-label",
    )
    d.add_argument(
        "--label-columns",
        type=lambda v: tuple(c.strip() for c in v.split(",") if c.strip()),
        default=(),
        help="multi-label CSV: its 0/1 finding columns, comma-separated",
    )
    d.add_argument(
        "--no-finding",
        default="No Finding",
        help="multi-label: the name that means no finding in a 'labels' column (besides empty)",
    )
    d.add_argument(
        "--unlabeled",
        default=None,
        help="separate unlabeled images for the CAE "
        "(folder, .npz, .parquet); default: the labeled set's training images",
    )
    d.add_argument(
        "--data-dir",
        default=None,
        help="where named data sets live (default $MEDCAE_DATA_DIR or ~/.medmnist)",
    )


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("backbone")
    b.add_argument("--backbone", default="efficientnet_lite0")
    b.add_argument(
        "--taps", type=_taps, default=(), help="comma-separated tap layers (default per backbone)"
    )
    b.add_argument("--resolution", type=int, default=112, help="backbone input side, pixels")
    b.add_argument("--backbone-weights", default=None, help="state-dict file of the backbone")
    b.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="backbone precision; bf16 is faster on CPUs with AVX-512 BF16 (OpenVINO or "
        "PyTorch autocast) and changes the features, so it is part of the store key and bundle",
    )


def add_cae_args(p: argparse.ArgumentParser, epochs: int | None = 15) -> None:
    c = p.add_argument_group("auto-encoder")
    c.add_argument("--cae-channels", type=_ints, default=(128, 64))
    c.add_argument("--latent-channels", type=int, default=32)
    c.add_argument("--downsample", action="store_true")
    c.add_argument("--noise-std", type=float, default=0.1)
    c.add_argument("--pool", default="flatten", choices=["avg", "avgmax", "flatten"])
    c.add_argument("--epochs", type=int, default=epochs)
    c.add_argument("--batch-size", type=int, default=64, help="global batch (split over workers)")
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--weight-decay", type=float, default=1e-4)
    c.add_argument("--seed", type=int, default=0)
    add_hierarchical_arg(c)
    c.add_argument(
        "--patience",
        type=int,
        default=None,
        help="stop the CAE when validation reconstruction has not improved for this many "
        "epochs, keeping the best epoch (0: off; default 3)",
    )


def add_hierarchical_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--hierarchical",
        action="store_true",
        help="the paper's hierarchical form: one CAE per tap (give two or more --taps), "
        "codes concatenated",
    )


def add_classifier_args(p: argparse.ArgumentParser, kind: bool = True) -> None:
    k = p.add_argument_group("classifier")
    if kind:
        k.add_argument("--classifier", default="logreg", choices=["logreg", "linear_svm"])
    k.add_argument(
        "--budget",
        type=budget,
        default=1.0,
        help="labels used: fraction of each class (0.1) or count per class (20)",
    )
    k.add_argument(
        "--representation",
        default="auto",
        choices=list(REPRESENTATION_CHOICES),
        help="the classifier's input; auto: the simplest within one standard error of the "
        "best validation AUC",
    )
    add_decision_args(k)


def add_decision_args(k: Any) -> None:
    """``--calibration`` and ``--operating-point``: how probabilities are calibrated and
    turned into labels, both chosen on the val split."""
    k.add_argument(
        "--calibration",
        default="auto",
        choices=list(CALIBRATION_CHOICES),
        help="probability calibration on val; auto: the lowest cross-validated log-loss of "
        "none, temperature, platt (two classes, each finding) or prior (several classes)",
    )
    k.add_argument(
        "--operating-point",
        default="auto",
        type=_operating_point,
        help="how a probability becomes a label, chosen on val: youden (default for two "
        "classes), sensitivity=0.95, specificity=0.90, argmax (default for several classes)",
    )


def _operating_point(text: str) -> str:
    try:
        parse_operating_point(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("ray")
    r.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    r.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of a local Ray")


def add_runtime_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "torch", "onnxruntime", "openvino"],
        help="inference runtime of the frozen backbone (auto: an exported graph on OpenVINO, "
        "else ONNX Runtime, on CPU; PyTorch on CUDA or when neither is installed)",
    )


def add_scaling_args(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("scaling")
    r.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP if > 1)")
    r.add_argument("--use-gpu", action="store_true", help="one GPU per Train worker and actor")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--extract-batch-size", type=int, default=64)
    r.add_argument("--extract-actors", type=int, default=1)
    r.add_argument(
        "--extract-threads",
        type=int,
        default=0,
        help="CPUs/torch threads per backbone actor (0: node cores / actors)",
    )
    add_runtime_arg(r)


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """Cluster and scaling flags (the jobs that run Ray Train)."""
    add_cluster_args(p)
    add_scaling_args(p)


def add_fault_args(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("checkpoints and failures")
    f.add_argument(
        "--max-failures", type=int, default=0, help="worker-group restarts allowed (-1: no limit)"
    )
    f.add_argument("--num-to-keep", type=int, default=2, help="checkpoints kept (0: all)")
    f.add_argument(
        "--checkpoint-score-attribute",
        default="",
        choices=["", "train_loss", "val_loss"],
        help="metric ranking checkpoints (lower is better); empty: keep the latest",
    )
    f.add_argument(
        "--placement-strategy",
        default="PACK",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="where Train workers go: PACK fills nodes, SPREAD one per node first",
    )


def default_store_root() -> str:
    """``$MEDCAE_CACHE_DIR``, else ``~/.cache/medcae/features``."""
    return os.environ.get("MEDCAE_CACHE_DIR") or os.path.expanduser("~/.cache/medcae/features")


def add_output_args(
    p: argparse.ArgumentParser, out: str | None, out_help: str, register: bool = False
) -> None:
    o = p.add_argument_group("output and storage")
    o.add_argument("--out", default=out, help=out_help)
    if register:
        o.add_argument(
            "--register",
            default=None,
            metavar="NAME",
            help="add the bundle as the next version of model NAME in MLflow's Model Registry "
            "at --mlflow (else $MLFLOW_TRACKING_URI, else ./mlruns.db); see `medcae models`",
        )
    o.add_argument(
        "--mlflow",
        nargs="?",
        const=DEFAULT_URI,
        default=None,
        metavar="URI",
        help="log parameters, per-epoch metrics, test metrics and the bundle to MLflow "
        "(without a value: the SQLite database ./mlruns.db; or http://..., sqlite:///..., "
        "or a folder for MLflow's file store)",
    )
    o.add_argument(
        "--feature-store",
        "--cache-dir",
        dest="feature_store",
        default=None,
        help="feature-store root shared by runs; entries are keyed by image content and "
        "backbone (default $MEDCAE_CACHE_DIR or ~/.cache/medcae/features); a local path, NFS "
        "or a pyarrow URI (s3://...)",
    )


def add_storage_args(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("checkpoints")
    o.add_argument(
        "--storage-path",
        default=None,
        help="Ray Train checkpoints: local path, NFS, or a pyarrow URI (default <out>/checkpoints)",
    )
    o.add_argument(
        "--name", default="cae", help="run name; the same name and storage path resume a run"
    )
    o.add_argument(
        "--materialize",
        default="auto",
        choices=["auto", "always", "never"],
        help="hold the feature maps in the object store during training (auto: if they take "
        "under a quarter of it) or stream them from storage every epoch",
    )


def add_smoke_arg(p: argparse.ArgumentParser, what: str = "tiny subset, tiny model") -> None:
    sizes = ", ".join(f"{k} {v}" for k, v in SMOKE_SIZES.items())
    p.add_argument("--smoke-test", action="store_true", help=f"{what} ({sizes} images): seconds")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """``medcae run`` (and ``medcae train``, the same job): the whole method, one bundle."""
    add_data_args(p)
    add_backbone_args(p)
    add_cae_args(p, epochs=None)
    add_classifier_args(p)
    add_ray_args(p)
    add_fault_args(p)
    add_output_args(
        p, None, "output folder (default runs/<time>): bundle/, results.json, run.log", True
    )
    add_storage_args(p)
    add_smoke_arg(p)


def add_tune_args(p: argparse.ArgumentParser) -> None:
    """``medcae tune``: Ray Tune + Optuna over the CAE and the classifier."""
    add_data_args(p)
    add_backbone_args(p)
    s = p.add_argument_group("search")
    s.add_argument("--space", default=None, help="YAML overriding the default search space")
    s.add_argument("--num-samples", type=int, default=16)
    s.add_argument("--max-concurrent", type=int, default=2)
    s.add_argument("--cpus-per-trial", type=float, default=1.0)
    s.add_argument("--gpus-per-trial", type=float, default=0.0)
    s.add_argument("--grace-period", type=int, default=2, help="ASHA: epochs before stopping")
    s.add_argument("--reduction-factor", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", default="search", help="experiment name under --out")
    s.add_argument("--resume", action="store_true", help="restore the search at --out/--name")
    add_classifier_args(p, kind=False)
    add_cluster_args(p)
    add_runtime_arg(p)
    add_output_args(p, "runs/tune", "output folder (trials.csv, bundle/, run.log, ...)", True)
    add_smoke_arg(p, "tiny data, tiny space")


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    """``medcae evaluate``: the paper's method against the baselines, over budgets and seeds."""
    add_data_args(p)
    add_backbone_args(p)
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--budgets",
        type=budgets,
        default=[0.01, 0.1, 1.0, 20],
        help="fractions (with a dot) and counts per class",
    )
    e.add_argument("--seeds", type=int, default=3, help="how many seeds (0, 1, ...)")
    e.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated; also cae_hier (one CAE per tap: give two or more --taps); "
        "for findings cae_spread and finetune are left out",
    )
    e.add_argument("--epochs", type=int, default=15, help="CAE epochs")
    e.add_argument(
        "--active",
        action="store_true",
        help="instead of the methods: the simulated labeling study (10 random labels per "
        f"class, then 20 per round up to 200, chosen by each of {', '.join(STRATEGIES)}); "
        "writes active.csv, active.md, active_auc.png",
    )
    add_hierarchical_arg(e)
    add_decision_args(e)
    e.add_argument(
        "--finetune-epochs", type=int, default=12, help="most fine-tuning epochs (early stopping)"
    )
    e.add_argument(
        "--finetune-resolution",
        type=int,
        default=None,
        help="fine-tuning input side (default: --resolution, the CAE's)",
    )
    add_cluster_args(p)
    add_runtime_arg(p)
    add_output_args(p, "runs/evaluate", "output folder (report.md, results.csv, run.log, ...)")
    add_smoke_arg(p, "tiny subset, one seed")


def add_predict_args(p: argparse.ArgumentParser) -> None:
    """``medcae predict --bundle B --data PATH``: a bundle over a whole archive (Ray Data)."""
    b = p.add_argument_group("a whole archive, with a bundle (Ray Data)")
    b.add_argument("--bundle", default=None, help="model bundle folder")
    b.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="a folder of images (recursively: PNG, JPEG, DICOM, ...), a .csv with a 'path' "
        "column, a .parquet with an 'image' column of encoded bytes, or a glob "
        "('scans/**/*.dcm'); labels in it are ignored",
    )
    b.add_argument(
        "--out",
        default=None,
        help="the Parquet file of predictions, e.g. preds.parquet; preds.skipped.csv and "
        "preds.log go beside it",
    )
    b.add_argument("--csv", action="store_true", help="also write the table as preds.csv")
    add_predictor_stage_args(b)
    add_cluster_args(p)


def add_predictor_stage_args(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The Predictor actor-pool stage (``medcae predict``, ``medcae suggest``)."""
    p.add_argument(
        "--batch-size", type=int, default=64, help="images per Predictor call (%(default)s)"
    )
    p.add_argument(
        "--actors", type=int, default=1, help="predictor actors, one bundle each (%(default)s)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPUs/torch threads per predictor actor (0: node cores / actors)",
    )
    add_runtime_arg(p)


def add_suggest_args(p: argparse.ArgumentParser) -> None:
    """``medcae suggest --bundle B --pool PATH --k 50``: which pool images to label next."""
    s = p.add_argument_group("suggestions")
    s.add_argument("--bundle", required=True, help="model bundle folder")
    s.add_argument(
        "--pool",
        required=True,
        metavar="PATH",
        help="the unlabeled images: a folder (recursively), a .csv with a 'path' column, a "
        ".parquet with an 'image' column or a glob ('scans/**/*.dcm')",
    )
    s.add_argument("--k", type=int, default=50, help="how many images to suggest (%(default)s)")
    s.add_argument(
        "--labeled",
        default=None,
        metavar="CSV",
        help="images labeled already: a CSV of path,label rows (paths relative to the CSV), "
        "the format of `medcae run --data`; they are never suggested",
    )
    s.add_argument(
        "--strategy",
        default="hybrid",
        help=f"one of {', '.join(STRATEGIES)} (%(default)s); hybrid: typiclust while no "
        f"label is known or some class has fewer than {HYBRID_MIN_PER_CLASS}, then margin",
    )
    s.add_argument(
        "--include-ood",
        action="store_true",
        help="also rank the images the bundle flags as out of distribution",
    )
    s.add_argument(
        "--seed", type=int, default=0, help="seed of random and of the k-means (%(default)s)"
    )
    s.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/suggest-<time>): suggestions.csv, suggestions.png, "
        "out_of_distribution.csv, labels.csv, pool.parquet, skipped.csv, run.log",
    )
    add_predictor_stage_args(p.add_argument_group("predictor stage (Ray Data)"))
    add_cluster_args(p)


def _pick(cls: type, g: dict[str, Any], **flag_of: str) -> dict[str, Any]:
    """The fields of dataclass ``cls`` that were given as flags (``field=flag`` renames)."""
    out = {}
    for f in fields(cls):
        flag = flag_of.get(f.name, f.name)
        if g.get(flag) is not None:
            out[f.name] = g[flag]
    return out


#: ``medcae evaluate --methods``' default.
DEFAULT_METHODS = (
    "frozen_final,frozen_tap,cae,cae_pixels,cae_concat,cae_ensemble,cae_spread,auto,finetune"
)


def single_label_only(rows: Any, job: str) -> None:
    """Refuse multi-label data in a job that has no findings path yet, before Ray starts.

    Raises:
        ConfigError: Naming the data, its findings, and the job that does take them.
    """
    if getattr(rows, "multilabel", False):
        raise ConfigError(
            f"medcae {job}: {rows.name} is multi-label (findings {', '.join(rows.label_names)}); "
            f"{job} takes single-label data only for now. `medcae run` trains on findings"
        )


def config_from_args(a: argparse.Namespace) -> PipelineConfig:
    """Build the pipeline config from parsed flags; flags a job lacks keep the defaults."""
    g = vars(a)
    backbone = BackboneConfig(
        **_pick(BackboneConfig, g, name="backbone", weights="backbone_weights")
    )
    return PipelineConfig(
        data=a.data,
        unlabeled=a.unlabeled,
        label_columns=tuple(getattr(a, "label_columns", ()) or ()),
        no_finding=getattr(a, "no_finding", None) or "No Finding",
        backbone=backbone,
        cae=cae_config(g, backbone),
        classifier=ClassifierConfig(**_pick(ClassifierConfig, g, kind="classifier")),
        train=TrainConfig(**_pick(TrainConfig, g)),
    )


def cae_config(g: dict[str, Any], backbone: BackboneConfig) -> CAEConfig:
    """The CAE flags; ``--hierarchical`` becomes ``groups``, the taps' channel counts.

    Raises:
        ConfigError: ``--hierarchical`` with fewer than two taps.
    """
    cae = CAEConfig(**_pick(CAEConfig, g, channels="cae_channels"))
    if not g.get("hierarchical"):
        return cae
    if len(backbone.taps) < 2:
        raise ConfigError(
            "--hierarchical trains one CAE per tap and needs two or more --taps "
            f"(e.g. --taps stage4,stage5), got {list(backbone.taps) or 'the default tap only'}"
        )
    from medcae.model.backbones import tap_channels

    groups = tap_channels(backbone.name, tuple(backbone.taps), backbone.resolution)
    return replace(cae, groups=groups)


def add_retrain_args(p: argparse.ArgumentParser) -> None:
    """``medcae retrain``: the labeling loop's job (:mod:`medcae.cli.retrain`)."""
    m = p.add_argument_group("the model and the labels")
    m.add_argument("--model", required=True, help="registered model NAME: its champion retrained")
    m.add_argument(
        "--labels",
        required=True,
        help="labels snapshot: a CSV of image_id,label,split (split train, or test: held out "
        "for the comparison), as the server writes it when a job starts",
    )
    m.add_argument("--pool", required=True, help="the labeled pool, as the server lists it")
    m.add_argument("--data-dir", default=None, help="where data set names are looked up")
    m.add_argument("--job-id", default="", help="the server's job id, recorded on the version")
    m.add_argument(
        "--alias", default="challenger", help="alias given to the new version (default challenger)"
    )
    m.add_argument("--epochs", type=int, default=None, help="CAE epochs (default the champion's)")
    m.add_argument(
        "--representation",
        default=None,
        choices=list(REPRESENTATION_CHOICES),
        help="the classifier's input (default the champion's)",
    )
    m.add_argument(
        "--calibration",
        default=None,
        choices=list(CALIBRATION_CHOICES),
        help="probability calibration on val (default the champion's)",
    )
    add_ray_args(p)
    add_fault_args(p)
    add_output_args(p, None, "output folder (default runs/retrain-<time>)")
    add_storage_args(p)
    add_smoke_arg(p, "the champion's data subsampled, a tiny model")

"""Configuration as frozen dataclasses that round-trip through plain dicts.

The same dict is a Ray Train ``train_loop_config``, a Tune search-space base, and the
``config`` block of a model bundle, so every field is a JSON scalar or a tuple of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

#: Images kept per split by ``--smoke-test``, in every job.
SMOKE_ROWS: dict[str, int] = {"train": 96, "val": 48, "test": 48, "unlabeled": 96}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


#: The classifier's inputs by name (:mod:`medcae.model.representations` registers each; a test
#: keeps the two lists equal), and ``auto``, which picks one on validation.
REPRESENTATION_CHOICES = ("auto", "frozen_final", "frozen_tap", "cae", "cae_concat", "cae_ensemble")


#: ``classifier.calibration`` values (:mod:`medcae.model.calibration`).
CALIBRATION_CHOICES = ("auto", "none", "temperature", "platt", "prior")

#: Operating point rules (:mod:`medcae.model.operating_point`).
OPERATING_RULES = ("auto", "youden", "sensitivity", "specificity", "argmax")


def parse_operating_point(text: str) -> tuple[str, float | None]:
    """``"sensitivity=0.95"`` as ``("sensitivity", 0.95)``; ``"youden"`` as ``("youden",
    None)``.

    Raises:
        ConfigError: An unknown rule, a missing or extra target, or a target outside (0, 1].
    """
    rule, _, value = str(text).strip().partition("=")
    rule = rule.strip().lower()
    usage = "auto, youden, argmax, sensitivity=0.95 or specificity=0.90"
    if rule not in OPERATING_RULES:
        raise ConfigError(f"operating point {text!r}: unknown rule {rule!r}; expected {usage}")
    if rule in ("sensitivity", "specificity"):
        try:
            target = float(value)
        except ValueError:
            raise ConfigError(
                f"operating point {text!r}: {rule} needs a target in (0, 1], e.g. {rule}=0.9"
            ) from None
        if not 0 < target <= 1:
            raise ConfigError(
                f"operating point {text!r}: the target must be in (0, 1], got {target}"
            )
        return rule, target
    if value:
        raise ConfigError(f"operating point {text!r}: {rule} takes no value; expected {usage}")
    return rule, None


@dataclass(frozen=True)
class BackboneConfig:
    """Which frozen CNN, where it is tapped, and at what input resolution.

    Attributes:
        name: Registry name (see ``medcae.model.backbones.BACKBONES``).
        taps: Layer names whose feature maps feed the CAE (several are resized to the deepest's
            spatial size and concatenated on channels). Empty means the backbone's default.
        resolution: Input side length in pixels; images are resized to it.
        weights: ``None`` for ImageNet weights, a state-dict path, or ``"random"``.
        precision: ``fp32``, or ``bf16`` (opt-in: about 1.8x faster on a CPU with AVX-512 BF16,
            features differ by up to a few percent; see ``medcae.model.runtimes``). Part of the
            feature
            store key and of the bundle, so serving computes features as training did.
    """

    name: str = "efficientnet_lite0"
    taps: tuple[str, ...] = ()
    resolution: int = 112
    weights: str | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.resolution < 32:
            raise ConfigError(f"backbone.resolution must be >= 32, got {self.resolution}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"backbone.precision must be fp32 or bf16, got {self.precision!r}")


@dataclass(frozen=True)
class CAEConfig:
    """Shape and training of the convolutional auto-encoder on feature maps.

    Attributes:
        channels: Output channels of each encoder conv layer (its length is the depth).
        latent_channels: Channels of the code map.
        downsample: Whether the first encoder layer has stride 2.
        noise_std: Std of the Gaussian noise added to standardised inputs (denoising); 0 = off.
        pool: How the code map becomes a vector: ``avg``, ``avgmax`` or ``flatten``.
        epochs: Training epochs.
        batch_size: Global batch size; each of N DDP workers takes ``batch_size // N``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        seed: Seed for weights init and noise.
        groups: The paper's *hierarchical* form: channel counts of the combined taps, in tap
            order, one CAE each on its own tap's channels, their code maps concatenated. Empty
            (the default): one CAE on all channels. ``--hierarchical`` fills it from the
            backbone's taps.
        patience: Stop when the validation reconstruction loss has not improved for this many
            epochs, keeping the best epoch's weights (0: train every epoch, keep the last).
    """

    channels: tuple[int, ...] = (128, 64)
    latent_channels: int = 32
    downsample: bool = False
    noise_std: float = 0.1
    pool: str = "flatten"
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    groups: tuple[int, ...] = ()
    patience: int = 3

    def __post_init__(self) -> None:
        if any(g < 1 for g in self.groups):
            raise ConfigError(f"cae.groups must be positive channel counts, got {self.groups}")
        if self.patience < 0:
            raise ConfigError(f"cae.patience must be >= 0, got {self.patience}")
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"cae.channels must be positive ints, got {self.channels}")
        if self.pool not in ("avg", "avgmax", "flatten"):
            raise ConfigError(f"cae.pool must be avg, avgmax or flatten, got {self.pool!r}")
        if self.noise_std < 0 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"cae: need noise_std>=0, epochs>=1, batch_size>=1, lr>0: {self}")


@dataclass(frozen=True)
class ClassifierConfig:
    """The small supervised head and what it sees.

    Attributes:
        kind: ``logreg`` or ``linear_svm``.
        representation: The classifier's input (:mod:`medcae.model.representations`): ``auto``
            (picked on validation by the one-standard-error rule), ``cae``, ``cae_concat``,
            ``frozen_tap`` or ``frozen_final``.
        budget: Labels to use: a fraction in (0, 1] of each class, or an int count per class.
        C_grid: Inverse regularisation strengths tried; the best on validation AUC is kept.
        seed: Seed of the stratified label sampling.
        calibration: How probabilities are calibrated on validation
            (:mod:`medcae.model.calibration`): ``auto`` (chosen by cross-validated log-loss),
            ``none``, ``temperature``, ``platt`` (two classes, each finding) or ``prior``
            (several classes).
        operating_point: How a probability becomes a label, chosen on validation
            (:mod:`medcae.model.operating_point`): ``auto`` (``youden`` for two classes,
            ``argmax`` for several), ``youden``, ``sensitivity=0.95``, ``specificity=0.90``,
            ``argmax``.
    """

    kind: str = "logreg"
    budget: float = 1.0
    C_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    seed: int = 0
    representation: str = "auto"
    calibration: str = "auto"
    operating_point: str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("logreg", "linear_svm"):
            raise ConfigError(f"classifier.kind must be logreg or linear_svm, got {self.kind!r}")
        if self.representation not in REPRESENTATION_CHOICES:
            raise ConfigError(
                f"classifier.representation must be one of {', '.join(REPRESENTATION_CHOICES)}, "
                f"got {self.representation!r}"
            )
        if self.budget <= 0:
            raise ConfigError(f"classifier.budget must be > 0, got {self.budget}")
        if self.calibration not in CALIBRATION_CHOICES:
            raise ConfigError(
                f"classifier.calibration must be one of {', '.join(CALIBRATION_CHOICES)}, "
                f"got {self.calibration!r}"
            )
        parse_operating_point(self.operating_point)


@dataclass(frozen=True)
class TrainConfig:
    """How the CAE is trained on Ray.

    Attributes:
        num_workers: Ray Train workers (DDP when > 1).
        use_gpu: Train and extract on GPUs.
        cpus_per_worker: Logical CPUs each Train worker reserves (fractional leaves Ray Data room).
        extract_batch_size: Images per backbone batch.
        extract_actors: Backbone actors in the Ray Data actor pool.
        extract_threads: CPUs (= torch threads) per backbone actor; 0 = the driver node's cores
            divided by ``extract_actors``.
        max_failures: Worker-group restarts Ray Train allows (-1: unlimited).
        num_to_keep: Checkpoints kept on storage (0: all).
        checkpoint_score_attribute: Metric that ranks checkpoints (``val_loss``...) for
            ``num_to_keep`` and for picking the final model; empty = keep the latest.
        placement_strategy: ``PACK`` (fewest nodes) or ``SPREAD`` (one worker per node first).
        runtime: Inference runtime of the frozen backbone: ``auto``, ``torch``, ``onnxruntime``,
            ``openvino``.
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    extract_batch_size: int = 64
    extract_actors: int = 1
    extract_threads: int = 0
    max_failures: int = 0
    num_to_keep: int = 2
    checkpoint_score_attribute: str = ""
    placement_strategy: str = "PACK"
    runtime: str = "auto"

    def __post_init__(self) -> None:
        if self.runtime not in ("auto", "torch", "onnxruntime", "openvino"):
            raise ConfigError(
                f"train.runtime must be auto, torch, onnxruntime or openvino, got {self.runtime!r}"
            )
        if self.num_workers < 1:
            raise ConfigError(f"train.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"train.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ConfigError(f"train.max_failures must be >= -1, got {self.max_failures}")
        if self.num_to_keep < 0:
            raise ConfigError(f"train.num_to_keep must be >= 0, got {self.num_to_keep}")
        allowed = ("", "train_loss", "val_loss")
        if self.checkpoint_score_attribute not in allowed:
            raise ConfigError(
                "train.checkpoint_score_attribute must be one of "
                f"{allowed}, got {self.checkpoint_score_attribute!r}"
            )
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(
                "train.placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                f"got {self.placement_strategy!r}"
            )


@dataclass(frozen=True)
class PipelineConfig:
    """Everything one pipeline run needs, nested."""

    data: str = "demo"
    unlabeled: str | None = None
    #: Multi-label sources (:mod:`medcae.data.findings`): the 0/1 finding columns of a CSV,
    #: and the name that means "no finding" in a ``labels`` column.
    label_columns: tuple[str, ...] = ()
    no_finding: str = "No Finding"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cae: CAEConfig = field(default_factory=CAEConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready nested dict (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        nested = {
            "backbone": BackboneConfig,
            "cae": CAEConfig,
            "classifier": ClassifierConfig,
            "train": TrainConfig,
        }
        top = {k: v for k, v in data.items() if k not in nested}
        parts: dict[str, Any] = {k: _from_dict(c, data.get(k) or {}, k) for k, c in nested.items()}
        return _from_dict(cls, {**top, **parts}, "config")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj

"""The built-in offline demo data set ``synthetic-lesions`` (generated, never downloaded)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medcae.data.dataset import SPLITS
from medcae.data.decode import DataError

logger = logging.getLogger(__name__)

DEMO_NAME = "demo"
DEMO_DATASET_NAME = "synthetic-lesions"
DEMO_FILENAME = "medcae-demo.npz"
DEMO_LABEL_NAMES = ("normal", "nodule", "ring")
#: The multi-label variant: findings that may appear together, or none.
FINDINGS_DEMO_NAME = "demo-findings"
FINDINGS_DATASET_NAME = "synthetic-findings"
FINDINGS_FILENAME = "medcae-demo-findings.npz"
FINDING_NAMES = ("nodule", "ring", "effusion")
#: Each finding's prevalence (drawn independently per image).
FINDING_RATES = (0.35, 0.30, 0.30)


def _demo_path(data_dir: str | None, findings: bool = False) -> Path:
    """``<data_dir or ~/.cache/medcae>/medcae-demo[-findings].npz``, generated on first use."""
    root = Path(data_dir).expanduser() if data_dir else Path.home() / ".cache" / "medcae"
    path = root / (FINDINGS_FILENAME if findings else DEMO_FILENAME)
    if not path.exists():
        name = FINDINGS_DATASET_NAME if findings else DEMO_DATASET_NAME
        logger.info("generating the demo data set %r at %s", name, path)
        (make_findings_dataset if findings else make_demo_dataset)(path)
    return path


def make_findings_dataset(
    dest: str | Path,
    *,
    seed: int = 0,
    n_train: int = 600,
    n_val: int = 200,
    n_test: int = 300,
    size: int = 64,
) -> Path:
    """Generate ``synthetic-findings``, the demo's multi-label variant, as a ``.npz`` whose
    labels are ``(N, 3)`` 0/1: ``nodule`` (blobs), ``ring`` (an annulus) and ``effusion`` (a
    brighter base of one lung field), each present independently at :data:`FINDING_RATES`,
    so an image may show none, one or several. Same background and noise as the demo.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    for split, count in zip(SPLITS, (n_train, n_val, n_test)):
        y = (rng.random((count, len(FINDING_NAMES))) < np.asarray(FINDING_RATES)).astype(np.int64)
        image = _synth_background(count, size, rng, yy, xx)
        image += _synth_lesions(np.where(y[:, 0] == 1, 1, 0), size, rng, yy, xx)
        image += _synth_lesions(np.where(y[:, 1] == 1, 2, 0), size, rng, yy, xx)
        image += _synth_effusion(y[:, 2] == 1, rng, yy, xx)
        image += rng.standard_normal(image.shape, dtype=np.float32) * _uniform(
            rng, 0.02, 0.05, count
        )
        arrays[f"{split}_images"] = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = y
    arrays["label_names"] = np.array(FINDING_NAMES)
    _atomic_savez(Path(dest), arrays)
    return Path(dest)


def _synth_effusion(
    present: np.ndarray, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """float32 ``(N, size, size)``: a brighter base of one lung field where ``present``, its
    upper edge a soft meniscus."""
    n = len(present)
    side = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
    level = _uniform(rng, 0.0, 0.3, n)
    across = np.exp(-(((xx - side * 0.42) / 0.3) ** 2))
    up = 0.5 + 0.5 * np.tanh((yy - level + 0.15 * (xx - side * 0.42) ** 2) * 12)
    contrast = _uniform(rng, 0.08, 0.28, n)
    return (contrast * present[:, None, None]) * across * up


def make_demo_dataset(
    dest: str | Path,
    *,
    seed: int = 0,
    n_train: int = 600,
    n_val: int = 150,
    n_test: int = 300,
    size: int = 64,
) -> Path:
    """Generate the offline demo data set ``synthetic-lesions`` as a MedMNIST-style ``.npz``.

    Grayscale ``size x size`` chest-like images (vignetted body, two darker lung fields, rib
    texture, smooth random low-frequency field, noise) in three balanced classes:
    0 ``normal`` (no lesion), 1 ``nodule`` (one or two bright blurred blobs) and 2 ``ring``
    (a blurred annulus around a darker cavity). Lesion contrast varies down to barely
    visible, so the task is learnable but not trivial.

    Args:
        dest: Output ``.npz`` path (written atomically).
        seed: Seed; the same seed gives the same file content.
        n_train: Number of training images.
        n_val: Number of validation images.
        n_test: Number of test images.
        size: Image side length in pixels (>= 16).

    Returns:
        ``dest`` as a Path.
    """
    if size < 16 or min(n_train, n_val, n_test) < 0:
        raise DataError(
            f"make_demo_dataset: need size >= 16 and non-negative counts, got "
            f"size={size}, n_train={n_train}, n_val={n_val}, n_test={n_test}"
        )
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, count in zip(SPLITS, (n_train, n_val, n_test)):
        labels = rng.permutation(np.arange(count) % len(DEMO_LABEL_NAMES))
        arrays[f"{split}_images"] = _synth_images(labels, size, rng)
        arrays[f"{split}_labels"] = labels.astype(np.int64)[:, None]
    arrays["label_names"] = np.array(DEMO_LABEL_NAMES)
    dest = Path(dest)
    _atomic_savez(dest, arrays)
    return dest


def _atomic_savez(dest: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``dest`` as a compressed ``.npz`` via a temporary file and a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _uniform(rng: np.random.Generator, lo: float, hi: float, n: int) -> np.ndarray:
    """``(n, 1, 1)`` float32 uniform draws, ready to broadcast over images."""
    return rng.uniform(lo, hi, n).astype(np.float32)[:, None, None]


def _synth_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(N, size, size)`` images for int ``(N,)`` labels: background, lesions, noise."""
    n = len(labels)
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    image = _synth_background(n, size, rng, yy, xx)
    image += _synth_lesions(labels, size, rng, yy, xx)
    image += rng.standard_normal((n, size, size), dtype=np.float32) * _uniform(rng, 0.02, 0.05, n)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _smooth_field(n: int, size: int, rng: np.random.Generator, coarse: int = 6) -> np.ndarray:
    """Random low-frequency field: coarse Gaussian noise, bilinearly upsampled."""
    grid = rng.standard_normal((n, coarse, coarse)).astype(np.float32)
    pos = np.linspace(0, coarse - 1, size, dtype=np.float32)
    low = np.minimum(pos.astype(int), coarse - 2)
    frac = pos - low
    interp = np.zeros((size, coarse), np.float32)
    interp[np.arange(size), low] = 1 - frac
    interp[np.arange(size), low + 1] = frac
    return np.einsum("ij,njk,lk->nil", interp, grid, interp)


def _synth_background(
    n: int, size: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """float32 ``(n, size, size)`` chest-like backgrounds over ``(size, size)`` grids."""
    body = (0.62 + _uniform(rng, -0.08, 0.08, n)) * (1 - 0.45 * (xx**2 + yy**2))
    lungs = np.zeros((n, size, size), np.float32)
    for side in (-1.0, 1.0):
        cx, cy = side * (0.42 + _uniform(rng, -0.05, 0.05, n)), _uniform(rng, -0.12, 0.02, n)
        rx, ry = 0.28 * _uniform(rng, 0.9, 1.1, n), 0.58 * _uniform(rng, 0.9, 1.1, n)
        dist = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
        lungs += 0.5 - 0.5 * np.tanh((dist - 1) * 4)
    ribs = 0.03 * np.sin(yy * _uniform(rng, 14, 20, n) + _uniform(rng, 0, 2 * np.pi, n))
    depth = _uniform(rng, 0.18, 0.30, n)
    return body - lungs * (depth - ribs) + 0.05 * _smooth_field(n, size, rng)


def _synth_lesions(
    labels: np.ndarray, size: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """float32 ``(N, size, size)`` lesion layers: blobs for label 1, rings for label 2."""
    n, px = len(labels), 2.0 / size
    out = np.zeros((n, size, size), np.float32)
    for blob in range(2):
        side = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(np.float32)[:, None, None]
        cx = side * (0.42 + _uniform(rng, -0.14, 0.14, n))
        cy = _uniform(rng, -0.45, 0.30, n)
        dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / px
        contrast = _uniform(rng, 0.06, 0.40, n)
        if blob == 0:
            radius, width = _uniform(rng, 2.5, 6.5, n), _uniform(rng, 0.7, 1.4, n)
            ring = np.exp(-(((dist - radius) / width) ** 2) / 2)
            cavity = 0.35 * np.exp(-((dist / (0.6 * radius)) ** 2) / 2)
            is_ring = (labels == 2)[:, None, None]
            out += contrast * np.where(is_ring, ring - cavity, 0)
        sigma = _uniform(rng, 1.8, 3.8, n)
        second = (rng.random(n) < 0.35) if blob else np.ones(n, bool)
        weight = ((labels == 1) & second)[:, None, None]
        out += contrast * weight * np.exp(-((dist / sigma) ** 2) / 2)
    return out

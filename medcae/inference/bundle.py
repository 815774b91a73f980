"""Model bundles: one self-describing folder per trained model.

Layout::

    bundle.json       format version, resolved config, label names, preprocessing, metrics,
                      OOD threshold, library versions, creation time, sha256 of every file
    cae.pt            CAE state dict (loaded with ``torch.load(weights_only=True)``)
    classifier.npz    scaler and linear-model arrays (loaded with ``allow_pickle=False``)
    MODEL_CARD.md     the model card, rendered from the metadata (:mod:`medcae.inference.card`)

Format 1 bundles (written before model cards) still load: their card is rendered from
``bundle.json`` at load time and says so. Format 3 may also hold figures the card shows
(``reliability.png``); bundles from before calibration and operating points (formats 1 and 2,
or without ``operating_point``) decide by argmax, and their card says so when loaded.

A bundle is written to a temporary sibling folder and renamed into place; ``bundle.json`` is
written last and lists file hashes, so a crash mid-write never leaves a bundle that loads.

Loading cannot be swapped: the folder must hold exactly ``bundle.json`` and the listed files
(plain names, no path separators), and each file is read once, hashed, and loaded from those
same bytes, so a file replaced between the check and the load is never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medcae.inference.card import model_card

FORMAT_VERSION = 3
CARD = "MODEL_CARD.md"
WEIGHT_FILES = ("cae.pt", "classifier.npz")
FILES = (*WEIGHT_FILES, CARD)
#: Figures a bundle may hold beside its card (format 3): PNG bytes the card shows.
FIGURES = ("reliability.png",)
#: The files each readable format version lists.
FILES_OF_VERSION = {1: WEIGHT_FILES, 2: FILES, 3: FILES}
#: The files each format version may list besides those.
OPTIONAL_OF_VERSION = {1: (), 2: (), 3: FIGURES}
#: Keys a bundle sets itself: dropped from the metadata handed to :func:`write_bundle`.
_STAMPED = ("format_version", "created", "versions", "files", "model_card")


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupt, or of an unknown format."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries a bundle depends on."""
    import sklearn

    import medcae

    return {
        "medcae": medcae.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "python": platform.python_version(),
    }


def write_bundle(
    path: str | Path,
    meta: dict[str, Any],
    cae_state: dict[str, torch.Tensor],
    classifier_arrays: dict[str, np.ndarray],
    figures: dict[str, bytes] | None = None,
) -> Path:
    """Write a bundle atomically, replacing any bundle already at ``path``.

    The model card (``MODEL_CARD.md``) is rendered from the stamped metadata by
    :func:`medcae.inference.card.model_card` and hashed with the weights.

    Args:
        path: Destination folder.
        meta: JSON-ready metadata (config, label_names, preprocessing, metrics, and for the
            card ``data_summary`` and ``metrics["test_ci"]``, ...). Keys the bundle sets itself
            (``format_version``, ``created``, ``versions``, ``files``, ``model_card``) are
            replaced, so the metadata of a loaded bundle can be written again.
        cae_state: CAE state dict.
        classifier_arrays: Arrays of :meth:`medcae.model.classifier.LinearHead.to_arrays`.
        figures: PNG bytes by name, each one of :data:`FIGURES` (the card shows them).

    Returns:
        The bundle folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        torch.save({k: v.detach().cpu() for k, v in cae_state.items()}, tmp / "cae.pt")
        np.savez(tmp / "classifier.npz", **classifier_arrays)  # type: ignore[arg-type]
        unknown = sorted(set(figures or {}) - set(FIGURES))
        if unknown:
            raise BundleError(f"figures {unknown} are not bundle figures; expected {FIGURES}")
        for name, data in (figures or {}).items():
            (tmp / name).write_bytes(data)
        full = {
            **{k: v for k, v in meta.items() if k not in _STAMPED},
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": library_versions(),
            "files": {f: _sha256(tmp / f) for f in (*WEIGHT_FILES, *(figures or {}))},
        }
        (tmp / CARD).write_text(model_card(full), encoding="utf-8")
        full["files"][CARD] = _sha256(tmp / CARD)
        (tmp / "bundle.json").write_text(json.dumps(full, indent=2, default=float))
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _swap_into_place(tmp: Path, path: Path) -> None:
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_bundle(
    path: str | Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Load and verify a bundle without unpickling arbitrary objects.

    Args:
        path: Bundle folder.

    Returns:
        ``(meta, cae_state, classifier_arrays)``; ``meta["model_card"]`` holds the text of
        ``MODEL_CARD.md`` (verified against its hash), or for a format 1 bundle a card rendered
        from ``bundle.json`` that says it was.

    Raises:
        BundleError: If the folder, ``bundle.json`` or a file is missing, the folder holds
            other files or ``bundle.json`` lists others, a hash does not match, the card is
            not UTF-8, or the format version is unknown.
    """
    path = Path(path)
    meta_file = path / "bundle.json"
    meta = _read_meta(meta_file)
    version = meta["format_version"]
    listed = meta.get("files")
    optional = [f for f in OPTIONAL_OF_VERSION[version] if isinstance(listed, dict) and f in listed]
    files = (*FILES_OF_VERSION[version], *optional)
    if not isinstance(listed, dict) or sorted(listed) != sorted(files):
        names = sorted(listed) if isinstance(listed, dict) else listed
        also = OPTIONAL_OF_VERSION[version]
        hint = f" (and optionally {list(also)})" if also else ""
        raise BundleError(
            f"{meta_file}: files {names!r}, expected exactly {sorted(FILES_OF_VERSION[version])}"
            f"{hint}"
        )
    present = sorted(p.name for p in path.iterdir())
    missing = sorted(set(files) - set(present))
    if missing:
        raise BundleError(f"{path}: misses files its bundle.json lists: {missing}")
    if present != sorted([*files, "bundle.json"]):
        extra = sorted(set(present) - {*files, "bundle.json"})
        raise BundleError(f"{path}: holds files the bundle does not list: {extra}")
    blobs = {}
    for name in files:
        data = (path / name).read_bytes()  # hashed and loaded from the same bytes
        if hashlib.sha256(data).hexdigest() != listed[name]:
            raise BundleError(f"{path / name}: its sha256 does not match bundle.json")
        blobs[name] = data
    state = torch.load(io.BytesIO(blobs["cae.pt"]), map_location="cpu", weights_only=True)
    with np.load(io.BytesIO(blobs["classifier.npz"]), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta["model_card"] = _card_text(path, blobs.get(CARD), meta)
    return meta, state, arrays


def read_figure(path: str | Path, name: str) -> bytes:
    """A bundle's figure (:data:`FIGURES`), verified against ``bundle.json``.

    Raises:
        BundleError: ``name`` is not a figure the bundle lists, or its hash does not match.
    """
    path = Path(path)
    meta = _read_meta(path / "bundle.json")
    listed = meta.get("files") or {}
    if name not in FIGURES or name not in listed:
        raise BundleError(f"{path}: holds no figure {name!r}")
    data = (path / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != listed[name]:
        raise BundleError(f"{path / name}: its sha256 does not match bundle.json")
    return data


def _read_meta(meta_file: Path) -> dict[str, Any]:
    """``bundle.json`` as a dict of a readable format version."""
    if not meta_file.is_file():
        raise BundleError(f"not a model bundle: {meta_file} does not exist")
    try:
        meta = json.loads(meta_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise BundleError(f"{meta_file}: not valid JSON ({err})") from err
    got = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
    if type(got) is not int or got not in FILES_OF_VERSION:
        newer = type(got) is int and got > FORMAT_VERSION
        hint = "; it was written by a newer medcae, upgrade to load it" if newer else ""
        known = sorted(FILES_OF_VERSION)
        raise BundleError(f"{meta_file}: format_version {got!r}, expected one of {known}{hint}")
    return meta


def _card_text(path: Path, blob: bytes | None, meta: dict[str, Any]) -> str:
    """The verified card's text, or a card rendered from ``meta`` for a format 1 bundle."""
    from medcae.inference.card import UNCALIBRATED

    if blob is None:
        return model_card(meta)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BundleError(f"{path / CARD}: not UTF-8 text ({err})") from err
    if "operating_point" not in meta and UNCALIBRATED not in text:
        text += f"\n> Note added at load time: {UNCALIBRATED}\n"
    return text

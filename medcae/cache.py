"""On-disk cache of backbone features, one entry per (data set, backbone, taps, resolution).

Layout of an entry ``<root>/<key>/``::

    meta.json              what was extracted: data set fingerprint, backbone config, shapes
    <part>.maps.npy        float32 (N, C, h, w) tap feature maps
    <part>.final.npy       float32 (N, C_final) pooled last-layer features
    <part>.labels.npy      int64 (N,) labels (absent for unlabeled parts)

``<part>`` is ``train``, ``val``, ``test`` or ``unlabeled``. Arrays are plain ``.npy`` files,
memory-mapped on load, so re-training the CAE or the classifier never recomputes the backbone
and never needs the whole cache in RAM. An entry is written to a temporary folder and renamed
into place, so a crash never leaves a half entry that loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: maps stored as float32
ARRAYS = ("maps", "final", "labels")


def default_cache_dir() -> Path:
    """``$MEDCAE_CACHE_DIR`` or ``~/.cache/medcae/features``."""
    env = os.environ.get("MEDCAE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "medcae" / "features"


def cache_key(fingerprints: dict[str, str], backbone: dict[str, Any]) -> str:
    """Stable key of one cache entry.

    Args:
        fingerprints: Content fingerprints of the image sources, e.g. ``{"labeled": sha1}``.
        backbone: Resolved backbone config (name, taps, resolution, weights).
    """
    blob = json.dumps(
        {"v": CACHE_VERSION, "data": fingerprints, "backbone": backbone}, sort_keys=True
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


class FeatureCache:
    """A folder of cache entries.

    Args:
        root: Cache folder; created when first written.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_cache_dir()

    def path(self, key: str) -> Path:
        """Folder of one entry."""
        return self.root / key

    def load(self, key: str) -> dict[str, dict[str, np.ndarray]] | None:
        """Memory-map a complete entry, or return ``None`` on a miss."""
        folder = self.path(key)
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        parts: dict[str, dict[str, np.ndarray]] = {}
        for part in meta["parts"]:
            parts[part] = {
                a: np.load(folder / f"{part}.{a}.npy", mmap_mode="r")
                for a in ARRAYS
                if (folder / f"{part}.{a}.npy").is_file()
            }
        return parts

    def meta(self, key: str) -> dict[str, Any]:
        """The ``meta.json`` of an existing entry."""
        return json.loads((self.path(key) / "meta.json").read_text())

    def save(self, key: str, parts: dict[str, dict[str, np.ndarray]], meta: dict[str, Any]) -> Path:
        """Write an entry atomically.

        Args:
            key: Entry key from :func:`cache_key`.
            parts: ``{part: {"maps": ..., "final": ..., "labels"?: ...}}``.
            meta: Extra JSON-ready description stored in ``meta.json``.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            for part, arrays in parts.items():
                for name, arr in arrays.items():
                    np.save(tmp / f"{part}.{name}.npy", arr)
            shapes = {p: {n: list(a.shape) for n, a in arrs.items()} for p, arrs in parts.items()}
            full = {**meta, "version": CACHE_VERSION, "parts": list(parts), "shapes": shapes}
            (tmp / "meta.json").write_text(json.dumps(full, indent=2))
            final = self.path(key)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("feature cache: wrote %s", final)
        return final

"""MedMNIST: the label catalogue, data set names, and downloading a named ``.npz``."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from medcae.data.decode import DataError

logger = logging.getLogger(__name__)

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}.npz?download=1"

_ORGAN_LABELS = [
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
]
#: MedMNIST 2D single-label data sets and their label names (from MedMNIST's ``INFO``).
MEDMNIST: dict[str, list[str]] = {
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "retinamnist": ["0", "1", "2", "3", "4"],
    "breastmnist": ["malignant", "normal, benign"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "tissuemnist": [
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ],
    "organamnist": _ORGAN_LABELS,
    "organcmnist": _ORGAN_LABELS,
    "organsmnist": _ORGAN_LABELS,
    # multi-label: 14 findings per image, labels (N, 14) of 0/1 (medcae.data.findings)
    "chestmnist": [
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ],
}


def _medmnist_base(name: str) -> str:
    """``"pneumoniamnist_64"`` -> ``"pneumoniamnist"`` (other names are returned unchanged)."""
    match = re.fullmatch(r"([a-z]+?)(?:_(?:28|64|128|224))?", name)
    return match.group(1) if match else name


def _fetch_medmnist(name: str, data_dir: str | None, download: bool) -> Path:
    """Path of ``<data_dir>/<name>.npz``, downloaded from ``MEDMNIST_URL`` when missing."""
    root = data_dir or os.environ.get("MEDCAE_DATA_DIR") or Path.home() / ".medmnist"
    path = Path(root).expanduser() / f"{name}.npz"
    if path.exists():
        return path
    url = MEDMNIST_URL.format(name=name)
    if not download:
        raise DataError(
            f"data set {name!r} not found at {path} and download=False; "
            "put the .npz there or pass a path"
        )
    try:
        download_file(url, path)
    except DataError as exc:
        raise DataError(
            f"data set {name!r} not found at {path} and download from {url} "
            f"failed: {exc}; put the .npz there or pass a path"
        ) from exc
    return path


def download_file(url: str, dest: str | Path, md5: str | None = None, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest`` atomically (via ``dest + ".part"``).

    Args:
        url: Any URL urllib can open (``https://``, ``file://``, ...).
        dest: Destination file; parent folders are created.
        md5: Expected MD5 hex digest, or None to skip the check.
        timeout: Socket timeout in seconds.

    Returns:
        ``dest`` as a Path.

    Raises:
        DataError: The download failed or the MD5 did not match (``.part`` is removed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    logger.info("downloading %s to %s", url, dest)
    try:
        digest = _stream_to(url, part, timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        part.unlink(missing_ok=True)
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DataError(f"download of {url} failed: {reason}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if md5 is not None and digest != md5.lower():
        part.unlink(missing_ok=True)
        raise DataError(f"MD5 mismatch for {url}: expected {md5.lower()}, got {digest}")
    os.replace(part, dest)
    return dest


def _stream_to(url: str, part: Path, timeout: float) -> str:
    """Copy the URL's content into ``part`` in 1 MiB chunks; return its MD5 hex digest."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as fh:
        while chunk := response.read(1 << 20):
            fh.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()

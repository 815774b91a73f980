"""Streaming ingest at scale: images -> Ray Data backbone stage -> feature store on storage.

The image set may be far larger than RAM or the object store: folders are read lazily with
``read_binary_files``, decoded and resized in a task stage, run through the frozen backbone
on an actor pool, and written as Parquet (``split=train`` / ``split=val``) under the run's
storage path. Ray Data's streaming executor keeps only a bounded window of blocks in flight.
Training then reads the feature store lazily, so resuming a run never re-extracts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray

from medcae.config import BackboneConfig
from medcae.data import (
    IMAGE_SUFFIXES,
    DataError,
    Dataset,
    ImageDecodeError,
    _image_files,
    _resize,
    decode_image,
    load_dataset,
    load_unlabeled,
)
from medcae.distributed.extract import _asdict, backbone_stage

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SKIPPED_DIR = "_skipped"
FORMAT_VERSION = 1


class FeatureStoreMismatch(DataError):
    """The run's feature store was built from other data or another backbone."""


@dataclass(frozen=True)
class ImageSource:
    """Images to extract, as a lazy Ray Dataset with columns ``image`` and ``split``.

    Attributes:
        dataset: Lazy dataset; ``image`` is uint8 ``(side, side)`` (or ``(side, side, 3)``).
        key: Fingerprint of the source (files, sizes and mtimes, or pixel content).
        count: Images listed (before undecodable ones are skipped).
        description: For logs.
    """

    dataset: ray.data.Dataset
    key: str
    count: int
    description: str


@dataclass(frozen=True)
class FeatureStore:
    """Where a run's feature maps live and what they are.

    Attributes:
        uri: Folder (local path or pyarrow URI) holding ``split=train`` and ``split=val``.
        rows: Rows per split.
        shape: ``(C, h, w)`` of one feature map.
        mean: Per-channel mean of the training maps.
        std: Per-channel std of the training maps.
        skipped: ``(file, reason)`` for images that could not be decoded.
        reused: True when an earlier attempt's complete store was found and used.
    """

    uri: str
    rows: dict[str, int]
    shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    skipped: list[tuple[str, str]]
    reused: bool = False

    def split(self, name: str, materialize: bool = False) -> ray.data.Dataset:
        """Dataset of one split with the single column ``maps``.

        Lazy (re-read from storage each epoch, memory bounded) unless ``materialize``, which
        reads it once into the object store (fast epochs for stores that fit).
        """
        ds = ray.data.read_parquet(f"{self.uri}/split={name}", file_extensions=["parquet"])
        ds = ds.select_columns(["maps"])
        return ds.materialize() if materialize else ds

    @property
    def nbytes(self) -> int:
        """Bytes of all feature maps as float32."""
        return sum(self.rows.values()) * int(np.prod(self.shape)) * 4

    def should_materialize(self, policy: str = "auto", share: float = 0.25) -> bool:
        """``always``/``never``, or ``auto``: when the maps take under ``share`` of the
        cluster's object store."""
        if policy in ("always", "never"):
            return policy == "always"
        store = ray.cluster_resources().get("object_store_memory", 0)
        return self.nbytes < share * store


def storage_uri(path: str | os.PathLike) -> str:
    """Absolute local path, or the URI unchanged (``s3://``, ``gs://``, ``file://``...)."""
    text = str(path)
    return text if "://" in text else os.path.abspath(text)


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def _read_text(uri: str) -> str | None:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read().decode()


def _write_text(uri: str, text: str) -> None:
    """Write atomically where the filesystem allows it (local: temp file + rename)."""
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as fh:
        fh.write(text.encode())
    fs.move(tmp, path)


# --------------------------------------------------------------------------- sources


def _to_color(image: np.ndarray, color: str) -> np.ndarray:
    if color == "rgb":
        return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3:  # ITU-R 601 luma
        return (image[..., :3] @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    return image


def is_val_path(path: str, val_fraction: float) -> bool:
    """Stable train/val assignment of a file from a hash of its path."""
    return (zlib.crc32(path.encode()) % 10_000) < val_fraction * 10_000


def decode_batch(
    batch: dict[str, np.ndarray], side: int, color: str, val_fraction: float, skipped_uri: str
) -> dict[str, np.ndarray]:
    """Ray Data task: decode, convert and resize a batch of files; skip undecodable ones.

    Skipped files are logged and recorded as one JSON file per batch under ``skipped_uri``
    so the driver can report them all at the end.
    """
    images, splits, skipped = [], [], []
    for data, path in zip(batch["bytes"], batch["path"]):
        try:
            image = decode_image(data, str(path))
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", path, exc)
            skipped.append((str(path), str(exc)))
            continue
        images.append(_resize(_to_color(image, color), side))
        splits.append("val" if is_val_path(str(path), val_fraction) else "train")
    if skipped:
        _write_text(f"{skipped_uri}/{uuid.uuid4().hex}.json", json.dumps(skipped))
    shape = (0, side, side) if color == "gray" else (0, side, side, 3)
    return {
        "image": np.stack(images) if images else np.zeros(shape, np.uint8),
        "split": np.array(splits, dtype=object),
    }


def folder_source(
    root: str | os.PathLike,
    side: int,
    skipped_uri: str,
    color: str = "gray",
    val_fraction: float = 0.1,
    files_per_block: int = 0,
    limit: int | None = None,
    block_bytes: int = 16 * 2**20,
) -> ImageSource:
    """A folder of image/DICOM files (recursively), read lazily by Ray Data.

    Files are listed on the driver (names only); Ray Data reads the bytes in blocks of
    ``files_per_block`` files (0: as many as make about ``block_bytes``, at most 64), so the
    pixels never all sit in memory or the object store.
    """
    root = Path(root)
    files = _image_files(root)
    if limit is not None and len(files) > limit:
        files = files[:: -(-len(files) // limit)][:limit]
    if not files:
        raise DataError(f"{root}: no image files found (expected {sorted(IMAGE_SUFFIXES)})")
    h = hashlib.sha1(f"folder:{color}:{val_fraction}".encode())
    total = 0
    for f in files:
        st = f.stat()
        total += st.st_size
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    if files_per_block <= 0:
        files_per_block = int(np.clip(block_bytes * len(files) // max(total, 1), 1, 64))
    ds = ray.data.read_binary_files(
        [str(f) for f in files],
        include_paths=True,
        override_num_blocks=max(1, -(-len(files) // files_per_block)),
    ).map_batches(
        decode_batch,
        fn_kwargs={
            "side": side,
            "color": color,
            "val_fraction": val_fraction,
            "skipped_uri": skipped_uri,
        },
        batch_size=files_per_block,
        batch_format="numpy",
    )
    return ImageSource(ds, h.hexdigest(), len(files), f"{len(files)} files under {root}")


def array_source(
    train: np.ndarray, val: np.ndarray, key: str, description: str, rows_per_block: int = 512
) -> ImageSource:
    """In-memory images (MedMNIST ``.npz``, Parquet, the demo set) as a Ray Dataset."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    blocks = []
    for split, images in (("train", train), ("val", val)):
        for i in range(0, len(images), rows_per_block):
            part = np.ascontiguousarray(images[i : i + rows_per_block])
            blocks.append(
                pa.table(
                    {
                        "image": ArrowTensorArray.from_numpy(part),
                        "split": pa.array([split] * len(part)),
                    }
                )
            )
    n = len(train) + len(val)
    return ImageSource(ray.data.from_arrow(blocks), key, n, description)


def check_source(
    data: str, unlabeled: str | None = None, data_dir: str | None = None
) -> tuple[str, Dataset | None]:
    """Validate ``--data``/``--unlabeled`` without Ray (so bad input fails before it starts).

    Returns:
        ``(description, dataset)``: a one-line description of what will be read, and the
        loaded data set (``None`` for a folder, which is streamed) to pass to
        :func:`open_source`.

    Raises:
        DataError: No images in the folder, a missing file, an unknown name, bad arrays.
    """
    if Path(data).is_dir() and unlabeled is None:
        n = len(_image_files(Path(data)))
        if n == 0:
            raise DataError(f"{data}: no image files found (expected {sorted(IMAGE_SUFFIXES)})")
        return f"{n} image files under {data}", None
    ds = load_dataset(data, data_dir)
    if unlabeled is not None:
        load_unlabeled(unlabeled, data_dir=data_dir)
    return ds.name, ds


def open_source(
    data: str,
    side: int,
    skipped_uri: str,
    unlabeled: str | None = None,
    data_dir: str | None = None,
    color: str = "gray",
    val_fraction: float = 0.1,
    limit: dict[str, int] | None = None,
    dataset: Dataset | None = None,
) -> ImageSource:
    """Resolve ``--data`` (and ``--unlabeled``) to an :class:`ImageSource`.

    A folder streams from disk; labels are not needed (the CAE is unsupervised). Anything
    else goes through :func:`medcae.data.load_dataset`: its ``train`` split (or the
    ``unlabeled`` images) trains the CAE and its ``val`` split measures reconstruction.
    ``limit`` (``{"train": n, "val": m}``) keeps a seeded subset, for smoke tests;
    ``dataset`` is ``data`` already loaded (by :func:`check_source`).
    """
    if Path(data).is_dir() and unlabeled is None:
        n = None if limit is None else sum(limit.values())
        return folder_source(data, side, skipped_uri, color, val_fraction, limit=n)
    ds = dataset or load_dataset(data, data_dir)
    if limit is not None:
        from medcae.distributed.pipeline import subsample

        ds = subsample(ds, limit)
    train = ds.splits["train"].images
    key = f"{ds.fingerprint()}:{color}"
    if unlabeled is not None:
        unl, _ = load_unlabeled(unlabeled, data_dir=data_dir)
        train = unl.images
        key += ":" + hashlib.sha1(np.ascontiguousarray(train).tobytes()).hexdigest()
    return array_source(
        train, ds.splits["val"].images, hashlib.sha1(key.encode()).hexdigest(), ds.name
    )


# --------------------------------------------------------------------------- the store


def _store_key(source: ImageSource, backbone: BackboneConfig) -> str:
    payload = json.dumps({"source": source.key, "backbone": _asdict(backbone)}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()


def build_feature_store(
    source: ImageSource,
    backbone: BackboneConfig,
    uri: str,
    batch_size: int = 64,
    actors: int = 1,
    use_gpu: bool = False,
    threads: int = 0,
) -> FeatureStore:
    """Extract ``source`` through the backbone actor pool into a Parquet store at ``uri``.

    If ``uri`` already holds a complete store (its manifest) for the same source and
    backbone, it is reused as is. A store left incomplete by a killed run is deleted and
    rebuilt; one built from different data raises :class:`FeatureStoreMismatch`.
    """
    key = _store_key(source, backbone)
    manifest = _read_text(f"{uri}/{MANIFEST}")
    if manifest is not None:
        meta = json.loads(manifest)
        if meta.get("key") != key:
            raise FeatureStoreMismatch(
                f"{uri} holds features of other data or another backbone "
                f"(stored key {meta.get('key')}, this run {key}); use another --name "
                "or --storage-path"
            )
        log.info("feature store complete at %s: reusing %s rows", uri, meta["rows"])
        return _from_meta(uri, meta, reused=True)
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        log.info("feature store at %s incomplete (no manifest): rebuilding", uri)
        fs.delete_dir_contents(path)

    t0 = time.perf_counter()
    feats = backbone_stage(
        source.dataset,
        backbone,
        batch_size,
        actors,
        use_gpu,
        threads,
        outputs=("maps",),
        timestamps=False,
    )
    log.info("extracting %s with %s into %s", source.description, backbone.name, uri)
    feats.write_parquet(uri, partition_cols=["split"], min_rows_per_file=1024)
    secs = time.perf_counter() - t0
    rows, shape, mean, std = _scan(uri)
    skipped = _collect_skipped(f"{uri}/{SKIPPED_DIR}")
    total = sum(rows.values())
    log.info(
        "extracted %d images (%d skipped) in %.1fs, %.1f img/s",
        total,
        len(skipped),
        secs,
        total / max(secs, 1e-9),
    )
    meta = {
        "version": FORMAT_VERSION,
        "key": key,
        "rows": rows,
        "shape": list(shape),
        "mean": mean,
        "std": std,
        "skipped": skipped,
        "backbone": _asdict(backbone),
        "source": source.description,
        "extract_s": secs,
    }
    _write_text(f"{uri}/{MANIFEST}", json.dumps(meta, indent=1))
    return _from_meta(uri, meta, reused=False)


def _from_meta(uri: str, meta: dict[str, Any], reused: bool) -> FeatureStore:
    return FeatureStore(
        uri,
        {k: int(v) for k, v in meta["rows"].items()},
        tuple(meta["shape"]),  # type: ignore[arg-type]
        meta["mean"],
        meta["std"],
        [tuple(s) for s in meta["skipped"]],  # type: ignore[misc]
        reused,
    )


def _scan(uri: str) -> tuple[dict[str, int], tuple[int, ...], list[float], list[float]]:
    """Rows per split and per-channel mean/std of the training maps, in one streamed pass."""
    rows = {"train": 0, "val": 0}
    s = ss = 0.0
    n = 0
    shape: tuple[int, ...] = ()
    ds = ray.data.read_parquet(uri, file_extensions=["parquet"])
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        is_train = batch["split"] == "train"
        rows["train"] += int(is_train.sum())
        rows["val"] += int((~is_train).sum())
        if not is_train.any():
            continue
        m = batch["maps"][is_train].astype(np.float64)
        shape = m.shape[1:]
        s = s + m.sum(axis=(0, 2, 3))
        ss = ss + (m**2).sum(axis=(0, 2, 3))
        n += m.shape[0] * m.shape[2] * m.shape[3]
    if rows["train"] == 0:
        raise DataError(f"no training images could be decoded (feature store {uri})")
    mean = np.asarray(s) / n
    std = np.sqrt(np.maximum(np.asarray(ss) / n - mean**2, 0.0))
    return rows, shape, mean.tolist(), std.tolist()


def _collect_skipped(uri: str) -> list[tuple[str, str]]:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    out: list[tuple[str, str]] = []
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.path.endswith(".json"):
            with fs.open_input_stream(info.path) as fh:
                out += [tuple(x) for x in json.loads(fh.read().decode())]  # type: ignore[misc]
    return sorted(out)

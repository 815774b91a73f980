"""The feature store: rows of files -> Ray Data decode -> backbone actor pool -> Parquet.

One road for every source and every scale. The driver holds only the listing (names, labels,
splits, and the encoded bytes of small in-memory sets). Ray Data tasks read and decode files
and prepare each image once (:func:`medcae.data.preprocess.prepare_image`); the frozen backbone
runs as an actor-pool ``map_batches`` stage; the maps are written as Parquet, partitioned by
split, under ``<root>/<key>/``.

The key covers the image content (a hash of every file's bytes, with its label and split),
the whole backbone config including the sha256 of its weights, and the preprocessing version.
An entry is written to a private temporary folder and renamed into place with its manifest,
so a reader never sees half a store; on a local or NFS path a lock file makes a second run
that wants the same entry wait, then reuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from medcae.config import BackboneConfig
from medcae.data import DataError, ImageDecodeError, Rows, decode_image
from medcae.data.preprocess import PREPARE_VERSION, prepare_image
from medcae.data.shards import ShardFile, list_files
from medcae.distributed.extract import backbone_dict, backbone_stage
from medcae.distributed.runtime import Progress
from medcae.model.backbones import get_spec, weights_sha256
from medcae.model.runtimes import resolve_runtime

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
SKIPPED_DIR = "_skipped"
FORMAT_VERSION = 2
ROW_COLUMNS = ("id", "split", "label", "path", "data")
BLOCK_BYTES = 8 * 2**20
FILES_PER_BLOCK = (16, 1024)
#: Files are hashed by driver threads while their total size (estimated from the first
#: :data:`HASH_PROBE_FILES`) stays under this: 20,000 small PNGs take 0.4 s there against 4.8 s
#: in a Ray Data job (its start-up and tasks); gigabytes are better read near the data.
LOCAL_HASH_BYTES = 2 * 2**30
HASH_PROBE_FILES = 256


class StoreBusy(DataError):
    """Another run holds the lock of the entry this run needs for longer than allowed."""


@dataclass(frozen=True)
class FeatureStore:
    """One complete store entry and what it holds.

    Attributes:
        uri: The entry folder (local path or pyarrow URI), with ``split=<name>/`` inside.
        key: Its key (content, backbone, preprocessing).
        rows: Rows per split (``train``, ``val``, ``test``, ``unlabeled``; absent when empty).
        shape: ``(C, h, w)`` of one feature map.
        mean: Per-channel mean of the CAE's training maps (``train`` and ``unlabeled``).
        std: Per-channel std of the same maps.
        label_names: Class names of the labeled rows.
        skipped: ``(file, reason)`` for every image that could not be read or decoded.
        reused: True when the entry existed (or another run finished it) before this run.
    """

    uri: str
    key: str
    rows: dict[str, int]
    shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    label_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: bool = False
    runtime: dict[str, str] = field(default_factory=dict)

    def split(
        self, *names: str, columns: Sequence[str] = ("maps",), materialize: bool = False
    ) -> ray.data.Dataset:
        """A lazy dataset of the named splits (those that hold rows), with ``columns``
        (any of ``id``, ``split``, ``label``, ``maps``, ``final``).

        ``materialize`` reads it once into the object store (fast epochs for stores that fit).
        """
        paths = [f"{self.uri}/split={n}" for n in names if self.rows.get(n)]
        if not paths:
            raise DataError(f"feature store {self.uri} holds no rows of split(s) {list(names)}")
        ds = ray.data.read_parquet(paths, file_extensions=["parquet"])
        ds = ds.select_columns(list(columns))
        return ds.materialize() if materialize else ds

    def files(self, *names: str) -> tuple[ShardFile, ...]:
        """The Parquet files of the named splits with their row counts (for workers that
        stream their shard straight from storage, :mod:`medcae.data.shards`)."""
        return tuple(list_files(self.uri, [n for n in names if self.rows.get(n)]))

    def arrays(
        self, name: str, columns: Sequence[str] = ("id", "label", "maps", "final")
    ) -> dict[str, np.ndarray]:
        """One split read into memory (for sets that fit), rows sorted by ``id``.

        Returns:
            ``{column: array}``; ``maps`` is ``(N, C, h, w)`` float32, ``final`` ``(N, D)``.
        """
        cols = list(dict.fromkeys(["id", *columns]))
        if not self.rows.get(name):
            return {c: np.zeros((0, *self._shape_of(c)), self._dtype_of(c)) for c in columns}
        fs, path = _fs(self.uri)
        table = pq.read_table(f"{path}/split={name}", columns=cols, filesystem=fs)
        table = table.sort_by("id")
        return {c: _to_numpy(table.column(c)) for c in columns}

    def _shape_of(self, column: str) -> tuple[int, ...]:
        return tuple(self.shape) if column == "maps" else ()

    def _dtype_of(self, column: str) -> Any:
        return {"maps": np.float32, "final": np.float32, "label": np.int64}.get(column, object)

    def count(self, *names: str) -> int:
        """Rows in the named splits."""
        return sum(self.rows.get(n, 0) for n in names)

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


def _to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    arr = column.combine_chunks()
    if isinstance(arr.type, pa.ExtensionType):  # Ray's tensor column
        return np.asarray(arr.to_numpy())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return np.asarray(arr.to_pylist(), dtype=object)
    return arr.to_numpy(zero_copy_only=False)


def load_store(uri: str) -> FeatureStore:
    """Open a complete store entry by its folder.

    Raises:
        DataError: The folder holds no manifest (not a store, or not finished).
    """
    store = _load(storage_uri(uri), reused=True)
    if store is None:
        raise DataError(f"{uri}: not a complete feature store (no {MANIFEST})")
    return store


# --------------------------------------------------------------------------- storage helpers


def storage_uri(path: str | os.PathLike) -> str:
    """Absolute local path, or the URI unchanged (``s3://``, ``gs://``, ``file://``...)."""
    text = str(path)
    return text if "://" in text else os.path.abspath(text)


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), uri


def read_text(uri: str) -> str | None:
    """A small text file's content, or None if it does not exist."""
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return fh.read().decode()


def write_text(uri: str, text: str) -> None:
    """Write a small text file atomically where the filesystem allows (temp file + rename)."""
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as fh:
        fh.write(text.encode())
    fs.move(tmp, path)


def read_bytes(path: str) -> bytes:
    """A file's bytes, from a local path or any pyarrow URI."""
    if "://" not in path:
        with open(path, "rb") as fh:
            return fh.read()
    fs, p = _fs(path)
    with fs.open_input_stream(p) as fh:
        return fh.read()


@contextlib.contextmanager
def entry_lock(root: str, key: str, timeout_s: float) -> Iterator[None]:
    """Hold ``<root>/.<key>.lock`` (local and NFS paths); other URIs rely on atomic renames.

    Raises:
        StoreBusy: The lock was not free within ``timeout_s`` (the message names the holder).
    """
    if "://" in root:
        yield
        return
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, f".{key}.lock")
    with open(path, "a+") as fh:
        deadline, said = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    fh.seek(0)
                    log.info(
                        "feature store %s/%s is being built by %s: waiting",
                        root,
                        key,
                        fh.read().strip() or "another run",
                    )
                    said = True
                if time.monotonic() > deadline:
                    raise StoreBusy(
                        f"feature store entry {root}/{key} stayed locked by another run for "
                        f"{timeout_s:.0f}s ({path}); wait for it or use another --feature-store"
                    ) from None
                time.sleep(0.5)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- keys


def rows_table(rows: Sequence[Rows]) -> pa.Table:
    """One table of every source's rows, with all of :data:`ROW_COLUMNS` (nulls filled)."""
    tables = []
    for r in rows:
        t = r.table
        for name, typ in (("path", pa.string()), ("data", pa.binary())):
            if name not in t.column_names:
                t = t.append_column(name, pa.nulls(len(t), typ))
        tables.append(t.select(list(ROW_COLUMNS)))
    return pa.concat_tables(tables)


def hash_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data task: sha1 of each row's bytes (``data`` inline, else the file at ``path``),
    and how many bytes that was."""
    out, sizes = [], []
    for path, data in zip(batch["path"], batch["data"]):
        try:
            blob = data if data is not None else read_bytes(str(path))
            out.append(hashlib.sha1(blob).hexdigest())
            sizes.append(len(blob))
        except OSError as exc:
            out.append(f"unreadable:{type(exc).__name__}")
            sizes.append(0)
    return {
        "sha1": np.array(out, dtype=object),
        "split": batch["split"],
        "label": batch["label"],
        "bytes": np.array(sizes, dtype=np.int64),
    }


def _hash_locally(table: pa.Table) -> list[dict[str, np.ndarray]]:
    """:func:`hash_batch` over ``table`` by driver threads (file reads and sha1 release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ROW_COLUMNS[1:]}
    step = 64
    chunks = ({c: v[i : i + step] for c, v in cols.items()} for i in range(0, len(table), step))
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(hash_batch, chunks))


def content_key(table: pa.Table, blocks: int) -> str:
    """Hash of every row's bytes with its split and label; order and file names do not count.

    Inline bytes are hashed on the driver, and so are files while their estimated total size
    stays under :data:`LOCAL_HASH_BYTES`; more is hashed by Ray Data tasks, near the data.
    """
    table = table.select(["path", "data", "split", "label"])
    probe = table.slice(0, HASH_PROBE_FILES)
    parts = _hash_locally(probe)
    rest = table.slice(len(probe))
    probed = sum(int(p["bytes"].sum()) for p in parts)
    if len(rest) and probed / max(1, len(probe)) * len(table) <= LOCAL_HASH_BYTES:
        parts += _hash_locally(rest)
    elif len(rest):
        ds = _rows_dataset(rest, blocks).map_batches(
            hash_batch, batch_format="numpy", batch_size=None
        )
        parts += list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    digests = [
        (str(r["sha1"]), str(r["split"]), int(r["label"])) for b in parts for r in _records(b)
    ]
    h = hashlib.sha256()
    for row in sorted(digests):
        h.update(repr(row).encode())
    return h.hexdigest()


def _records(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    keys = list(batch)
    for i in range(len(batch[keys[0]])):
        yield {k: batch[k][i] for k in keys}


def backbone_identity(backbone: BackboneConfig) -> dict[str, Any]:
    """The backbone as a store key sees it: config, resolved taps, weights sha256."""
    taps = list(backbone.taps) or [get_spec(backbone.name).default_tap]
    return {
        **backbone_dict(backbone),
        "taps": taps,
        "weights_sha256": weights_sha256(backbone.name, backbone.weights),
        "prepare_version": PREPARE_VERSION,
        "format_version": FORMAT_VERSION,
    }


def store_key(content: str, backbone: BackboneConfig) -> str:
    """Key of a store entry: image content x backbone identity."""
    blob = json.dumps({"content": content, "backbone": backbone_identity(backbone)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- the stages


def decode_batch(
    batch: dict[str, np.ndarray], resolution: int, skipped_uri: str
) -> dict[str, np.ndarray]:
    """Ray Data task: read, decode and prepare a batch of rows; skip undecodable ones.

    Skipped rows are logged and recorded, one JSON file per batch, under ``skipped_uri``, so
    the driver lists them all at the end.
    """
    keep, images, skipped = [], [], []
    for i, (path, data, rid) in enumerate(zip(batch["path"], batch["data"], batch["id"])):
        where = str(path) if path is not None else str(rid)
        try:
            blob = data if data is not None else read_bytes(where)
            images.append(
                prepare_image(decode_image(blob, where, reduce_to=resolution), resolution)
            )
            keep.append(i)
        except (ImageDecodeError, OSError, ValueError) as exc:
            log.warning("skipping %s: %s", where, exc)
            skipped.append((where, str(exc)))
    if skipped:
        write_text(f"{skipped_uri}/{uuid.uuid4().hex}.json", json.dumps(skipped))
    idx = np.asarray(keep, dtype=np.int64)
    return {
        "id": np.asarray(batch["id"], dtype=object)[idx],
        "split": np.asarray(batch["split"], dtype=object)[idx],
        "label": np.asarray(batch["label"], dtype=np.int64)[idx],
        "image": np.stack(images) if images else np.zeros((0, resolution, resolution, 3), np.uint8),
    }


def _rows_dataset(table: pa.Table, blocks: int) -> ray.data.Dataset:
    step = max(1, -(-len(table) // max(1, blocks)))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)])


def _block_count(table: pa.Table) -> int:
    """Blocks of about :data:`BLOCK_BYTES` of inline bytes, and for files enough blocks to
    keep the cluster's CPUs busy (4 per CPU) within 16-256 files each, at least one.

    Each block is a task: 32-file blocks of 20,000 small files spent more time starting tasks
    than reading (``bench/extract.py``).
    """
    inline = table.column("data").nbytes if "data" in table.column_names else 0
    files = len(table) - table.column("path").null_count
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    by_files = max(-(-files // FILES_PER_BLOCK[1]), min(-(-files // FILES_PER_BLOCK[0]), 4 * cpus))
    return max(1, -(-inline // BLOCK_BYTES), by_files)


def decoded_images(table: pa.Table, resolution: int, skipped_uri: str) -> ray.data.Dataset:
    """The rows of ``table`` (:func:`rows_table`) read, decoded and prepared by Ray Data tasks.

    The one read-and-decode stage of the feature store and of batch prediction: columns
    ``id``, ``split``, ``label`` and ``image`` (uint8 ``(B, resolution, resolution, 3)``).
    Undecodable rows are left out and recorded under ``skipped_uri`` (:func:`collect_skipped`).
    """
    return _rows_dataset(table, _block_count(table)).map_batches(
        decode_batch,
        fn_kwargs={"resolution": resolution, "skipped_uri": skipped_uri},
        batch_size=None,
        batch_format="numpy",
    )


@dataclass(frozen=True)
class ExtractOptions:
    """How the backbone stage runs.

    Attributes:
        batch_size: Images per backbone batch.
        actors: Size of the backbone actor pool.
        use_gpu: One GPU per actor.
        threads: CPUs (and torch threads) per actor; 0 sizes it from the cluster's nodes.
        lock_timeout_s: How long to wait for another run building the same entry.
        runtime: Inference runtime of the backbone (:mod:`medcae.model.runtimes`).
    """

    batch_size: int = 64
    actors: int = 1
    use_gpu: bool = False
    threads: int = 0
    lock_timeout_s: float = 3600.0
    runtime: str = "auto"


def build_store(
    rows: Sequence[Rows],
    backbone: BackboneConfig,
    root: str,
    opts: ExtractOptions | None = None,
) -> FeatureStore:
    """The complete store entry for ``rows`` under ``backbone``: reused, or built now.

    Args:
        rows: Listings from :func:`medcae.data.list_rows` / ``list_unlabeled_rows``; the first
            one's label names are the store's.
        backbone: Backbone configuration.
        root: Store root (local path, NFS, or a pyarrow URI); entries are ``<root>/<key>``.
        opts: Backbone stage and locking options.
    """
    root = storage_uri(root)
    opts = opts or ExtractOptions()
    table = rows_table(rows)
    t0 = time.perf_counter()
    key = store_key(content_key(table, _block_count(table)), backbone)
    log.info(
        "feature store key %s (%d rows hashed in %.1fs)", key, len(table), time.perf_counter() - t0
    )
    entry = f"{root}/{key}"
    found = _load(entry, reused=True)
    if found is not None:
        return found
    with entry_lock(root, key, opts.lock_timeout_s):
        found = _load(entry, reused=True)  # another run finished it while we waited
        if found is not None:
            return found
        _remove_stale(root, key)
        tmp = f"{root}/.tmp-{key}-{uuid.uuid4().hex[:8]}"
        try:
            meta = _extract(table, rows[0].label_names, backbone, tmp, opts)
            meta |= {"key": key, "sources": [r.name for r in rows]}
            write_text(f"{tmp}/{MANIFEST}", json.dumps(meta, indent=1))
            return _publish(tmp, entry)
        except BaseException:
            _remove(tmp)
            raise


def _extract(
    table: pa.Table,
    label_names: list[str],
    backbone: BackboneConfig,
    tmp: str,
    opts: ExtractOptions,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    ds = decoded_images(table, backbone.resolution, f"{tmp}/{SKIPPED_DIR}")
    device = "cuda" if opts.use_gpu else "cpu"
    runtime, why = resolve_runtime(opts.runtime, device, backbone.precision)
    log.info("backbone runtime: %s (%s)", runtime, why)
    graphs = None if "://" in tmp else os.path.join(os.path.dirname(tmp), "graphs")
    feats = backbone_stage(
        ds, backbone, opts.batch_size, opts.actors, opts.use_gpu, opts.threads, runtime, graphs
    )
    progress = Progress("features", len(table), "images")
    tally = _Tally.remote()  # type: ignore[attr-defined]
    try:
        feats = feats.map_batches(
            _tally_batches(tally, progress.counter()), batch_format="numpy", batch_size=None
        )
        feats.write_parquet(tmp, partition_cols=["split"], min_rows_per_file=1024)
        rows, shape, mean, std = _summarise(ray.get(tally.get.remote()), tmp)
    finally:
        progress.stop()
        ray.kill(tally)
    secs = time.perf_counter() - t0
    skipped = collect_skipped(f"{tmp}/{SKIPPED_DIR}")
    total = sum(rows.values())
    progress.done(
        f"{total} images ({len(skipped)} skipped) in {secs:.1f}s, "
        f"{total / max(secs, 1e-9):.1f} img/s"
    )
    return {
        "version": FORMAT_VERSION,
        "rows": rows,
        "shape": list(shape),
        "mean": mean,
        "std": std,
        "label_names": list(label_names),
        "skipped": skipped,
        "backbone": backbone_identity(backbone),
        "runtime": {"name": runtime, "precision": backbone.precision, "why": why},
        "extract_s": secs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _load(entry: str, reused: bool) -> FeatureStore | None:
    text = read_text(f"{entry}/{MANIFEST}")
    if text is None:
        return None
    meta = json.loads(text)
    if reused:
        log.debug("feature store: using %s (%s rows)", entry, meta["rows"])
    return FeatureStore(
        entry,
        meta["key"],
        {k: int(v) for k, v in meta["rows"].items()},
        tuple(meta["shape"]),  # type: ignore[arg-type]
        meta["mean"],
        meta["std"],
        list(meta["label_names"]),
        [tuple(s) for s in meta["skipped"]],  # type: ignore[misc]
        reused,
        meta.get("runtime", {"name": "torch", "precision": "fp32"}),
    )


def _publish(tmp: str, entry: str) -> FeatureStore:
    """Rename the finished folder into place; if another run won the race, use its entry."""
    fs, src = _fs(tmp)
    _, dst = _fs(entry)
    try:
        if "://" in tmp:
            fs.move(src, dst)
        else:
            os.rename(src, dst)  # fails if dst exists and is not empty: never merged
    except OSError:
        found = _load(entry, reused=True)
        if found is None:
            raise
        _remove(tmp)
        return found
    store = _load(entry, reused=False)
    assert store is not None
    return store


def _remove(uri: str) -> None:
    fs, path = _fs(uri)
    with contextlib.suppress(OSError, FileNotFoundError):
        fs.delete_dir(path)


def _remove_stale(root: str, key: str) -> None:
    """Drop half-written folders of this key left by killed runs (we hold the lock)."""
    if "://" in root or not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith(f".tmp-{key}-"):
            log.info("feature store: removing incomplete %s/%s", root, name)
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


#: Splits whose maps train the CAE (and set its input standardisation).
CAE_SPLITS = ("train", "unlabeled")


@ray.remote(num_cpus=0)
class _Tally:
    """Per-batch rows per split and channel sums of the CAE's maps, keyed by the batch's ids
    (a retried task overwrites its own part instead of counting twice)."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, Any]] = {}

    def add(self, key: str, part: dict[str, Any]) -> None:
        self.parts[key] = part

    def get(self) -> list[dict[str, Any]]:
        return list(self.parts.values())


def _tally_batches(tally: Any, count: Any) -> Any:
    """A pass-through ``map_batches`` function: adds the batch's statistics to ``tally`` (and
    waits, so that they are all in when the write finishes) and counts it for the progress line.
    """

    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["id"]]
        if not ids:
            return batch
        splits = batch["split"].astype(str)
        maps = batch["maps"]
        m = maps[np.isin(splits, CAE_SPLITS)].astype(np.float64)
        names, counts = np.unique(splits, return_counts=True)
        part = {
            "rows": {str(k): int(v) for k, v in zip(names, counts)},
            "shape": list(maps.shape[1:]),
            "s": m.sum(axis=(0, 2, 3)),
            "ss": (m**2).sum(axis=(0, 2, 3)),
            "n": int(m.shape[0] * m.shape[2] * m.shape[3]),
        }
        ray.get(tally.add.remote(hashlib.sha1("\0".join(ids).encode()).hexdigest(), part))
        return count(batch)

    return fn


def _summarise(
    parts: list[dict[str, Any]], uri: str
) -> tuple[dict[str, int], tuple[int, ...], list[float], list[float]]:
    """Rows per split and per-channel mean/std of the CAE's maps (``train`` and ``unlabeled``),
    from the per-batch parts the write stage tallied: the store is never read back."""
    rows: dict[str, int] = {}
    s: Any = 0.0
    ss: Any = 0.0
    n = 0
    shape: tuple[int, ...] = ()
    for part in parts:
        for name, k in part["rows"].items():
            rows[name] = rows.get(name, 0) + k
        shape = tuple(part["shape"])
        if part["n"]:
            s, ss, n = s + part["s"], ss + part["ss"], n + part["n"]
    if n == 0:
        raise DataError(f"no training image could be decoded (feature store {uri})")
    mean = np.asarray(s) / n
    std = np.sqrt(np.maximum(np.asarray(ss) / n - mean**2, 0.0))
    return rows, shape, mean.tolist(), std.tolist()


def collect_skipped(uri: str) -> list[tuple[str, str]]:
    """Every ``(file, reason)`` that :func:`decode_batch` recorded under ``uri``, sorted."""
    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    out: list[tuple[str, str]] = []
    for info in fs.get_file_info(pafs.FileSelector(path)):
        if info.path.endswith(".json"):
            with fs.open_input_stream(info.path) as fh:
                out += [tuple(x) for x in json.loads(fh.read().decode())]  # type: ignore[misc]
    return sorted(out)

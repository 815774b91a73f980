"""Equal, seeded shards of a Parquet feature store, read straight from storage (no Ray).

A DDP worker that streams its maps from storage every epoch reads its own slice of the store's
files with pyarrow (local, NFS or any pyarrow URI), shuffles it through a bounded buffer and
yields batches. Every rank gets exactly ``rows // world`` rows per epoch (DDP's all-reduce
deadlocks on unequal shards); the files are dealt in a new seeded order each epoch, so shards
change from epoch to epoch while their union stays the whole store (less ``rows % world``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class ShardFile:
    """One Parquet file of the store and how many rows it holds."""

    path: str
    rows: int


def list_files(uri: str, splits: Sequence[str]) -> list[ShardFile]:
    """The Parquet files of ``splits`` under a store entry, with their row counts (metadata
    only, no data read)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, root = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    out = []
    for split in splits:
        sel = pafs.FileSelector(f"{root}/split={split}", allow_not_found=True, recursive=True)
        for info in sorted(fs.get_file_info(sel), key=lambda i: i.path):
            if info.path.endswith(".parquet"):
                with fs.open_input_file(info.path) as fh:
                    rows = pq.ParquetFile(fh).metadata.num_rows
                path = info.path if "://" not in uri else f"{uri.split('://')[0]}://{info.path}"
                out.append(ShardFile(path, rows))
    return out


def shard_plan(
    files: Sequence[ShardFile], rank: int, world: int, epoch: int, seed: int
) -> list[tuple[str, int, int]]:
    """``(path, start, stop)`` row slices of rank ``rank`` for one epoch.

    The files are put in a seeded order for ``epoch``; their rows form one sequence, cut into
    ``world`` equal contiguous parts (the last ``rows % world`` rows are left out).
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(files))
    per_rank = sum(f.rows for f in files) // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    plan, pos = [], 0
    for i in order:
        f = files[int(i)]
        start, stop = max(lo, pos), min(hi, pos + f.rows)
        if start < stop:
            plan.append((f.path, start - pos, stop - pos))
        pos += f.rows
    return plan


def read_maps(path: str, start: int, stop: int, column: str = "maps") -> np.ndarray:
    """Rows ``start:stop`` of a tensor column as float32 ``(n, *shape)``.

    Reads Ray's tensor columns with or without Ray installed (the extension's storage is a
    list of floats, its shape in the field metadata).
    """
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, p = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    with fs.open_input_file(p) as fh:
        pf = pq.ParquetFile(fh)
        meta = pf.schema_arrow.field(column).metadata or {}
        table = pf.read(columns=[column]).slice(start, stop - start)
    arr: Any = table.column(column).combine_chunks()
    shape_json = meta.get(b"ARROW:extension:metadata", b"[]")
    if isinstance(arr, pa.ExtensionArray):  # Ray is imported here: its type is registered
        shape_json = arr.type.__arrow_ext_serialize__()
        arr = arr.storage
    shape = tuple(json.loads(shape_json))
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(table), *shape)


def shard_batches(
    plan: Sequence[tuple[str, int, int]],
    batch_size: int,
    seed: int | None,
    buffer_rows: int = 4096,
) -> Iterator[dict[str, torch.Tensor]]:
    """``{"maps": (batch, C, h, w)}`` batches of a shard plan, shuffled through a buffer of
    about ``buffer_rows`` rows (``seed`` None: in order). The next file is read while the
    current one is trained on."""
    rng = np.random.default_rng(seed) if seed is not None else None
    pending: list[np.ndarray] = []
    held = 0
    if not plan:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(read_maps, *plan[0])
        for i in range(len(plan)):
            part = nxt.result()
            if i + 1 < len(plan):
                nxt = pool.submit(read_maps, *plan[i + 1])
            pending.append(part)
            held += len(part)
            if held >= buffer_rows or i + 1 == len(plan):
                rows = np.concatenate(pending)
                if rng is not None:
                    rows = rows[rng.permutation(len(rows))]
                keep = len(rows) if i + 1 == len(plan) else len(rows) - len(rows) % batch_size
                for j in range(0, keep, batch_size):
                    yield {"maps": torch.from_numpy(rows[j : j + batch_size])}
                pending, held = [rows[keep:]], len(rows) - keep

"""Equal seeded shards of a Parquet store, read without Ray."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_maps_parquet

from medcae.data.shards import ShardFile, list_files, read_maps, shard_batches, shard_plan


def _store(tmp_path, sizes=(7, 5, 9)) -> tuple[str, np.ndarray]:
    """Three files of 7, 5 and 9 maps whose values are their row numbers."""
    rows = np.arange(sum(sizes), dtype=np.float32)[:, None, None, None]
    maps = rows * np.ones((1, 2, 2, 2), np.float32)
    bounds = np.cumsum(sizes)[:-1]
    for i, part in enumerate(np.split(maps, bounds)):
        write_maps_parquet(tmp_path / "split=train" / f"f{i}", part, files=1)
    return str(tmp_path), maps


def test_files_and_reads_keep_the_tensor_shape(tmp_path):
    uri, maps = _store(tmp_path)
    files = list_files(uri, ["train", "val"])  # a missing split is simply empty
    assert sorted(f.rows for f in files) == [5, 7, 9]
    got = read_maps(files[0].path, 1, 4)
    assert got.shape == (3, 2, 2, 2) and got.dtype == np.float32


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_get_equal_disjoint_shards_covering_the_store(tmp_path, world):
    uri, maps = _store(tmp_path)
    files = list_files(uri, ["train"])
    seen = []
    counts = set()
    for rank in range(world):
        rows = [
            b["maps"][:, 0, 0, 0].numpy()
            for b in shard_batches(shard_plan(files, rank, world, epoch=3, seed=1), 4, seed=rank)
        ]
        got = np.concatenate(rows)
        counts.add((len(got), len(rows)))
        seen += got.tolist()
    assert len(counts) == 1  # every rank: same rows, same number of batches (DDP all-reduce)
    assert len(seen) == len(set(seen)) == 21 // world * world  # disjoint, all but 21 % world


def test_epochs_deal_the_files_in_a_new_order(tmp_path):
    uri, _ = _store(tmp_path)
    files = list_files(uri, ["train"])
    plans = {tuple(shard_plan(files, 0, 2, epoch, seed=0)) for epoch in range(6)}
    assert len(plans) > 1
    assert shard_plan(files, 0, 2, 1, 0) == shard_plan(files, 0, 2, 1, 0)  # seeded


def test_buffer_shuffles_but_keeps_every_row(tmp_path):
    uri, maps = _store(tmp_path)
    plan = shard_plan([ShardFile(f.path, f.rows) for f in list_files(uri, ["train"])], 0, 1, 0, 0)
    ordered = np.concatenate([b["maps"].numpy() for b in shard_batches(plan, 5, None, 8)])
    shuffled = np.concatenate([b["maps"].numpy() for b in shard_batches(plan, 5, 0, 8)])
    assert sorted(ordered[:, 0, 0, 0]) == sorted(shuffled[:, 0, 0, 0]) == sorted(maps[:, 0, 0, 0])
    assert not np.array_equal(ordered, shuffled)


def test_reads_the_registered_ray_tensor_type_too(tmp_path):
    """In a Ray worker the extension type is registered: same arrays either way."""
    import subprocess
    import sys

    uri, maps = _store(tmp_path)
    code = (
        "import sys, numpy as np, ray.data\n"
        "from medcae.data.shards import list_files, read_maps\n"
        f"f = list_files({uri!r}, ['train'])\n"
        "x = np.concatenate([read_maps(g.path, 0, g.rows) for g in f])\n"
        "print(x.shape, float(x.sum()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    files = list_files(uri, ["train"])
    here = np.concatenate([read_maps(f.path, 0, f.rows) for f in files])
    assert out.stdout.split("\n")[0] == f"{here.shape} {float(here.sum())}", out.stderr[-2000:]

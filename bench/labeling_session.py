"""A simulated labeling session through the server: the labeling loop end to end on real data.

A champion is trained on 10 labels per class of the training split (``medcae run --budget 10
--register``); ``medcae serve`` then serves it with the training split's images as the pool (PNG
files, their labels hidden from the server). An annotator (this process, over HTTP) answers the
queue from the ground truth, ``--per-round`` labels a round; after each round it trains
(``POST .../train``: ``medcae retrain`` through the Ray Jobs API of the server's local Ray),
reads the comparison and promotes the challenger, waiting until the server answers with it.

Prints per round: labels, the new champion's test AUC (on the test split plus the held-out share
of the loop's labels) next to the old one's on the same images, the simulated study's figure for
the same strategy and label count (``docs/results/active/active.md``, when given), the first
queue request's latency, and the wall time from submit to promoted.

    MEDCAE_DATA_DIR=../shared/data python bench/labeling_session.py [--data pneumoniamnist]
        [--rounds 3] [--per-round 20] [--strategy hybrid] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from serve_load import free_port, wait_healthy  # noqa: E402


def study_figures(path: Path, strategy: str) -> dict[int, str]:
    """``{labels: "0.944 ± 0.011"}`` of ``strategy`` in the study's table, if it exists."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    header = next((ln for ln in lines if ln.startswith("| labels |")), None)
    if header is None:
        return {}
    cols = [c.strip() for c in header.strip("|").split("|")]
    if strategy not in cols:
        return {}
    j = cols.index(strategy)
    out = {}
    for ln in lines:
        cells = [c.strip().strip("*") for c in ln.strip("|").split("|")]
        if len(cells) == len(cols) and cells[0].isdigit():
            out[int(cells[0])] = cells[j]
    return out


def write_pool(data: str, folder: Path) -> dict[str, str]:
    """The training split as PNG files; ``{pool id: true class name}``."""
    from PIL import Image

    from medcae.data import load_dataset
    from medcae.labeling.pool import image_id

    ds = load_dataset(data)
    split = ds.splits["train"]
    folder.mkdir(parents=True)
    truth = {}
    for i, (image, label) in enumerate(zip(split.images, split.labels)):
        path = folder / f"{i:05d}.png"
        Image.fromarray(image).save(path, compress_level=1)
        truth[image_id(str(path))] = ds.label_names[int(label)]
    return truth


def run(cmd: list[str], log: Path, env: dict) -> None:
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({rc}); see {log}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="pneumoniamnist")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=20)
    p.add_argument("--start", type=int, default=10, help="the champion's labels per class")
    p.add_argument("--strategy", default="hybrid")
    p.add_argument("--epochs", type=int, default=None, help="CAE epochs (default the default)")
    p.add_argument("--study", default=str(ROOT / "docs/results/active/active.md"))
    p.add_argument("--keep", default=None, help="keep the session's folder here")
    a = p.parse_args()
    study = study_figures(Path(a.study), a.strategy)
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="medcae-session-"))
    tmp.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{tmp / 'registry.db'}"
    env = {**os.environ, "MEDCAE_CACHE_DIR": str(tmp / "cache")}
    t0 = time.perf_counter()
    truth = write_pool(a.data, tmp / "pool")
    print(f"pool: {len(truth)} training images as PNG files ({time.perf_counter() - t0:.0f}s)")
    epochs = ["--epochs", str(a.epochs)] if a.epochs else []
    t0 = time.perf_counter()
    run(
        [sys.executable, "-m", "medcae", "run", "--data", a.data, "--budget", str(a.start)]
        + ["--register", "bench", "--mlflow", uri, "--out", str(tmp / "champion"), *epochs],
        tmp / "champion.log",
        env,
    )
    run([sys.executable, "-m", "medcae", "models", "--mlflow", uri, "promote", "bench", "1"],
        tmp / "promote.log", env)  # fmt: skip
    print(f"champion: version 1 on {2 * a.start} labels ({time.perf_counter() - t0:.0f}s)")
    port = free_port()
    cmd = [sys.executable, "-m", "medcae", "serve", "--model", "bench@champion"]
    cmd += ["--mlflow", uri, "--pool", f"bench={tmp / 'pool'}", "--state-dir", str(tmp / "state")]
    cmd += ["--port", str(port), "--follow-s", "2", "--log-dir", str(tmp / "logs")]
    if epochs:
        cmd += ["--train-args", " ".join(epochs)]
    with open(tmp / "serve.log", "w") as log:
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        wait_healthy(url, 300)
        api = httpx.Client(base_url=url, timeout=600)
        labels = 2 * a.start
        for r in range(1, a.rounds + 1):
            tq = time.perf_counter()
            q = api.get(f"/v1/models/bench/queue?k={a.per_round}&strategy={a.strategy}")
            q.raise_for_status()
            t_queue = time.perf_counter() - tq
            for image in q.json()["images"]:
                body = {"image_id": image["image_id"], "label": truth[image["image_id"]]}
                assert api.post("/v1/models/bench/labels", json=body).status_code == 201
            labels += a.per_round
            t1 = time.perf_counter()
            job = api.post("/v1/models/bench/train").json()
            last = ""
            while job["state"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
                time.sleep(5)
                job = api.get(f"/v1/jobs/{job['job_id']}").json()
                if job["progress"] != last and job["progress"]:
                    last = job["progress"]
                    print(f"  round {r}: {job['state']} {time.perf_counter() - t1:4.0f}s {last}")
            if job["state"] != "SUCCEEDED":
                raise SystemExit(f"round {r}: the job {job['state']}: {job['message']}")
            cmp = api.get("/v1/models/bench/compare").json()
            version = cmp["challenger"]
            api.post("/v1/models/bench/promote", json={"version": version}).raise_for_status()
            while api.get("/v1/models/bench").json()["version"] != version:
                time.sleep(1)
            wall = time.perf_counter() - t1
            c = cmp["comparison"]
            rows.append(
                {
                    "round": r,
                    "labels": labels,
                    "held_out": c.get("held_out"),
                    "n": c["n"],
                    "auc_new": c["challenger"]["auc"]["value"],
                    "auc_ci": c["challenger"]["auc"]["ci"],
                    "auc_old": c["champion"]["auc"]["value"],
                    "p": c["tests"][0]["p"] if c["tests"] else None,
                    "study": study.get(labels, "n/a"),
                    "queue_s": t_queue,
                    "train_to_promoted_s": wall,
                }
            )
            print(json.dumps(rows[-1], default=float), flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
    print(
        f"\n{a.data}, strategy {a.strategy}, {a.per_round} labels a round from a champion on "
        f"{2 * a.start} (folder {tmp}):\n"
    )
    print(
        "| round | labels | held out | test AUC, new champion [95% CI] | the old one, same images "
        "| DeLong p | study, same labels | first queue request | submit to promoted |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        ci = x["auc_ci"] or [float("nan")] * 2
        print(
            f"| {x['round']} | {x['labels']} | {x['held_out']} | {x['auc_new']:.3f} "
            f"[{ci[0]:.3f}, {ci[1]:.3f}] | {x['auc_old']:.3f} | {x['p']:.2g} | {x['study']} | "
            f"{x['queue_s']:.1f}s | {x['train_to_promoted_s']:.0f}s |"
        )


if __name__ == "__main__":
    main()

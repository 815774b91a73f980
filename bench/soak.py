"""Soak test of the Serve endpoint on loopback: good and hostile requests mixed, bounded in time.

For ``--seconds`` (60) at ``--concurrency`` (32), each client thread sends, in turn, good PNG
and DICOM requests and hostile ones (corrupt and truncated images, a decompression bomb, a
malformed DICOM, NaN pixels, random bytes, nested and malformed JSON, an over-limit body, a
missing API key, a foreign Host header, a small JPEG declaring 9000x9000, a DICOM smuggling a
9000x9000 JPEG under a 10x10 header, a deflated DICOM bomb). Prints the count per (kind,
status), the number of 5xx (must be 0), whether the replica restarted (its pid, before and
after), and the replica's RSS: the mean of the first and the last 10 s, and their ratio
(goal: growth under 10%).

    python bench/soak.py --bundle runs/demo/bundle [--seconds 60] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import base64
import collections
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

KEY = "soak-key"


def requests_mix(pngs: list[bytes]) -> list[tuple[str, dict, bool]]:
    """(kind, httpx kwargs, expected good) for each request of the rotation."""
    from helpers import bomb_png, deflated_bomb, dicom, encapsulated_dicom, encode, with_jpeg_size
    from pydicom.uid import JPEGBaseline8Bit

    small_jpeg = encode(np.full((8, 8), 128, np.uint8), "JPEG")
    big_jpeg = with_jpeg_size(small_jpeg, 9000, 9000)

    nan = np.zeros(64, np.float32)
    nan[1] = np.nan
    good = pngs[0]
    auth = {"Authorization": f"Bearer {KEY}"}
    post = "/v1/predict"
    mix = [
        (f"good png {i}", {"url": post, "content": p, "headers": auth}) for i, p in enumerate(pngs)
    ]
    mix += [
        ("good dicom", {"url": post, "content": dicom(), "headers": auth}),
        ("truncated png", {"url": post, "content": good[: len(good) // 2], "headers": auth}),
        ("bomb png", {"url": post, "content": bomb_png(), "headers": auth}),
        (
            "malformed dicom",
            {
                "url": post,
                "content": dicom(RescaleSlope=("LO", "x"), RescaleIntercept=("DS", "0")),
                "headers": auth,
            },
        ),
        ("nan dicom", {"url": post, "content": dicom(nan), "headers": auth}),
        ("random bytes", {"url": post, "content": os.urandom(4096), "headers": auth}),
        ("over the cap", {"url": post, "content": b"\0" * (21 * 2**20), "headers": auth}),
        ("no key", {"url": post, "content": good}),
        ("foreign host", {"url": post, "content": good, "headers": auth | {"Host": "a.example"}}),
        ("jpeg 9000x9000", {"url": post, "content": big_jpeg, "headers": auth}),
        (
            "smuggled dicom",
            {
                "url": post,
                "content": encapsulated_dicom([big_jpeg], 10, 10, JPEGBaseline8Bit),
                "headers": auth,
            },
        ),
        ("deflated bomb", {"url": post, "content": deflated_bomb(12_000, 12_000), "headers": auth}),
        (
            "nested json",
            {"url": "/v1/predict/batch", "content": b"[" * 50_000 + b"]" * 50_000, "headers": auth},
        ),
        (
            "json batch",
            {
                "url": "/v1/predict/batch",
                "json": {"images": [base64.b64encode(p).decode() for p in pngs[:4]]},
                "headers": auth,
            },
        ),
    ]
    return [(k, kw, k.startswith(("good", "json batch"))) for k, kw in mix]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="runs/demo/bundle")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=32)
    a = p.parse_args()
    import ray
    from ray import serve
    from serve_load import free_port, sample_pngs, wait_healthy

    from medcae.serving.app import build_app
    from medcae.serving.auth import hash_key

    mix = requests_mix(sample_pngs(8))
    ray.init(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"bundle": str(Path(a.bundle).resolve()), "api_key_sha256": hash_key(KEY)}
    serve.run(build_app(args), name="medcae", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    auth = {"Authorization": f"Bearer {KEY}"}
    pid0 = httpx.get(f"{url}/v1/model", headers=auth).json()["pid"]
    replica = psutil.Process(pid0)
    rss: list[tuple[float, float]] = []
    stop = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not stop.wait(1.0):
            rss.append((time.perf_counter() - start, replica.memory_info().rss / 2**20))

    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    deadline = start + a.seconds

    def client(i: int) -> None:
        k = i
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.perf_counter() < deadline:
                kind, kw, _ = mix[k % len(mix)]
                k += 1
                kw = dict(kw)
                try:
                    code = c.post(kw.pop("url"), **kw).status_code
                except httpx.HTTPError as err:
                    code = type(err).__name__
                with lock:
                    counts[(kind, code)] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(a.concurrency) as pool:
        list(pool.map(client, range(a.concurrency)))
    wall = time.perf_counter() - start
    stop.set()
    pid1 = httpx.get(f"{url}/v1/model", headers=auth).json()["pid"]
    serve.shutdown()
    ray.shutdown()

    total = sum(counts.values())
    print(
        f"\n{total} requests in {wall:.0f}s at concurrency {a.concurrency} ({total / wall:.1f}/s)"
    )
    print(f"{'kind':18s} {'status':>8s} {'count':>6s}")
    for (kind, code), n in sorted(counts.items(), key=lambda x: (x[0][0], str(x[0][1]))):
        print(f"{kind:18s} {code!s:>8s} {n:6d}")
    five = sum(n for (_, c), n in counts.items() if not isinstance(c, int) or c >= 500)
    wrong = sum(n for (k, c), n in counts.items() if k.startswith("good") and c != 200)
    first = np.mean([m for t, m in rss if t <= 10])
    last = np.mean([m for t, m in rss if t >= wall - 10])
    print(f"5xx or transport errors: {five}; good requests not answered 200: {wrong}")
    print(f"replica pid {pid0} -> {pid1}: {'same, no restart' if pid0 == pid1 else 'RESTARTED'}")
    print(
        f"replica RSS: first 10 s {first:.0f} MiB, last 10 s {last:.0f} MiB, "
        f"growth {last / first - 1:+.1%} (goal < +10%)"
    )


if __name__ == "__main__":
    main()

"""The ``medcae`` command: ``medcae predict`` (HTTP client) and ``medcae serve`` (Ray Serve)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _predict(args: argparse.Namespace) -> int:
    from medcae.client import ClientError, MedcaeClient

    client = MedcaeClient(args.url, args.timeout)
    failures = 0
    for path in args.images:
        try:
            out = client.predict_file(path)
        except (ClientError, OSError) as err:
            print(f"{path}: error: {err}", file=sys.stderr)
            failures += 1
            continue
        p = out["prediction"]
        probs = " ".join(f"{k}={v:.3f}" for k, v in p["probabilities"].items())
        ood = "" if p["in_distribution"] else "  [out of distribution]"
        print(f"{path}: {p['label']}  {probs}{ood}")
    return 1 if failures else 0


def _serve(args: argparse.Namespace) -> int:
    from ray import serve

    from medcae.bundle import read_bundle
    from serve.app import build_app

    read_bundle(args.bundle)  # fail fast, with a clear message, before Ray starts
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(
        build_app({"bundle": str(Path(args.bundle).resolve())}), name="medcae", route_prefix="/"
    )
    print(f"serving {args.bundle} at http://{args.host}:{args.port} (docs: /docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medcae", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="classify image files through a running server")
    pr.add_argument("images", nargs="+", help="PNG, JPEG or DICOM files")
    pr.add_argument("--url", default="http://127.0.0.1:8000")
    pr.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    pr.set_defaults(fn=_predict)
    sv = sub.add_parser("serve", help="serve a model bundle over HTTP with Ray Serve")
    sv.add_argument("--bundle", required=True)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.set_defaults(fn=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    from medcae.errors import run_cli

    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `serve` package of a checkout
    return run_cli(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())

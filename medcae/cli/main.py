"""The ``medcae`` command: the Ray jobs, the model server and its HTTP client.

    medcae run --data pneumoniamnist           # the whole method: features, CAE, classifier, bundle
    medcae train --data /scans --num-workers 4  # the same job, at scale; resumable by --name
    medcae tune --data pneumoniamnist           # Ray Tune + Optuna search
    medcae evaluate --data pneumoniamnist       # the method against its baselines
    medcae serve --bundle runs/demo/bundle      # Ray Serve over HTTP
    medcae serve-config > config.yaml           # the shipped config, for `serve run config.yaml`
    medcae predict --url URL image.png ...      # classify files through a running server
    medcae predict --bundle B --data /scans --out preds.parquet   # a whole archive, Ray Data
    medcae suggest --bundle B --pool /scans --k 50 --labeled labels.csv   # what to label next

This module imports no Ray: each job's module (``medcae.cli.<name>``) is imported only when
that job runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from medcae.cli import args as jobargs
from medcae.cli.models import add_models_parser
from medcae.config import ConfigError
from medcae.serving.auth import key_line, load_keys, require_keys_for

#: subcommand -> (flags, one-line help); the body is ``medcae.cli.<subcommand>.main``.
JOBS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], str]] = {
    "run": (
        jobargs.add_run_args,
        "the main job: frozen-backbone features, CAE, classifier, bundle",
    ),
    "train": (
        jobargs.add_run_args,
        "the same job as run (its scaling, checkpoint and failure flags): resumable by --name",
    ),
    "tune": (jobargs.add_tune_args, "hyperparameter search: Ray Tune + Optuna (TPE) + ASHA"),
    "evaluate": (
        jobargs.add_evaluate_args,
        "the method against frozen features, pixels, fine-tuning",
    ),
}


DEFAULT_URL = "http://127.0.0.1:8000"
PREDICT_USAGE = (
    "give image files (and --url, default {url}) to ask a running server, or --bundle, --data "
    "and --out to predict a whole archive with Ray Data"
)


def _predict(args: argparse.Namespace) -> int:
    """``medcae predict``: the HTTP client with image files, the batch job with ``--bundle``."""
    batch = {"--bundle": args.bundle, "--data": args.data, "--out": args.out}
    usage = PREDICT_USAGE.format(url=DEFAULT_URL)
    if any(v is not None for v in batch.values()):
        missing = [flag for flag, v in batch.items() if v is None]
        if missing or args.images or args.url is not None:
            problem = (
                f"missing {', '.join(missing)}"
                if missing
                else "image files and --url go without --bundle"
            )
            args.parser.error(f"{usage} ({problem})")
        return _job(args)
    if not args.images:
        args.parser.error(f"nothing to predict: {usage}")
    return _predict_http(args)


def _predict_http(args: argparse.Namespace) -> int:
    from medcae.serving.client import ClientError, MedcaeClient

    client = MedcaeClient(args.url or DEFAULT_URL, args.timeout, args.api_key, args.model)
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
        if p.get("threshold") is not None:
            probs += f"  (threshold {p['threshold']:.3f})"
        if p.get("thresholds"):
            probs = " ".join(
                f"{k}={v:.3f}{'*' if p['findings'][k] else ''}/{p['thresholds'][k]:.3f}"
                for k, v in p["probabilities"].items()
            )
        who = f"  ({out['model']} version {out['version']})" if "version" in out else ""
        print(f"{path}: {p['label']}  {probs}{ood}{who}")
    return 1 if failures else 0


def _hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        print("error: no key on standard input (e.g. `echo -n KEY | medcae hash-key`)")
        return 2
    print(key_line(key, args.name, args.role))  # the digest alone without --name/--role
    return 0


def _serve_config(args: argparse.Namespace) -> int:
    from importlib import resources

    sys.stdout.write((resources.files("medcae.serving") / "config.yaml").read_text("utf-8"))
    return 0


def haproxy_env(folder: Path) -> dict[str, str]:
    """Environment of Ray Serve's HAProxy ingress: HAProxy in front of replicas that serve
    HTTP themselves (no Python proxy), its files in ``folder`` and its stats and metrics
    listeners on free ports (HAProxy binds those on every interface)."""
    import socket

    folder.mkdir(parents=True, exist_ok=True)

    def free() -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return str(sock.getsockname()[1])

    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": free(),
        "RAY_SERVE_HAPROXY_METRICS_PORT": free(),
        # a stopping replica stays reachable this long for HAProxy to take it out (Ray: 30 s)
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    }


def _interrupt(signum: int, frame: object) -> None:
    # A second signal while shutting down (`timeout` and `pkill` both forward theirs) must
    # not interrupt the clean-up: it would leave the local Ray's processes behind.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _serve(args: argparse.Namespace) -> int:
    from medcae.inference.bundle import read_bundle
    from medcae.serving.auth import allowed_hosts_for

    if args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas}: expected at least 1")
    keys = load_keys(args.api_keys_file)  # fail fast, clearly, before Ray is imported
    hashes = [k.digest for k in keys]
    require_keys_for(args.host, hashes)
    hosts = allowed_hosts_for(args.host, args.allowed_hosts)
    if args.model:  # resolved (fetched, verified) now: a wrong name fails before Ray starts
        from medcae.cli.models import registry_uri
        from medcae.registry.models import Registry, resolve_path
        from medcae.serving.catalog import build_specs

        specs = build_specs(args.model)
        uri = registry_uri(args.mlflow) if any(s.registered for s in specs) else None
        shown = []
        registry = Registry(uri) if uri else None
        for spec in specs:
            if registry is not None and spec.registered:
                resolved = registry.resolve(spec.ref)
            else:
                resolved = resolve_path(spec.ref)
            shown.append(f"{spec.name} version {resolved.version} ({spec.ref})")
        source = {
            "models": list(args.model),
            "registry_uri": uri,
            "follow_s": args.follow_s,
            "models_per_replica": args.models_per_replica,
        }
        what = ", ".join(shown)
    else:
        read_bundle(args.bundle)
        source = {"bundle": str(Path(args.bundle).resolve())}
        what = args.bundle
    labeling = _labeling_args(args, source)  # a bad pool fails before Ray starts
    log_dir = Path(args.log_dir).resolve()
    from ray import serve

    from medcae.serving.app import build_app

    if args.ingress == "haproxy":  # read by the local Ray's processes when they start
        os.environ.update(haproxy_env(log_dir / "haproxy"))
    try:
        http = {"host": args.host, "port": args.port}
        if args.address or labeling or args.metrics_port or args.ingress == "haproxy":
            import ray

            if args.address:  # a running cluster: Serve's proxy on its head node only
                ctx = ray.init(address=args.address)
                http["location"] = "HeadOnly"
            else:  # Ray's exporter on every node; this (local) one on this port. Logical
                # CPUs as a job's local Ray has them: the retraining jobs share it with Serve.
                ctx = ray.init(
                    num_cpus=2 * (os.cpu_count() or 1),
                    _metrics_export_port=args.metrics_port,
                    include_dashboard=True,
                )
            if labeling and ctx.dashboard_url:  # the Jobs API that retrains
                labeling["jobs_address"] = f"http://{ctx.dashboard_url}"
        serve.start(http_options=http)
        # SIGTERM (kill, systemd, Slurm) takes the same way out as Ctrl-C; set after Ray's
        # start, which installs a handler of its own that would abort the driver.
        signal.signal(signal.SIGTERM, _interrupt)
        app_args = {
            **source,
            **labeling,
            "api_key_sha256": [k.line() for k in keys],
            "allowed_hosts": list(hosts),
            "cors_origins": args.cors_origins or "",
            "num_replicas": args.replicas,
            "log_dir": str(log_dir),
        }
        serve.run(build_app(app_args), name="medcae", route_prefix="/")
        keys = f"{len(hashes)} API key(s)" if hashes else "no API keys (loopback only)"
        metrics = ""
        if args.metrics_port:
            metrics = f"; metrics at http://127.0.0.1:{args.metrics_port}/metrics"
        print(
            f"serving {what} at http://{args.host}:{args.port}, {keys}, "
            f"hosts {','.join(hosts)}; answers logged in {log_dir}{metrics}; Ctrl-C stops"
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        from medcae.distributed.runtime import shutdown_ray

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            serve.shutdown()
        finally:
            shutdown_ray()  # no process of the local Ray it started outlives `medcae serve`
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


def _labeling_args(args: argparse.Namespace, source: dict) -> dict:
    """The Serve app's labeling arguments; every pool listed once now, so a bad one fails
    before Ray starts (a pool of a model that is not served, a folder without images)."""
    if not args.pool:
        return {}
    from medcae.labeling.pool import LabelPool
    from medcae.serving.catalog import build_specs, parse_pools

    specs = build_specs(source.get("models") or [source["bundle"]])
    pools = parse_pools(args.pool, specs)
    for name, pool in pools.items():
        n = len(LabelPool.from_source(pool, args.data_dir))
        print(f"labeling {name}: pool {pool} ({n} images)")
    state = Path(args.state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    return {
        "pools": [
            f"{n}={str(Path(p).resolve()) if Path(p).exists() else p}" for n, p in pools.items()
        ],
        "state_dir": str(state),
        "train_args": args.train_args or "",
        "data_dir": args.data_dir,
    }


def _job(args: argparse.Namespace) -> int:
    from medcae.cli.logs import setup_console

    setup_console()  # quiet console now; each job opens <out>/run.log once its input checks out
    module = "run" if args.command == "train" else args.command  # one job, two names
    return importlib.import_module(f"medcae.cli.{module}").main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medcae",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="`medcae <command> --help` lists the flags of one command.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for name, (add_args, help_) in JOBS.items():
        jp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_args(jp)
        jp.set_defaults(fn=_job)
    sv = sub.add_parser("serve", help="serve bundles or registered models over HTTP with Ray Serve")
    which = sv.add_mutually_exclusive_group(required=True)
    which.add_argument("--bundle", help="a bundle folder")
    which.add_argument(
        "--model",
        action="append",
        help="a model: NAME (its champion, else newest version), NAME@ALIAS or NAME/VERSION "
        "of the registry (see `medcae models`), or a bundle folder; LABEL=REF serves it as "
        "LABEL. Repeat for several models behind one endpoint: the first is the default",
    )
    sv.add_argument(
        "--mlflow",
        default=None,
        metavar="URI",
        help="the registry of --model (default $MLFLOW_TRACKING_URI, else ./mlruns.db)",
    )
    sv.add_argument(
        "--follow-s",
        type=float,
        default=10.0,
        help="with --model NAME or NAME@ALIAS: ask the registry this often which version it "
        "names, and swap a promoted one in without a restart (0: never)",
    )
    sv.add_argument(
        "--models-per-replica",
        type=int,
        default=4,
        help="most models (or versions asked for with ?version= / ?alias=) one replica holds; "
        "the least recently used is unloaded",
    )
    sv.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="export Prometheus metrics at http://127.0.0.1:PORT/metrics (Ray's metrics "
        "export of the local Ray this command starts)",
    )
    sv.add_argument(
        "--log-dir",
        default="logs/serve",
        help="folder of the answer logs: one JSON line per answer, per replica, rotated "
        "(default logs/serve)",
    )
    sv.add_argument(
        "--ingress",
        choices=("proxy", "haproxy"),
        default="proxy",
        help="proxy: Serve's Python HTTP proxy; haproxy: HAProxy in front of replicas that "
        "serve HTTP themselves (about 2x the requests/s on 2 cores, docs/serving.md; it also "
        "opens HAProxy's stats and metrics listeners on every interface)",
    )
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="model replicas, each loading the bundle on one logical CPU of the cluster",
    )
    sv.add_argument(
        "--api-keys-file",
        default=None,
        help="file of API key sha256 digests, one per line (or $MEDCAE_API_KEYS_FILE / "
        "$MEDCAE_API_KEY_SHA256); required to serve beyond loopback",
    )
    sv.add_argument(
        "--allowed-hosts",
        default=None,
        help="Host header values accepted, comma-separated (name, *.domain, or * for any); "
        "default $MEDCAE_ALLOWED_HOSTS, else the loopback names and --host; required with "
        "--host 0.0.0.0",
    )
    sv.add_argument(
        "--cors-origins",
        default=None,
        help="origins that get CORS headers, comma-separated (default: none)",
    )
    lb = sv.add_argument_group("labeling loop")
    lb.add_argument(
        "--pool",
        action="append",
        metavar="NAME=PATH",
        help="turn on labeling for model NAME: its unlabeled images (a folder, glob, CSV or "
        "Parquet, as `suggest` reads them); a bare PATH is the default model's. Repeat for "
        "several models. Training and promoting need NAME served as a registered model",
    )
    lb.add_argument(
        "--state-dir",
        default="state",
        help="the loop's state: labels.db (labels, leases, jobs, audit) and jobs/ (each "
        "retraining job's labels and run); on a filesystem the cluster's head node sees",
    )
    lb.add_argument(
        "--train-args",
        default=None,
        help="extra flags of every retraining job (`medcae retrain --help`), quoted: "
        '"--epochs 5 --num-workers 2"',
    )
    lb.add_argument("--data-dir", default=None, help="where data set names are looked up")
    sv.add_argument(
        "--address",
        default=None,
        help="a running Ray cluster (ray://... or HOST:PORT): Serve and the retraining jobs "
        "run on it (default: a local Ray)",
    )
    sv.set_defaults(fn=_serve)
    add_models_parser(sub)
    sc_help = "print the shipped Ray Serve config (for `serve run` / `serve deploy`)"
    sc = sub.add_parser("serve-config", help=sc_help, description=sc_help)
    sc.set_defaults(fn=_serve_config)
    hk = sub.add_parser(
        "hash-key",
        help="print the keys-file line of an API key read from standard input: its sha256 "
        "digest, and its name and role when given",
    )
    hk.add_argument("--name", default=None, help="who holds the key (the labels record it)")
    hk.add_argument(
        "--role",
        default=None,
        choices=["predict", "label", "admin"],
        help="predict; label: also the labeling queue; admin: also train and promote",
    )
    hk.set_defaults(fn=_hash_key)
    pr = sub.add_parser(
        "predict",
        help="classify image files through a running server, or a whole archive with a bundle",
        description=PREDICT_USAGE.format(url=DEFAULT_URL),
    )
    pr.add_argument("images", nargs="*", help="PNG, JPEG or DICOM files, sent to the server")
    h = pr.add_argument_group("through a running server (HTTP)")
    h.add_argument("--url", default=None, help=f"the server (default {DEFAULT_URL})")
    h.add_argument("--timeout", type=float, default=30.0, help="seconds per request (30)")
    h.add_argument(
        "--api-key", default=None, help="API key of the server (default $MEDCAE_API_KEY)"
    )
    h.add_argument(
        "--model",
        default=None,
        help="one of the server's models (GET /v1/models; default: its first)",
    )
    jobargs.add_predict_args(pr)
    pr.set_defaults(fn=_predict, parser=pr)
    sg_help = "which unlabeled images to label next: a bundle ranks a pool (Ray Data)"
    sg = sub.add_parser("suggest", help=sg_help, description=sg_help)
    jobargs.add_suggest_args(sg)
    sg.set_defaults(fn=_job)
    rt_help = (
        "the labeling loop's job (the server submits it): the champion retrained on the "
        "loop's labels, compared with it, registered as the challenger"
    )
    rt = sub.add_parser(
        "retrain",
        help=rt_help,
        description=rt_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    jobargs.add_retrain_args(rt)
    rt.set_defaults(fn=_job)
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command; returns the exit code."""
    from medcae.cli.errors import run_cli

    args = build_parser().parse_args(argv)
    return run_cli(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())

"""``medcae models list|show|promote``, and ``--register NAME`` of ``run`` and ``tune``."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from medcae.cli.tracking import DEFAULT_URI, tracking_uri
from medcae.registry.models import (
    DEFAULT_ALIAS,
    ModelRef,
    Registry,
    describe,
)

log = logging.getLogger(__name__)


def registry_uri(value: str | None) -> str:
    """``--mlflow URI``, else ``$MLFLOW_TRACKING_URI``, else the local ``mlruns.db``. MLflow's
    own INFO lines (creating a database's tables) stay off the console."""
    import mlflow.tracking  # noqa: F401 - configures its loggers on import: quiet them after

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)
    assert uri is not None
    return uri


def register_bundle(args: argparse.Namespace, bundle: Path) -> tuple[str | None, int]:
    """``--register NAME``: the bundle as the next version of NAME, with its test metrics.

    Returns the line for the job's summary and the job's exit code: a registry that fails
    does not lose the run (its bundle is on disk); the job says so and exits 1.
    """
    if not getattr(args, "register", None):
        return None, 0
    try:
        registry = Registry(registry_uri(getattr(args, "mlflow", None)))
        info = registry.register(args.register, bundle)
    except Exception as err:  # noqa: BLE001 - reported; the bundle stays where it is
        log.exception("registering %s as %s failed", bundle, args.register)
        return f"error: registering the bundle as {args.register} failed: {err}", 1
    return (
        f"registered: {info.name} version {info.version} at {registry.uri} "
        f"(medcae models promote {info.name} {info.version} puts it in production)",
        0,
    )


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    helptext = "list, show and promote model versions in MLflow's Model Registry"
    mp = sub.add_parser("models", help=helptext, description=helptext)
    mp.add_argument(
        "--mlflow",
        default=None,
        metavar="URI",
        help=f"the registry (default $MLFLOW_TRACKING_URI, else {DEFAULT_URI})",
    )
    ms = mp.add_subparsers(dest="models_command", required=True, metavar="action")
    ls = ms.add_parser("list", help="models, or the versions of one model")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    sh = ms.add_parser("show", help="one version: NAME, NAME@ALIAS or NAME/VERSION")
    sh.add_argument("model")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    sh.add_argument("--card", action="store_true", help="print the version's model card")
    pr = ms.add_parser("promote", help=f"point an alias (default {DEFAULT_ALIAS}) at a version")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--alias", default=DEFAULT_ALIAS)
    mp.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
    registry = Registry(registry_uri(args.mlflow))
    action = args.models_command
    if action == "list":
        if args.name:
            versions = registry.versions(args.name)
            if args.json:
                print(json.dumps([v.as_dict() for v in versions], indent=1))
                return 0
            for v in versions:
                aliases = f"  ({', '.join(v.aliases)})" if v.aliases else ""
                auc = v.metrics.get("test_auc")
                score = f"  test AUC {auc:.4f}" if auc is not None else ""
                print(f"{v.name} version {v.version}{aliases}{score}")
            return 0
        names = registry.names()
        rows = []
        for name in names:
            versions = registry.versions(name)
            rows.append(
                {
                    "name": name,
                    "versions": len(versions),
                    "latest": versions[0].version if versions else None,
                    "aliases": {a: v.version for v in versions for a in v.aliases},
                }
            )
        if args.json:
            print(json.dumps(rows, indent=1))
        elif not rows:
            print(f"no models in the registry at {registry.uri}")
        for r in [] if args.json else rows:
            aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(r["aliases"].items()))
            print(
                f"{r['name']}: {r['versions']} version(s), latest {r['latest']}"
                + (f", {aliases}" if aliases else "")
            )
        return 0
    if action == "show":
        info = registry.show(ModelRef.parse(args.model))
        if args.json:
            print(json.dumps(info.as_dict(), indent=1))
        else:
            print(describe(info))
            if args.card:
                print("\n" + info.card)
        return 0
    if action == "promote":
        before = None
        try:
            before = registry.show(ModelRef(name=args.name, alias=args.alias)).version
        except Exception:  # noqa: BLE001 - the alias is new
            pass
        info = registry.promote(args.name, args.version, args.alias)
        was = f" (was version {before})" if before and before != info.version else ""
        print(f"{info.name}@{args.alias} -> version {info.version}{was}")
        return 0
    raise AssertionError(action)

"""Model versions in MLflow's Model Registry: register a bundle, list, show, promote, resolve.

A registered model is a name (``chest-xray``); each ``medcae run --register NAME`` adds a
version whose artifact is the run's bundle, with its test metrics and model card. An alias
(``champion`` by default) points at the version in production; promoting moves it. A model is
named on the command line and in the Serve config as

- ``NAME``: its ``champion`` version, else its newest;
- ``NAME@ALIAS``: the version the alias points at;
- ``NAME/VERSION``: that version;
- or a bundle folder, which works everywhere a registered model does.

Versions are fetched once into a local cache (``$MEDCAE_CACHE_DIR/registry``, else
``~/.cache/medcae/registry``): downloaded into a private folder, verified as a bundle (hashes,
no pickles), then renamed into place, so two processes fetching one version at once both end
with the same verified copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from medcae.config import ConfigError

log = logging.getLogger(__name__)

#: The alias ``promote`` moves unless told otherwise, and the one a bare ``NAME`` resolves to.
DEFAULT_ALIAS = "champion"
#: MLflow experiment that holds the runs behind registered versions.
EXPERIMENT = "medcae-models"
#: Artifact folder of a version's bundle inside its MLflow run.
ARTIFACT = "bundle"

T = TypeVar("T")


class RegistryError(ConfigError):
    """A model, version or alias that does not exist (the message names what does), or a
    registry that cannot be reached."""


class BrokenVersionError(RegistryError):
    """A registered version whose bundle does not verify (its sha256, or its files)."""


@dataclass(frozen=True)
class ModelRef:
    """A model as a user names it: a registered ``name`` with an ``alias`` or a ``version``
    (or neither), or a bundle ``path``."""

    name: str = ""
    alias: str | None = None
    version: str | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """``NAME``, ``NAME@ALIAS``, ``NAME/VERSION``, or a bundle folder (anything with a
        path separator that exists, or holds ``bundle.json``)."""
        text = text.strip()
        if not text:
            raise ConfigError("a model reference is empty: give NAME, NAME@ALIAS, NAME/VERSION")
        p = Path(text).expanduser()
        if p.is_dir() or text.startswith((".", "/", "~")):
            return cls(name=p.resolve().name, path=str(p.resolve()))
        if "@" in text:
            name, alias = text.split("@", 1)
            _check_name(name, text)
            if not alias or "/" in alias:
                raise ConfigError(f"model {text!r}: expected NAME@ALIAS, got alias {alias!r}")
            return cls(name=name, alias=alias)
        if "/" in text:
            name, version = text.split("/", 1)
            _check_name(name, text)
            if not version.isdigit():
                raise ConfigError(
                    f"model {text!r}: expected NAME/VERSION with a version number, got "
                    f"{version!r} (or a bundle folder: there is none at {p.resolve()})"
                )
            return cls(name=name, version=str(int(version)))
        _check_name(text, text)
        return cls(name=text)

    def __str__(self) -> str:
        if self.path:
            return self.path
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}/{self.version}" if self.version else self.name


def _check_name(name: str, text: str) -> None:
    if not name or any(c.isspace() for c in name):
        raise ConfigError(f"model {text!r}: {name!r} is not a model name")


@dataclass
class VersionInfo:
    """One registered version, as ``medcae models show`` prints it."""

    name: str
    version: str
    aliases: list[str]
    run_id: str
    source: str
    created: float
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    card: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "aliases": self.aliases,
            "run_id": self.run_id,
            "source": self.source,
            "created": self.created,
            "metrics": self.metrics,
            "tags": self.tags,
        }


@dataclass(frozen=True)
class Resolved:
    """A model reference resolved to a verified local bundle."""

    name: str
    version: str
    bundle: Path
    ref: str


def _verify(path: Path) -> dict[str, Any]:
    """``read_bundle``'s metadata (imported here: ``medcae models --help`` needs no torch)."""
    from medcae.inference.bundle import read_bundle

    meta, _, _ = read_bundle(path)
    return meta


def cache_root() -> Path:
    root = os.environ.get("MEDCAE_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "medcae") / "registry"


def _retry(fn: Callable[[], T], what: str, attempts: int = 8) -> T:
    """``fn()``, retried while SQLite reports the database locked by another writer."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - only 'locked' is retried, the rest raised
            if "database is locked" not in str(err) or i == attempts - 1:
                raise
            time.sleep(0.05 * 2**i)
    raise AssertionError(what)


class Registry:
    """MLflow's Model Registry at ``uri`` (a tracking URI: ``sqlite:///...``, ``http://...``)."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    # ------------------------------------------------------------------ writing

    def register(
        self,
        name: str,
        bundle: str | Path,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> VersionInfo:
        """Add ``bundle`` as the next version of ``name`` (created when new).

        The bundle is verified first; its files become the artifact of an MLflow run in the
        ``medcae-models`` experiment, with ``metrics``; the version carries the model card as
        its description and the bundle's sha256 as a tag.
        """
        from mlflow.entities import Metric

        _check_name(name, name)
        bundle = Path(bundle)
        meta = _verify(bundle)  # never register what cannot be served
        if metrics is None:  # the bundle's own test metrics
            test = (meta.get("metrics") or {}).get("test") or {}
            metrics = {
                f"test_{k}": float(v)
                for k, v in test.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        digest = bundle_digest(bundle)
        card = meta.get("model_card", "")
        client = self.client
        exp = _retry(lambda: client.get_experiment_by_name(EXPERIMENT), "experiment")
        exp_id = exp.experiment_id if exp else self._create_experiment()
        run = _retry(
            lambda: client.create_run(
                exp_id, run_name=f"{name}-{digest[:8]}", tags={"medcae.model": name}
            ),
            "run",
        )
        rid = run.info.run_id
        stamp = int(run.info.start_time)
        rows = [Metric(k, float(v), stamp, 0) for k, v in (metrics or {}).items()]
        if rows:
            _retry(lambda: client.log_batch(rid, metrics=rows), "metrics")
        client.log_artifacts(rid, str(bundle), ARTIFACT)
        _retry(lambda: client.set_terminated(rid), "terminate")
        self._create_model(name)
        version_tags = {"bundle_sha256": digest, **(tags or {})}
        version_tags |= {f"metric.{k}": f"{float(v):.6g}" for k, v in (metrics or {}).items()}
        mv = _retry(
            lambda: client.create_model_version(
                name,
                source=f"{run.info.artifact_uri}/{ARTIFACT}",
                run_id=rid,
                tags=version_tags,
                description=card[:5000],
            ),
            "version",
        )
        log.info("registry: %s version %s <- %s (run %s)", name, mv.version, bundle, rid)
        return self.show(ModelRef(name=name, version=str(mv.version)))

    def _create_experiment(self) -> str:
        where = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not the cwd
            where = (Path(self.uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()
        try:
            return _retry(
                lambda: self.client.create_experiment(EXPERIMENT, artifact_location=where),
                "experiment",
            )
        except Exception:  # noqa: BLE001 - created by a racing process: use theirs
            exp = self.client.get_experiment_by_name(EXPERIMENT)
            if exp is None:
                raise
            return exp.experiment_id

    def _create_model(self, name: str) -> None:
        try:
            _retry(lambda: self.client.create_registered_model(name), "model")
        except Exception as err:  # noqa: BLE001
            if "RESOURCE_ALREADY_EXISTS" not in str(err) and "already exists" not in str(err):
                raise

    def promote(self, name: str, version: str, alias: str = DEFAULT_ALIAS) -> VersionInfo:
        """Point ``alias`` at ``version`` of ``name`` (one atomic update in the registry: of two
        racing promotions, the later one holds)."""
        info = self.show(ModelRef(name=name, version=str(version)))
        if not alias or "/" in alias or "@" in alias or alias.isdigit():
            raise ConfigError(f"alias {alias!r}: expected a word such as {DEFAULT_ALIAS}")
        _retry(lambda: self.client.set_registered_model_alias(name, alias, info.version), "alias")
        log.info("registry: %s@%s -> version %s", name, alias, info.version)
        return self.show(ModelRef(name=name, version=info.version))

    # ------------------------------------------------------------------ reading

    def names(self) -> list[str]:
        models = _retry(lambda: self.client.search_registered_models(max_results=1000), "list")
        return sorted(m.name for m in models)

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, newest first."""
        aliases = dict(getattr(self._model(name), "aliases", {}) or {})  # one read for all
        found = _retry(
            lambda: self.client.search_model_versions(f"name = '{_quote(name)}'"), "versions"
        )
        infos = (self._info(mv, aliases) for mv in found)
        return sorted(infos, key=lambda v: int(v.version), reverse=True)

    def _model(self, name: str) -> Any:
        try:
            return _retry(lambda: self.client.get_registered_model(name), "model")
        except Exception as err:  # noqa: BLE001
            if "RESOURCE_DOES_NOT_EXIST" not in str(err) and "not found" not in str(err).lower():
                raise RegistryError(f"model registry at {self.uri}: {err}") from err
            known = self.names()
            raise RegistryError(
                f"no model {name!r} in the registry at {self.uri}; it holds "
                f"{', '.join(known) if known else 'no models yet'}"
            ) from None

    def show(self, ref: ModelRef) -> VersionInfo:
        """The version ``ref`` names (its ``champion``, else its newest, for a bare name)."""
        if ref.path:
            raise RegistryError(f"{ref.path} is a bundle folder, not a registered model")
        model = self._model(ref.name)
        aliases = dict(getattr(model, "aliases", {}) or {})
        if ref.alias:
            if ref.alias not in aliases:
                raise RegistryError(
                    f"model {ref.name!r} has no alias {ref.alias!r}; its aliases: "
                    f"{_aliases_text(aliases)}"
                )
            version = str(aliases[ref.alias])
        elif ref.version:
            version = ref.version
        elif DEFAULT_ALIAS in aliases:
            version = str(aliases[DEFAULT_ALIAS])
        else:
            latest = self.versions(ref.name)
            if not latest:
                raise RegistryError(f"model {ref.name!r} has no versions yet")
            version = latest[0].version
        try:
            mv = _retry(lambda: self.client.get_model_version(ref.name, version), "version")
        except Exception as err:  # noqa: BLE001
            if "RESOURCE_DOES_NOT_EXIST" not in str(err) and "not found" not in str(err).lower():
                raise
            have = [v.version for v in self.versions(ref.name)]
            raise RegistryError(
                f"model {ref.name!r} has no version {version}; its versions: "
                f"{', '.join(have) if have else 'none'}"
            ) from None
        return self._info(mv, aliases)

    def _info(self, mv: Any, aliases: Mapping[str, Any] | None = None) -> VersionInfo:
        if aliases is None:
            aliases = dict(getattr(self._model(mv.name), "aliases", {}) or {})
        tags = dict(mv.tags or {})
        metrics = {
            k[len("metric.") :]: float(v) for k, v in tags.items() if k.startswith("metric.")
        }
        return VersionInfo(
            name=mv.name,
            version=str(mv.version),
            aliases=sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
            run_id=mv.run_id or "",
            source=mv.source or "",
            created=(mv.creation_timestamp or 0) / 1000.0,
            metrics=metrics,
            tags={k: v for k, v in tags.items() if not k.startswith("metric.")},
            card=mv.description or "",
        )

    def resolve(self, ref: ModelRef | str) -> Resolved:
        """The verified local bundle of ``ref``: a bundle folder as is; a registered version
        fetched into the cache once (and checked against the sha256 it was registered with)."""
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        if ref.path:
            return resolve_path(ref)
        info = self.show(ref)
        digest = info.tags.get("bundle_sha256", "")
        key = hashlib.sha256(self.uri.encode()).hexdigest()[:12]
        dest = cache_root() / key / info.name / info.version
        if not (dest / "bundle.json").is_file():
            _fetch(self.client, info.run_id, dest)
        got = bundle_digest(dest)
        if digest and got != digest:
            raise BrokenVersionError(
                f"{info.name} version {info.version}: the fetched bundle's sha256 {got[:12]} is "
                f"not the registered {digest[:12]} ({dest}); delete that folder to fetch again"
            )
        from medcae.inference.bundle import BundleError

        try:
            _verify(dest)
        except BundleError as err:
            raise BrokenVersionError(f"{info.name} version {info.version}: {err}") from err
        return Resolved(info.name, info.version, dest, str(ref))


def resolve_model(model: str | None, bundle: str | None, registry_uri: str | None) -> Resolved:
    """What a server loads: ``model`` (a reference) from the registry at ``registry_uri`` (else
    ``$MLFLOW_TRACKING_URI``), else the ``bundle`` folder."""
    if not (model or bundle):
        raise ConfigError("give a bundle folder or a model (NAME, NAME@ALIAS, NAME/VERSION)")
    ref = ModelRef.parse(model or str(bundle))
    if ref.path:
        return resolve_path(ref)
    uri = registry_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(f"model {model}: no registry_uri (or $MLFLOW_TRACKING_URI) to find it in")
    return Registry(uri).resolve(ref)


def resolve_path(ref: ModelRef) -> Resolved:
    """A bundle folder as a one-version model (its version: the first 8 hex of its sha256)."""
    assert ref.path is not None
    path = Path(ref.path)
    _verify(path)
    return Resolved(path.name, bundle_digest(path)[:8], path, str(ref))


def _fetch(client: Any, run_id: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        got = Path(client.download_artifacts(run_id, ARTIFACT, str(tmp)))
        final = dest.parent / f".ready-{dest.name}-{uuid.uuid4().hex[:8]}"
        os.replace(got, final)
        try:
            os.replace(final, dest)  # atomic; fails if another process put it there first
        except OSError:
            if not (dest / "bundle.json").is_file():
                raise
            shutil.rmtree(final, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bundle_digest(path: str | Path) -> str:
    """sha256 of a bundle's ``bundle.json`` (which lists the sha256 of every other file)."""
    return hashlib.sha256((Path(path) / "bundle.json").read_bytes()).hexdigest()


def _aliases_text(aliases: Mapping[str, Any]) -> str:
    return ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def describe(info: VersionInfo) -> str:
    """``medcae models show`` text."""
    lines = [
        f"{info.name} version {info.version}"
        + (f" ({', '.join(info.aliases)})" if info.aliases else ""),
        f"  registered {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.created))}",
        f"  run {info.run_id}",
        f"  source {info.source}",
    ]
    if info.metrics:
        lines.append("  metrics " + json.dumps(info.metrics, sort_keys=True))
    for k, v in sorted(info.tags.items()):
        lines.append(f"  {k} {v}")
    return "\n".join(lines)

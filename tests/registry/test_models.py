"""MLflow's Model Registry behind --register, `medcae models` and `serve --model`: real MLflow
on a SQLite database in the test's folder."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from medcae.config import ConfigError
from medcae.registry.models import (
    ModelRef,
    Registry,
    RegistryError,
    bundle_digest,
)


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Registry:
    monkeypatch.setenv("MEDCAE_CACHE_DIR", str(tmp_path / "cache"))
    return Registry(f"sqlite:///{tmp_path / 'mlruns.db'}")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("chest", ModelRef("chest")),
        ("chest@champion", ModelRef("chest", alias="champion")),
        ("chest/3", ModelRef("chest", version="3")),
        ("chest/03", ModelRef("chest", version="3")),
    ],
)
def test_references_parse(text, want):
    assert ModelRef.parse(text) == want
    assert str(ModelRef.parse(text)) == text.replace("/03", "/3")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("chest@", "expected NAME@ALIAS"),
        ("chest/x", "version number, got 'x' .*or a bundle folder"),
        ("@champion", "is not a model name"),
    ],
)
def test_bad_references_are_named(text, match):
    with pytest.raises(ConfigError, match=match):
        ModelRef.parse(text)


def test_a_bundle_folder_is_a_reference_too(demo_bundle):
    ref = ModelRef.parse(str(demo_bundle.path))
    assert ref.path == str(Path(demo_bundle.path).resolve())


def test_versions_aliases_and_what_each_reference_resolves_to(registry, demo_bundle, tmp_path):
    first = registry.register("chest", demo_bundle.path)
    second = registry.register("chest", demo_bundle.path, metrics={"test_auc": 0.5})
    assert (first.version, second.version) == ("1", "2")
    assert first.metrics["test_auc"] == pytest.approx(
        json.loads((Path(demo_bundle.path) / "bundle.json").read_text())["metrics"]["test"]["auc"]
    )  # the bundle's own test metrics, unless given
    assert first.tags["bundle_sha256"] == bundle_digest(demo_bundle.path)
    assert "Intended use" in first.card
    assert registry.names() == ["chest"]
    assert [v.version for v in registry.versions("chest")] == ["2", "1"]
    assert registry.show(ModelRef("chest")).version == "2"  # no champion yet: the newest
    registry.promote("chest", "1")
    assert registry.show(ModelRef("chest")).version == "1"  # the champion
    assert registry.show(ModelRef("chest", alias="champion")).aliases == ["champion"]
    assert registry.show(ModelRef("chest", version="2")).aliases == []
    registry.promote("chest", "2", alias="canary")
    assert registry.show(ModelRef.parse("chest@canary")).version == "2"
    resolved = registry.resolve("chest@champion")
    assert (resolved.name, resolved.version) == ("chest", "1")
    assert bundle_digest(resolved.bundle) == bundle_digest(demo_bundle.path)
    for f in Path(demo_bundle.path).iterdir():
        assert (resolved.bundle / f.name).read_bytes() == f.read_bytes(), f.name
    assert registry.resolve("chest/1").bundle == resolved.bundle  # cached: fetched once


def test_unknown_names_versions_and_aliases_name_what_exists(registry, demo_bundle):
    with pytest.raises(RegistryError, match="no model 'chest'.*holds no models yet"):
        registry.show(ModelRef("chest"))
    registry.register("chest", demo_bundle.path)
    registry.promote("chest", "1")
    with pytest.raises(RegistryError, match=r"no model 'lung'.*holds chest"):
        registry.resolve("lung@champion")
    with pytest.raises(RegistryError, match=r"has no version 7; its versions: 1"):
        registry.resolve("chest/7")
    with pytest.raises(RegistryError, match=r"no alias 'prod'; its aliases: champion -> 1"):
        registry.resolve("chest@prod")
    with pytest.raises(RegistryError, match="no version 9"):
        registry.promote("chest", "9")


def test_a_bundle_that_does_not_verify_is_never_registered(registry, demo_bundle, tmp_path):
    from medcae.inference.bundle import BundleError

    bad = tmp_path / "bad"
    shutil.copytree(demo_bundle.path, bad)
    (bad / "classifier.npz").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="sha256 does not match"):
        registry.register("chest", bad)
    assert registry.names() == []


def test_a_cached_copy_that_changed_is_refused(registry, demo_bundle):
    registry.register("chest", demo_bundle.path)
    cached = registry.resolve("chest/1").bundle
    meta = json.loads((cached / "bundle.json").read_text())
    meta["data"] = "swapped"
    (cached / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(RegistryError, match="not the registered"):
        registry.resolve("chest/1")


def _register(uri: str, bundle: str, out) -> None:
    out.put(Registry(uri).register("chest", bundle).version)


def _promote(uri: str, version: str, out) -> None:
    out.put(Registry(uri).promote("chest", version).version)


def test_racing_registrations_and_promotions_end_consistent(registry, demo_bundle):
    """Four processes register at once: four distinct versions; then two promote different
    versions at once: the alias points at one of them, the same however it is read."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_register, args=(registry.uri, str(demo_bundle.path), out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert sorted(out.get(timeout=5) for _ in procs) == ["1", "2", "3", "4"]
    procs = [ctx.Process(target=_promote, args=(registry.uri, v, out)) for v in ("2", "3")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    champion = registry.show(ModelRef("chest", alias="champion"))
    assert champion.version in {"2", "3"} and champion.aliases == ["champion"]
    held = [v.version for v in registry.versions("chest") if "champion" in v.aliases]
    assert held == [champion.version]


def test_models_cli_lists_shows_and_promotes(tmp_path, demo_bundle):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    Registry(uri).register("chest", demo_bundle.path)
    Registry(uri).register("chest", demo_bundle.path)

    def medcae(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "medcae", "models", "--mlflow", uri, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )

    promoted = medcae("promote", "chest", "1")
    assert promoted.returncode == 0, promoted.stderr
    assert promoted.stdout.strip() == "chest@champion -> version 1"
    again = medcae("promote", "chest", "2")
    assert again.stdout.strip() == "chest@champion -> version 2 (was version 1)"
    listed = medcae("list")
    assert listed.stdout.strip() == "chest: 2 version(s), latest 2, champion -> 2"
    shown = json.loads(medcae("show", "chest@champion", "--json").stdout)
    assert (shown["version"], shown["aliases"]) == ("2", ["champion"])
    missing = medcae("show", "lung")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: no model 'lung'")

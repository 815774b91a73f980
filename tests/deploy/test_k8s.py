"""k8s/: the RayJob and the RayService validated offline against KubeRay's CRD schemas, the job's
command against the real job parser, and the Serve config against serve/config.yaml. No cluster,
no Ray started."""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import re
import runpy
import shlex
import sys
from pathlib import Path, PurePosixPath

import jsonschema
import pytest
import yaml
from helpers import ROOT

pytestmark = pytest.mark.timeout(60)

K8S = ROOT / "k8s"
MANIFESTS = {"RayJob": K8S / "rayjob.yaml", "RayService": K8S / "rayservice.yaml"}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
#: Where k8s/Dockerfile puts the checkout (its WORKDIR).
IMAGE_ROOT = PurePosixPath("/app")
#: Serve app arguments the cluster adds to serve/config.yaml's, and those whose values differ.
K8S_ONLY_ARGS = {"api_keys_file", "api_key_sha256", "cors_origins"}
K8S_VALUED_ARGS = {"bundle", "allowed_hosts", "log_dir"}
#: The name rules of the API server for a RayJob's or RayService's name (DNS-1035 label).
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def _crd_dir() -> Path | None:
    """``$MEDCAE_K8S_CRDS``, else ``../shared/k8s`` beside the checkout or the shared data."""
    candidates = [os.environ.get("MEDCAE_K8S_CRDS"), ROOT.parent / "shared" / "k8s"]
    if os.environ.get("MEDCAE_DATA_DIR"):
        candidates.append(Path(os.environ["MEDCAE_DATA_DIR"]).parent / "k8s")
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in CRD_FILES.values()):
            return Path(c)
    return None


def _load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


# --------------------------------------------------------------------------- schema


def _strict(s: dict) -> dict:
    """A copy of a structural schema that refuses what the API server would not keep: fields it
    does not declare (pruned there, refused by kubectl's strict field validation) and nulls
    where it is not ``nullable``; ``x-kubernetes-int-or-string`` allows both."""
    s = dict(s)
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
        if not s.get("x-kubernetes-preserve-unknown-fields"):
            s.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = _strict(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_strict(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if s.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    return s


def _cel_rules(validator, rules, instance, schema):
    """CEL rules (``x-kubernetes-validations``) cannot be evaluated here: a field that has
    them is refused, so the manifests use only fields this test fully checks."""
    text = "; ".join(r["rule"] for r in rules)
    yield jsonschema.ValidationError(f"has CEL rules this offline check cannot evaluate: {text}")


def _list_type(validator, list_type, instance, schema):
    """``set`` lists hold no duplicates; ``map`` lists no two items with the same keys."""
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    names = schema.get("x-kubernetes-list-map-keys", [])
    props = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        if list_type == "set":
            key = json.dumps(item, sort_keys=True)
        else:
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in names)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {key} in a list keyed by {names}")
        seen.add(key)


K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-validations": _cel_rules, "x-kubernetes-list-type": _list_type},
)


def _validator(crd: dict) -> tuple[str, jsonschema.protocols.Validator]:
    """The CRD's ``group/version`` of its storage version and a validator of a whole object."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    api_version = f"{group}/{version['name']}"
    props = schema["properties"]
    props.pop("status")  # written by the operator, never by a manifest
    props["metadata"] = OBJECT_META  # the API server checks ObjectMeta itself
    props["apiVersion"] = {"const": api_version}
    props["kind"] = {"const": kind}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    K8sValidator.check_schema(schema)  # what _strict made is still a valid schema
    return api_version, K8sValidator(schema)


def _errors(validator, doc: dict) -> list[str]:
    errs = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errs]


@pytest.fixture(scope="module")
def crds() -> dict[str, dict]:
    d = _crd_dir()
    if d is None:
        pytest.skip("KubeRay CRDs not found: set MEDCAE_K8S_CRDS or provide ../shared/k8s")
    return {kind: _load_yaml(d / name) for kind, name in CRD_FILES.items()}


@pytest.fixture(scope="module")
def validators(crds) -> dict[str, tuple[str, jsonschema.protocols.Validator]]:
    return {kind: _validator(crd) for kind, crd in crds.items()}


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return {kind: _load_yaml(path) for kind, path in MANIFESTS.items()}


def _cluster(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def _groups(doc: dict) -> list[dict]:
    """The head group, then the worker groups."""
    c = _cluster(doc)
    return [c["headGroupSpec"], *c.get("workerGroupSpecs", [])]


def _serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def _job_argv(doc: dict) -> list[str]:
    return shlex.split(doc["spec"]["entrypoint"])


def _node(doc: dict, path: str):
    """The node at ``path`` (``/``-separated; ``cluster`` is the Ray cluster spec)."""
    for p in filter(None, path.split("/")):
        doc = _cluster(doc) if p == "cluster" else doc[int(p) if p.isdigit() else p]
    return doc


def _set(path: str, value):
    parent, _, last = path.rpartition("/")
    return lambda doc: _node(doc, parent).__setitem__(int(last) if last.isdigit() else last, value)


def _drop(path: str):
    parent, _, last = path.rpartition("/")
    return lambda doc: _node(doc, parent).pop(last)


def _rename(path: str, old: str, new: str):
    return lambda doc: _node(doc, path).__setitem__(new, _node(doc, path).pop(old))


def _append_copy(path: str):
    return lambda doc: _node(doc, path).append(copy.deepcopy(_node(doc, path)[0]))


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_manifest_validates_against_kuberay_crd(kind, validators, docs, crds):
    api_version, validator = validators[kind]
    assert _errors(validator, docs[kind]) == []
    assert docs[kind]["apiVersion"] == api_version
    assert docs[kind]["kind"] == crds[kind]["spec"]["names"]["kind"] == kind


HEAD = "cluster/headGroupSpec/template/spec/containers/0"
BROKEN = {
    "ray-version-int": (_set("cluster/rayVersion", 2), "is not of type 'string'"),
    "group-without-name": (_drop("cluster/workerGroupSpecs/0/groupName"), "'groupName' is a"),
    "misspelt-group-field": (
        _rename("cluster/workerGroupSpecs/0", "minReplicas", "minReplica"),
        "Additional properties are not allowed ('minReplica'",
    ),
    "misspelt-container-field": (
        _set(f"{HEAD}/imagePullPolicey", "Always"),
        "Additional properties are not allowed ('imagePullPolicey'",
    ),
    "start-param-not-string": (
        _set("cluster/workerGroupSpecs/1/rayStartParams/num-gpus", 1),
        "is not of type 'string'",
    ),
    "bad-quantity": (_set(f"{HEAD}/resources/limits/memory", "8GB"), "'8GB' does not match"),
    "port-as-string": (_set(f"{HEAD}/ports/0/containerPort", "6379"), "is not of type 'integer'"),
    "duplicate-port": (
        _set(f"{HEAD}/ports/1", {"name": "again", "containerPort": 6379}),
        "duplicate entry (6379, 'TCP')",
    ),
    "duplicate-volume": (
        _append_copy("cluster/headGroupSpec/template/spec/volumes"),
        "duplicate entry ('data',)",
    ),
    "auth-mode-typo": (_set("cluster/authOptions/mode", "tokens"), "is not one of"),
    "cel-guarded-field": (_set("cluster/managedBy", "ray.io/kuberay-operator"), "CEL rules"),
    "bad-name": (_set("metadata/name", "Medcae_Job"), "does not match"),
    "wrong-api-version": (_set("apiVersion", "ray.io/v1alpha2"), "was expected"),
    "status-in-manifest": (_set("status", {}), "Additional properties are not allowed"),
}


@pytest.mark.parametrize("kind", list(MANIFESTS))
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_copy_fails_validation(case, kind, validators, docs):
    change, expected = BROKEN[case]
    broken = copy.deepcopy(docs[kind])
    change(broken)
    errors = _errors(validators[kind][1], broken)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize(
    ("kind", "path", "value", "expected"),
    [
        ("RayJob", "spec/ttlSecondsAfterFinished", "600", "is not of type 'integer'"),
        ("RayJob", "spec/shutdownAfterJobFinish", True, "Additional properties"),
        ("RayService", "spec/serveConfigV2", {"applications": []}, "is not of type 'string'"),
    ],
)
def test_broken_spec_fails_validation(kind, path, value, expected, validators, docs):
    broken = copy.deepcopy(docs[kind])
    _set(path, value)(broken)
    assert any(expected in e for e in _errors(validators[kind][1], broken))


# --------------------------------------------------------------------------- cluster


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_ray_version_is_the_installed_one(kind, docs):
    import ray

    assert _cluster(docs[kind])["rayVersion"] == ray.__version__


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_token_auth_guards_the_dashboard(kind, docs):
    """The dashboard listens beyond loopback on Kubernetes (the operator uses it): token auth
    on, as for cluster.yaml and Slurm."""
    c = _cluster(docs[kind])
    assert c["authOptions"] == {"mode": "token"}
    assert c["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_cpu_and_gpu_worker_groups(kind, docs):
    groups = {g["groupName"]: g for g in _cluster(docs[kind])["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        (container,) = g["template"]["spec"]["containers"]
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert gpus == int(g.get("rayStartParams", {}).get("num-gpus", 0))
    assert int(groups["gpu"]["rayStartParams"]["num-gpus"]) >= 1
    assert groups["cpu"]["minReplicas"] >= 1  # the head runs no tasks (num-cpus 0)
    assert _cluster(docs[kind])["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_every_pod_runs_the_image_with_the_volumes(kind, docs):
    images = set()
    for g in _groups(docs[kind]):
        spec = g["template"]["spec"]
        volumes = {v["name"] for v in spec["volumes"]}
        for c in spec["containers"]:
            images.add(c["image"])
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/data"] in volumes and mounts["/dev/shm"] in volumes
    assert len(images) == 1


def test_image_is_the_dockerfile_install():
    """k8s/Dockerfile: the checkout at IMAGE_ROOT, torch pinned as in the Makefile, the package
    installed from it."""
    dockerfile = (K8S / "Dockerfile").read_text()
    (torch,) = re.findall(r"^TORCH\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert f"pip install --no-cache-dir {torch.strip()}" in dockerfile
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", dockerfile, re.M)
    # The package is installed (the Serve app and its page are package data): no PYTHONPATH.
    assert re.search(r"^RUN pip install --no-cache-dir \.$", dockerfile, re.M)
    assert "PYTHONPATH" not in dockerfile
    for folder in ("medcae", "ray_jobs", "serve"):
        assert re.search(rf"^COPY {folder} ", dockerfile, re.M), folder


# --------------------------------------------------------------------------- RayJob


def _parse_job(argv: list[str], monkeypatch) -> tuple[str, object]:
    """Run the entry point's ``ray_jobs`` shim with ``main`` replaced, then parse the command
    line it hands over with the real ``medcae`` parser."""
    import medcae.cli.main

    script = PurePosixPath(argv[1]).relative_to(IMAGE_ROOT)
    assert script.parts[0] == "ray_jobs" and (ROOT / script).is_file(), script
    seen: list[list[str]] = []
    monkeypatch.setattr(medcae.cli.main, "main", lambda a: seen.append(a) or 0)
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv[2:]])
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as ex:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert ex.value.code == 0
    (given,) = seen
    return given[0], medcae.cli.main.build_parser().parse_args(given)


def test_rayjob_runs_the_pipeline_with_its_real_flags(docs, monkeypatch):
    from medcae.cli.args import config_from_args

    argv = _job_argv(docs["RayJob"])
    assert argv[0] == "python"
    assert argv[1] == str(IMAGE_ROOT / "ray_jobs" / "pipeline.py")
    command, args = _parse_job(argv, monkeypatch)
    assert command == "run"
    config_from_args(args)  # the values make a valid config
    assert not args.smoke_test
    assert args.address is None  # the job gets RAY_ADDRESS from Ray, as under `ray job submit`
    for path in (args.out, args.feature_store, args.storage_path, args.data_dir):
        assert PurePosixPath(path).is_relative_to("/data"), path  # on the shared volume


def test_entrypoint_check_refuses_an_unknown_flag(docs, monkeypatch, capsys):
    argv = [*_job_argv(docs["RayJob"]), "--gpus", "2"]
    with pytest.raises(SystemExit) as ex:
        _parse_job(argv, monkeypatch)
    assert ex.value.code == 2
    assert "unrecognized arguments: --gpus 2" in capsys.readouterr().err


def test_rayjob_shuts_its_cluster_down(docs):
    spec = docs["RayJob"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    # What docs/scale.md promises: deleted 10 minutes after the job ends, retried twice, each
    # retry resuming from the same storage path and run name.
    assert spec["ttlSecondsAfterFinished"] == 600 and spec["backoffLimit"] == 2
    guide = (ROOT / "docs" / "scale.md").read_text()
    assert "deleted 10 minutes after the job ends" in guide and "retried\ntwice" in guide
    entry = spec["entrypoint"].split()
    assert "--storage-path" in entry and "--name" in entry


# --------------------------------------------------------------------------- RayService


@pytest.fixture(scope="module")
def local_serve() -> dict:
    return yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())


def test_serve_configs_validate_with_ray_serve_schema(docs, local_serve):
    from ray.serve.schema import ServeDeploySchema

    for cfg in (_serve_config(docs["RayService"]), local_serve):
        ServeDeploySchema.model_validate(cfg)


def _without_args(app: dict) -> dict:
    return {k: v for k, v in app.items() if k != "args"}


def _assert_same_application(k8s: dict, local: dict) -> None:
    """serve/config.yaml's application, changed only where Kubernetes needs it."""
    assert set(k8s) == set(local)
    assert k8s["http_options"] == {**local["http_options"], "host": "0.0.0.0"}
    (app,), (local_app,) = k8s["applications"], local["applications"]
    assert _without_args(app) == _without_args(local_app)  # name, route, import, deployments
    args, local_args = app["args"], local_app["args"]
    assert set(local_args) <= set(args)
    assert set(args) - set(local_args) <= K8S_ONLY_ARGS
    same = set(local_args) - K8S_VALUED_ARGS
    assert {k: args[k] for k in same} == {k: local_args[k] for k in same}  # limits included


def test_serve_config_is_the_projects_application(docs, local_serve):
    _assert_same_application(_serve_config(docs["RayService"]), local_serve)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_set("applications/0/args/limits/max_pixels", 1), id="limit"),
        pytest.param(_set("applications/0/deployments/0/max_queued_requests", 1), id="queue"),
        pytest.param(
            _set("applications/0/import_path", "medcae.serving.app:app"), id="import-path"
        ),
        pytest.param(_set("applications/0/args/api_key_file", "/k"), id="misspelt-arg"),
        pytest.param(_set("http_options/request_timeout_s", 5), id="timeout"),
    ],
)
def test_serve_config_check_sees_a_change(change, docs, local_serve):
    k8s = _serve_config(docs["RayService"])
    change(k8s)
    with pytest.raises(AssertionError):
        _assert_same_application(k8s, local_serve)


def test_every_serve_arg_reaches_the_app(docs, monkeypatch):
    """The builder passes each argument on (it drops unknown names silently: a misspelt
    ``api_keys_file`` would serve without keys), and the values are valid."""
    from medcae.serving.api import Limits
    from medcae.serving.auth import parse_hosts

    (app,) = _serve_config(docs["RayService"])["applications"]
    module_name, builder = app["import_path"].split(":")
    monkeypatch.syspath_prepend(str(ROOT))
    module = importlib.import_module(module_name)
    given: dict = {}
    signature = inspect.signature(module.MedcaeModel.func_or_class)

    class Recorder:
        @staticmethod
        def bind(**kwargs):
            given.update(signature.bind(**kwargs).arguments)

    monkeypatch.setattr(module, "MedcaeModel", Recorder)
    getattr(module, builder)(app["args"])
    assert set(given) == set(app["args"])
    Limits(**app["args"]["limits"])
    assert parse_hosts(app["args"]["allowed_hosts"])


def test_allowed_hosts_name_the_serve_service(docs):
    args = _serve_config(docs["RayService"])["applications"][0]["args"]
    hosts = args["allowed_hosts"]
    service = f"{docs['RayService']['metadata']['name']}-serve-svc"
    assert hosts and "*" not in hosts
    assert service in hosts
    others = [h for h in hosts if h not in ("localhost", "127.0.0.1", "::1")]
    assert all(h == service or h.startswith(service + ".") for h in others), others


def test_api_keys_come_from_the_secret_in_every_pod(docs):
    """``api_keys_file`` is set (the service listens beyond loopback) and every pod, where a
    replica may run, mounts that file from the Secret, read-only; no digest is inline."""
    args = _serve_config(docs["RayService"])["applications"][0]["args"]
    assert "api_key_sha256" not in args
    keys_file = PurePosixPath(args["api_keys_file"])
    secrets = set()
    for g in _groups(docs["RayService"]):
        spec = g["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(keys_file.parent)]
            assert mount["readOnly"] is True
            secret = volumes[mount["name"]]["secret"]
            assert {"key": keys_file.name, "path": keys_file.name} in secret["items"]
            secrets.add(secret["secretName"])
    assert len(secrets) == 1


def test_service_serves_the_bundle_the_job_writes(docs):
    from medcae.cli.main import build_parser

    out = build_parser().parse_args(["run", *_job_argv(docs["RayJob"])[2:]]).out
    bundle = _serve_config(docs["RayService"])["applications"][0]["args"]["bundle"]
    assert bundle == str(PurePosixPath(out) / "bundle")
    claims, read_only = {}, {}
    for kind in MANIFESTS:
        for g in _groups(docs[kind]):
            spec = g["template"]["spec"]
            pvcs = {
                v["name"]: v["persistentVolumeClaim"]
                for v in spec["volumes"]
                if "persistentVolumeClaim" in v
            }
            claims.setdefault(kind, set()).update(c["claimName"] for c in pvcs.values())
            for c in spec["containers"]:
                (mount,) = [m for m in c["volumeMounts"] if m["name"] in pvcs]
                read_only.setdefault(kind, set()).add(mount.get("readOnly", False))
    assert claims["RayJob"] == claims["RayService"] and len(claims["RayJob"]) == 1
    # The job writes the volume; the service only reads it.
    assert read_only == {"RayJob": {False}, "RayService": {True}}

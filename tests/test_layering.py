"""The house's floors, folder by folder: imports run downwards only, and Ray stays on top.

Every ``import`` counts, including the ones inside functions, so a cycle or an upward import
cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
from helpers import ROOT

PKG = ROOT / "medcae"

#: The package's folders (and its two top-level modules), lowest floor first. A folder may
#: import its own modules and any folder on a lower floor; nothing on one floor imports another
#: folder of the same floor.
FLOORS = [
    {"config", "data"},
    {"metrics"},
    {"model"},
    {"inference"},
    {"evaluation", "tuning", "registry"},
    {"labeling"},
    {"distributed"},  # the Ray layer: Ray Data, Train, Tune
    {"serving"},  # the Ray Serve app (serving/app.py) and its Ray-free HTTP layer
    {"cli"},
    {"__main__"},
]
#: Below this floor no module imports Ray.
RAY_FROM = FLOORS.index({"distributed"})
#: Inside the Ray layer, modules run one way too, lowest first.
RAY_LAYER = [
    {"runtime", "jobs"},
    {"extract"},
    {"store"},
    {"train", "predict"},
    {"pipeline"},
    {"tune", "evaluate", "study"},
]


#: Modules that import without Ray, checked in a fresh interpreter per folder: the floors below
#: distributed/, serving/'s Ray-free HTTP layer and the command line (its Ray waits inside the
#: functions that need it). ``medcae.data`` alone also leaves its lazy dependencies unloaded.
#: id -> (modules, top-level packages that must stay unimported)
IMPORTS_WITHOUT_RAY = {
    "data-package": (["medcae.data"], ("ray", "pydicom", "pyarrow")),
    "data": (["medcae.data.preprocess", "medcae.data.rows", "medcae.data.shards"], ("ray",)),
    "metrics": (["medcae.metrics.classification"], ("ray",)),
    "model": (
        [
            "medcae.model.backbones",
            "medcae.model.cae",
            "medcae.model.classifier",
            "medcae.model.epoch",
            "medcae.model.features",
            "medcae.model.trainer",
        ],
        ("ray",),
    ),
    "inference": (
        ["medcae.inference.bundle", "medcae.inference.predictions", "medcae.inference.predictor"],
        ("ray",),
    ),
    "evaluation": (["medcae.evaluation.comparison", "medcae.evaluation.protocol"], ("ray",)),
    "tuning": (["medcae.tuning.report", "medcae.tuning.space"], ("ray",)),
    "labeling": (
        ["medcae.labeling.strategies", "medcae.labeling.study", "medcae.labeling.suggestions"],
        ("ray",),
    ),
    "serving": (["medcae.serving.api", "medcae.serving.client"], ("ray",)),
    "cli": (
        [
            "medcae.cli.args",
            "medcae.cli.errors",
            "medcae.cli.evaluate",
            "medcae.cli.logs",
            "medcae.cli.main",
            "medcae.cli.predict",
            "medcae.cli.run",
            "medcae.cli.suggest",
            "medcae.cli.tune",
        ],
        ("ray",),
    ),
}


def _module(path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth of the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = {_module(p): p for p in PKG.rglob("*.py")}
    return {n: {m for m in _imports(p) if m in modules and m != n} for n, p in modules.items()}


def _folder(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def _floor() -> dict[str, int]:
    return {f: i for i, fl in enumerate(FLOORS) for f in fl}


def test_every_folder_has_a_floor():
    folders = {_folder(m) for m in _graph() if m != "medcae"}
    assert folders <= set(_floor()), f"place these on a floor: {sorted(folders - set(_floor()))}"


def test_folders_import_only_downwards():
    floor = _floor()
    bad = sorted(
        f"{src} -> {dst}"
        for src, deps in _graph().items()
        for dst in deps
        if src != "medcae"
        and dst != "medcae"
        and _folder(src) != _folder(dst)
        and floor[_folder(dst)] >= floor[_folder(src)]
    )
    assert not bad, f"imports that run upwards or sideways between folders: {bad}"


def test_nothing_below_the_ray_layer_imports_ray():
    floor = _floor()
    bad = {}
    for path in PKG.rglob("*.py"):
        name = _module(path)
        if name == "medcae" or floor[_folder(name)] >= RAY_FROM:
            continue
        hits = {m for m in _imports(path) if m == "ray" or m.startswith("ray.")}
        if hits:
            bad[name] = sorted(hits)
    assert not bad, f"modules below distributed/ importing Ray: {bad}"


def test_serving_imports_ray_only_in_the_serve_app():
    users = {
        _module(p)
        for p in (PKG / "serving").rglob("*.py")
        if any(m == "ray" or m.startswith("ray.") for m in _imports(p))
    }
    assert users == {"medcae.serving.app"}


def test_the_ray_layer_imports_run_one_way():
    level = {f"medcae.distributed.{m}": i for i, ms in enumerate(RAY_LAYER) for m in ms}
    graph = _graph()
    known = {m for m in graph if m.startswith("medcae.distributed.")}
    assert known <= set(level), f"place these modules on a floor: {sorted(known - set(level))}"
    upward = [(s, d) for s in known for d in graph[s] if d in level and level[d] >= level[s]]
    assert not upward, f"imports that run upwards or sideways in the Ray layer: {upward}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("folder", list(IMPORTS_WITHOUT_RAY))
def test_imports_without_ray(folder):
    """Importing these modules in a fresh interpreter loads no Ray (so never starts one), and
    ``medcae.data`` alone none of its lazy dependencies either."""
    modules, unloaded = IMPORTS_WITHOUT_RAY[folder]
    code = (
        f"import sys, {', '.join(modules)}; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {unloaded!r}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"

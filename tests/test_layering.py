"""The house's floors: the core never imports the Ray layer, and imports only run downwards.

Every ``import`` counts, including the ones inside functions, so a cycle cannot hide behind a
lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "medcae"

#: Floors of the Ray layer, lowest first; a module may import only from lower floors.
RAY_FLOORS = [
    {"medcae.distributed.runtime"},
    {"medcae.distributed.extract"},
    {"medcae.distributed.store"},
    {"medcae.distributed.train", "medcae.distributed.predict"},
    {"medcae.distributed.pipeline"},
    {"medcae.distributed.tune", "medcae.distributed.evaluate", "medcae.distributed.study"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth of the file."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return graph


#: The command line sits on top with the jobs: it may reach the job layer (lazily).
CLI = {"medcae.cli", "medcae.errors"}


def _is_core(name: str) -> bool:
    return not name.startswith(("medcae.distributed", "medcae.jobs")) and name not in CLI


def test_core_never_imports_ray_or_the_ray_layer():
    bad = {}
    for path in PKG.rglob("*.py"):
        name = _module_name(path)
        if not _is_core(name):
            continue
        hits = {
            m
            for m in _imports(path)
            if m == "ray" or m.startswith(("ray.", "medcae.distributed", "medcae.jobs", "serve"))
        }
        if hits:
            bad[name] = sorted(hits)
    assert not bad, f"core modules importing the Ray layer: {bad}"


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


def test_ray_layer_imports_run_one_way():
    floor = {m: i for i, mods in enumerate(RAY_FLOORS) for m in mods}
    graph = _graph()
    known = {m for m in graph if m.startswith("medcae.distributed.")}
    assert known <= set(floor), f"place these modules on a floor: {sorted(known - set(floor))}"
    upward = [
        (src, dst)
        for src in known
        for dst in graph[src]
        if dst in floor and floor[dst] >= floor[src]
    ]
    assert not upward, f"imports that run upwards or sideways in the Ray layer: {upward}"
    # The job layer sits on top: nothing below imports it.
    assert not [
        s for s, d in graph.items() if s in known and any(x.startswith("medcae.jobs") for x in d)
    ]

"""A search never reads the test split: its trials name only train, unlabeled and val.

The trials run in Ray workers, out of a test's sight, so this reads their code: every split a
trial (or a helper of the same module it calls) names, as a string constant.
"""

from __future__ import annotations

import ast

from helpers import ROOT

TUNE = ROOT / "medcae" / "distributed" / "tune.py"


def _functions() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(TUNE.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def _reached(name: str, functions: dict[str, ast.FunctionDef]) -> set[str]:
    """``name`` and every function of the module it calls, transitively."""
    seen, todo = set(), [name]
    while todo:
        fn = todo.pop()
        if fn in seen or fn not in functions:
            continue
        seen.add(fn)
        calls = [n.func for n in ast.walk(functions[fn]) if isinstance(n, ast.Call)]
        todo += [c.id for c in calls if isinstance(c, ast.Name)]
    return seen


def test_trials_name_no_test_split():
    functions = _functions()
    reached = _reached("trial", functions)
    assert {"trial", "cae_maps"} <= reached
    strings = {
        n.value
        for fn in reached
        for n in ast.walk(functions[fn])
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    assert {"train", "unlabeled", "val"} <= strings
    assert "test" not in strings, sorted(reached)
    # The test split is read by finalize, after the trials, for the best one only.
    after = {n.value for n in ast.walk(functions["finalize"]) if isinstance(n, ast.Constant)}
    assert "test" in after

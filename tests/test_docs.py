"""The documentation's pointers at tests point at tests that exist.

The README and the guides back their claims with ``tests/<file>.py`` or
``tests/<file>.py::test_name``; a renamed or deleted test must not leave a claim pointing
at nothing.
"""

from __future__ import annotations

import ast
import re

import pytest
from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
POINTER = re.compile(r"tests/[\w/]+\.py(?:::\w+)?")


def _pointers() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for m in POINTER.finditer(doc.read_text()):
            found.append((doc.relative_to(ROOT).as_posix(), m.group(0)))
    return found


def test_the_guides_point_at_tests():
    assert len(_pointers()) >= 20  # the check below is not vacuous


@pytest.mark.parametrize(("doc", "pointer"), _pointers(), ids=lambda v: v)
def test_each_pointer_names_an_existing_test(doc, pointer):
    path, _, name = pointer.partition("::")
    file = ROOT / path
    assert file.is_file(), f"{doc} points at {path}, which does not exist"
    if name:
        tree = ast.parse(file.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"{doc} points at {pointer}: no test {name} in {path}"

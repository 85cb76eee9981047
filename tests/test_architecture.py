"""The layout keeps its promises: every import inside a function says why it is not at the
top, in a comment on the line before it (or before the block of imports it starts). The
import contract itself runs in `make lint`."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

SOURCES = [ROOT / "testruns", ROOT / "project", ROOT / "tests", ROOT / "bench"]


def imports_inside_functions(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    found.append((inner.lineno, ast.unparse(inner)))
    return found


def test_every_import_inside_a_function_has_a_comment_saying_why():
    unexplained = []
    for source in SOURCES:
        for path in sorted(source.rglob("*.py")):
            if "migrations" in path.parts:
                continue
            lines = path.read_text().splitlines()
            for lineno, statement in imports_inside_functions(path):
                before = lineno - 2
                while before >= 0 and lines[before].lstrip().startswith(("from ", "import ")):
                    before -= 1  # a block of imports shares the comment above it
                if before < 0 or not lines[before].strip().startswith("#"):
                    unexplained.append(f"{path.relative_to(ROOT)}:{lineno}: {statement}")
    assert unexplained == [], "\n".join(unexplained)

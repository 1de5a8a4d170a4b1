"""The stages only look down: the store imports nothing from the models stage."""

from __future__ import annotations

import ast
from pathlib import Path

STORE = Path(__file__).resolve().parents[1] / "geomap" / "store"


def test_the_store_imports_nothing_from_models():
    found = []
    for path in STORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.startswith("geomap.models")]
    assert found == []


REPORT = STORE.parent / "report"


def test_no_report_function_is_longer_than_80_lines():
    long = []
    for path in REPORT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.name}:{node.name}")
    assert long == []


def test_the_report_path_imports_no_torch():
    """A report reads the store: rendering one needs neither torch nor transformers (a cold CLI stays fast)."""
    import subprocess
    import sys

    code = ("import sys, geomap.report.api, geomap.report.data, geomap.report.run_data, geomap.cli.report_cmds; "
            "print(sorted(m for m in ('torch', 'transformers', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"

"""Module boundaries, read from the source: no module imports another module's private name."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _private_imports(path: Path) -> list[str]:
    """``from x import _name`` and ``x._name`` uses of another geomap module's private names in one file."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("geomap"):
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and node.module != module:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} from {node.module} import {alias.name}")
    return found


def test_no_module_imports_a_private_name_of_another():
    found = [hit for path in sorted((ROOT / "geomap").rglob("*.py")) for hit in _private_imports(path)]
    assert not found, "\n".join(found)


def test_the_check_sees_a_private_import(tmp_path):
    fake = ROOT / "geomap" / "_probe_private_import.py"
    try:
        fake.write_text("from geomap.store.sql import _cell\n")
        assert _private_imports(fake) == ["geomap/_probe_private_import.py:1 from geomap.store.sql import _cell"]
    finally:
        fake.unlink()

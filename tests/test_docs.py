"""The user guide documents every table, view and column of the store's schema (docs/schema.md)."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb

from geomap.store.db import ensure_schema

ROOT = Path(__file__).resolve().parents[1]


def readme_sections() -> dict[str, str]:
    """The schema reference (docs/schema.md): ``### `name` `` headings → the text under each."""
    reference = (ROOT / "docs" / "schema.md").read_text(encoding="utf-8")
    parts = re.split(r"^### `(\w+)`.*$", reference, flags=re.MULTILINE)
    return {name: body.split("\n## ", 1)[0] for name, body in zip(parts[1::2], parts[2::2])}


def test_every_table_view_and_column_is_documented(tmp_path):
    con = duckdb.connect(str(tmp_path / "s.duckdb"))
    ensure_schema(con, 8)
    relations = con.execute("SELECT table_name, table_type FROM information_schema.tables "
                            "WHERE table_schema = 'main' ORDER BY table_name").fetchall()
    sections = readme_sections()
    assert {"states", "trajectory", "journey"} <= {name for name, _ in relations}
    missing = []
    for name, kind in relations:
        body = sections.get(name)
        if body is None:
            missing.append(f"{kind.lower()} {name}")
            continue
        columns = [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                             "WHERE table_name = ? ORDER BY ordinal_position", [name]).fetchall()]
        missing += [f"{name}.{c}" for c in columns if f"`{c}`" not in body]
    assert not missing, f"undocumented in docs/schema.md: {missing}"
    extra = set(sections) - {name for name, _ in relations}
    assert not extra, f"docs/schema.md documents relations the schema does not have: {extra}"


def test_every_file_the_architecture_names_is_where_it_says():
    """A file named in docs/architecture.md (`x.py`, `store/schema.sql`, `templates/...`) exists under that name."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    names = set(re.findall(r"`([\w/.\-]+\.(?:py|sql|j2|toml|md|css|js))`", text))
    files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
             if p.is_file() and not {".venv", ".git", "data", "reports"} & set(p.relative_to(ROOT).parts)]
    missing = sorted(n for n in names if not any(f == n or f.endswith("/" + n) for f in files))
    assert len(names) > 50 and not missing, missing

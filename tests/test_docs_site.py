"""The user guide builds as a static site, offline and strict (a broken link or anchor fails), and the README stays
a few screens long, pointing into it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "sql.html").is_file()
    page = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=\"https?://", page)  # the site loads no script from the network


def test_every_guide_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []


def test_the_readme_is_a_few_screens_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    targets = re.findall(r"\]\(((?:docs/)[^)#]+)(?:#[^)]*)?\)", text)
    assert targets and all((ROOT / t).exists() for t in targets), [t for t in targets if not (ROOT / t).exists()]


def test_generated_text_is_current():
    """The command reference (every --help) and the refusals the SQL page quotes are what the code prints now."""
    pytest.importorskip("cogapp")
    done = subprocess.run([sys.executable, "-m", "cogapp", "--check", "-P", "-I", ".", "docs/cli.md", "docs/sql.md"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    fix = "regenerate: cog -r -P -I . docs/cli.md docs/sql.md"
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:] + "\n" + fix

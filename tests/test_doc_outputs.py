"""Docs that stay true: every `geomap sql` shown with its output in the README and the SQL guide runs against the
store `make run` builds (one build, shared), and prints exactly what the page shows.

The blocks are found by Sybil's Markdown lexer; a block's ``$ geomap sql "..."`` lines are the commands, the lines
under each are its expected output. A number changed in a documented table fails this test.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/sql.md"]

sybil = pytest.importorskip("sybil")


def _commands(source: str) -> list[tuple[str, list[str]]]:
    """``(command, expected output lines)`` for each ``$ geomap sql`` line of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in source.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line.rstrip())
    # refusals ("error: ...") are quoted from the code by cog and checked by test_docs_site
    return [(c, lines) for c, lines in out
            if c.startswith("geomap sql ") and lines and not lines[0].startswith("error:")]


def _regions(document):
    from sybil import Region
    from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer

    for region in RawFencedCodeBlockLexer()(document):
        commands = _commands(str(region.lexemes["source"]))
        if commands:
            yield Region(region.start, region.end, parsed=commands, evaluator=_evaluate)


def _evaluate(example) -> str | None:
    """Run each command of the block on the demo store; a difference is the failure's message."""
    from click.testing import CliRunner

    from geomap.cli import cli

    store = example.namespace["store"]
    for command, expected in example.parsed:
        args = shlex.split(command)[1:] + ["--db", str(store)]
        got = CliRunner().invoke(cli, args)
        lines = [line.rstrip() for line in got.output.rstrip("\n").splitlines()]
        if got.exit_code != 0 or lines != expected:
            shown = "\n".join(expected)
            return f"{command}\n--- the page shows:\n{shown}\n--- the command prints:\n{got.output}"
    return None


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    """The store `make run` builds (pipelines/journey.toml, its continuations included), without the reports."""
    db = tmp_path_factory.mktemp("demo") / "geomap.duckdb"
    done = subprocess.run([sys.executable, "-m", "geomap", "run", "pipelines/journey.toml", "--no-reports", "--db",
                           str(db)], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    return db


def examples(page: str):
    from sybil import Document

    document = Document.parse(str(ROOT / page), _regions)
    return list(document.examples())


def test_pages_show_sql_with_output():
    counts = {page: len(examples(page)) for page in PAGES}
    assert all(counts.values()), counts  # the lexer finds the console blocks (a test that cannot pass vacuously)


@pytest.mark.real
@pytest.mark.parametrize("page", PAGES)
def test_documented_sql_prints_what_the_page_shows(demo_store, page):
    failures = []
    for example in examples(page):
        example.namespace["store"] = demo_store
        try:
            example.evaluate()
        except sybil.example.SybilFailure as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)

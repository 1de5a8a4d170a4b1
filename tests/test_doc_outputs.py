"""Docs that stay true: every command block of the README and of every guide page runs against the store `make run`
builds (one build, shared), or is marked illustrative in the page with a reason.

The blocks are found by Sybil's Markdown lexer. A command block is a fenced block with a ``$ `` line, a shell block
(``sh``, ``bash``, no info string) whose lines are commands (``geomap``, ``make``, ``pip``, ``curl``, ...), or a
Python block that imports geomap. Each one is either

- executed: a ``$ geomap ...`` line runs (in-process, from a folder whose ``data/geomap.duckdb`` is the demo store,
  so the commands run exactly as written) and prints exactly the lines under it (``...`` stands for any lines; an
  ``error: ...`` line is compared with stderr); a shell block's ``geomap`` lines must each succeed; a Python block
  runs, and each ``expression  # literal`` line (``j.stream.resid.shape  # (19, 4, 640)``) must equal its literal;
- the command that builds the demo store itself, marked ``<!-- doc: demo-store -->`` right above the fence; or
- marked ``<!-- doc: illustrative: REASON -->`` right above the fence (a visible reason, such as "takes minutes on
  CPU" or "output depends on the clock").

A block that is none of these fails `test_every_command_block_is_executed_or_marked`; a number changed in a
documented output fails `test_documented_commands_print_what_the_page_shows`. The pages run in a fixed order on the
one store (README first, then the guide alphabetically), the order a reader following them would run them in: an
id that a page's commands create (a decision, a generation's prompt) is the one that order gives.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
DEMO = "geomap run pipelines/journey.toml"  # what `make run` runs; the fixture builds the store with it
MARK = re.compile(r"<!--\s*doc:\s*(illustrative|demo-store)\b:?\s*(.*?)\s*-->\s*$", re.S)
LITERAL = re.compile(r"^\s*(\([^)]*\)|\[[^\]]*\]|-?\d[\d._]*|'[^']*'|\"[^\"]*\"|True|False|None)(?=[\s:,;]|$)")
SHELL_INFOS = ("", "sh", "bash", "shell", "console")
COMMAND = re.compile(r"^(geomap|make|pip|curl|ray|\.|source)(\s|$)")

sybil = pytest.importorskip("sybil")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page: where it is, its info string, its text and the marker above it."""

    page: str
    line: int
    info: str
    source: str
    mark: tuple[str, str] | None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def kind(self) -> str | None:
        """``console``, ``shell``, ``python``, or None for a block that holds no command."""
        lines = self.source.splitlines()
        if any(line.startswith("$ ") for line in lines):
            return "console"
        if self.info in SHELL_INFOS and any(COMMAND.match(line) for line in lines):
            return "shell"
        if self.info in ("python", "py") and re.search(r"^\s*(from|import) geomap", self.source, re.M):
            return "python"
        return None

    def commands(self) -> list[str]:
        """A shell block's commands: comments dropped, ``\\`` continuations joined."""
        joined = re.sub(r"\\\n\s*", " ", self.source)
        return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def blocks(page: str) -> list[Block]:
    """Every fenced block of ``page`` (Sybil's lexer), with the marker comment on the line just above it."""
    from sybil import Document
    from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer

    text = (ROOT / page).read_text(encoding="utf-8")
    out = []
    lexer = RawFencedCodeBlockLexer(info_pattern=re.compile(r"(?P<info>[^\n]*)$\n", re.MULTILINE))
    for region in lexer(Document(text, str(ROOT / page))):
        above = text[:region.start].rstrip("\n")
        comment = above[above.rfind("<!--"):] if above.endswith("-->") else ""
        found = MARK.match(comment)
        info = str(region.lexemes.get("info") or "").strip()
        out.append(Block(page, text.count("\n", 0, region.start) + 1, info, str(region.lexemes["source"]),
                         (found.group(1), found.group(2)) if found else None))
    return out


def command_blocks(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.kind is not None]


def served(block: Block) -> bool:
    """A console block of ``curl`` calls to the server `geomap serve` starts (localhost:8000)."""
    commands = re.findall(r"^\$ (.*)$", block.source, re.M)
    return block.kind == "console" and bool(commands) and all(c.startswith("curl -s localhost:8000/") for c in commands)


def unexecutable(block: Block) -> str | None:
    """Why ``block`` cannot be executed as it stands (None when it can)."""
    if served(block):
        return None
    if block.kind == "console":
        other = [c for c in re.findall(r"^\$ (.*)$", block.source, re.M) if not c.startswith("geomap ")]
        return f"it runs {other[0]!r}, not geomap" if other else None
    if block.kind == "shell":
        other = [c for c in block.commands() if not c.startswith("geomap ")]
        return f"it runs {other[0]!r}, not geomap" if other else None
    return None


# ---- the checks that need no store -------------------------------------------------------------------------------


def test_every_command_block_is_executed_or_marked():
    problems = []
    for page in PAGES:
        for block in command_blocks(page):
            if block.mark and block.mark[0] == "illustrative":
                if not block.mark[1]:
                    problems.append(f"{block.where}: an illustrative block says why (<!-- doc: illustrative: WHY -->)")
            elif block.mark and block.mark[0] == "demo-store":
                if [shlex.split(c, comments=True) for c in block.commands()] != [shlex.split(DEMO)]:
                    problems.append(f"{block.where}: marked demo-store but does not run {DEMO!r}")
            elif (why := unexecutable(block)) is not None:
                problems.append(f"{block.where}: neither executed nor marked: {why}")
    assert not problems, "\n".join(problems)


def test_the_pages_hold_blocks_of_every_kind():
    """The lexer finds them (so this cannot pass vacuously): console, shell and Python blocks, some run, some not."""
    found = [b for page in PAGES for b in command_blocks(page)]
    assert {b.kind for b in found} == {"console", "shell", "python"}
    assert sum(1 for b in found if b.mark is None) > 20 and any(b.mark for b in found)


# ---- executing them on the demo store ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    """A folder whose ``data/geomap.duckdb`` is the store `make run` builds (continuations included, no reports)."""
    home = tmp_path_factory.mktemp("demo")
    db = home / "data" / "geomap.duckdb"
    done = subprocess.run([sys.executable, "-m", "geomap", *shlex.split(DEMO)[1:], "--no-reports", "--db", str(db)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-2000:]
    return home


def matches(expected: list[str], got: list[str]) -> bool:
    """Whether ``got`` is ``expected`` line for line, where an ``...`` line stands for any run of lines."""
    if not expected:
        return not got
    if expected[0] == "...":
        return any(matches(expected[1:], got[i:]) for i in range(len(got) + 1))
    return bool(got) and got[0] == expected[0] and matches(expected[1:], got[1:])


def steps(block: Block) -> list[tuple[str, list[str]]]:
    """A console block's ``(command, the lines the page shows under it)``, trailing blank lines dropped."""
    out: list[tuple[str, list[str]]] = []
    for line in block.source.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line.rstrip())
    for _, expected in out:
        while expected and not expected[-1]:
            expected.pop()
    return out


def run_served(block: Block) -> list[str]:
    """Start `geomap serve` on the demo store (a free port standing in for 8000), run each curl line through bash."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = Path(f"serve-{port}.log").open("w+")  # a file, not a pipe: a full pipe would block the server
    server = subprocess.Popen([sys.executable, "-m", "geomap", "serve", "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    failures = []
    try:
        for _ in range(600):
            if server.poll() is not None or subprocess.run(["curl", "-sf", f"localhost:{port}/healthz"],
                                                           capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        assert server.poll() is None, Path(log.name).read_text()
        for command, expected in steps(block):
            got = subprocess.run(["bash", "-c", command.replace("localhost:8000", f"localhost:{port}")],
                                 capture_output=True, text=True, timeout=120)
            lines = [line.rstrip() for line in got.stdout.rstrip("\n").splitlines()]
            if got.returncode != 0 or not matches(expected, lines):
                failures.append(f"{block.where}: $ {command}\n--- the page shows:\n" + "\n".join(expected)
                                + f"\n--- the server answers:\n{got.stdout}{got.stderr}")
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
    return failures


def run_console(block: Block) -> list[str]:
    """Run each ``$ geomap`` line of a console block; the differences from the page, one message each."""
    from click.testing import CliRunner

    from geomap.cli import cli

    if served(block):
        return run_served(block)
    failures = []
    for command, expected in steps(block):
        if expected and expected[0].startswith("error:"):  # a refusal: the console entry point's one line, exit 2
            done = subprocess.run([sys.executable, "-m", "geomap", *shlex.split(command)[1:]], capture_output=True,
                                  text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
            status, out, err, text = done.returncode, done.stdout, done.stderr, done.stderr
            wanted = 2
        else:
            got = CliRunner().invoke(cli, shlex.split(command)[1:])
            status, out, err, text = got.exit_code, got.stdout, got.stderr, got.stdout
            err += f"\n{got.exc_info[1]!r}" if got.exc_info and status else ""
            wanted = 0
        lines = [line.rstrip() for line in text.rstrip("\n").splitlines()]
        if status != wanted or not matches(expected, lines):
            failures.append(f"{block.where}: $ {command}\n--- the page shows:\n" + "\n".join(expected)
                            + f"\n--- the command prints (exit {status}):\n{out}{err}")
    return failures


def run_shell(block: Block) -> list[str]:
    """Run each ``geomap`` line of a shell block; each must succeed."""
    from click.testing import CliRunner

    from geomap.cli import cli

    failures = []
    for command in block.commands():
        got = CliRunner().invoke(cli, shlex.split(command, comments=True)[1:])
        if got.exit_code != 0:
            failures.append(f"{block.where}: {command}\nexit {got.exit_code}: {got.stdout}{got.stderr}")
    return failures


def run_python(block: Block) -> list[str]:
    """Run a Python block; each ``expression  # literal`` line must equal its literal."""
    namespace: dict = {}
    try:
        exec(compile(block.source, block.where, "exec"), namespace)  # noqa: S102 - the page's own example
    except Exception as exc:  # noqa: BLE001 - reported as the block's failure
        return [f"{block.where}: the Python block raises {exc!r}"]
    failures = []
    for line in block.source.splitlines():
        expression, _, comment = line.partition("#")
        literal = LITERAL.match(comment)
        if not literal or not expression.strip():
            continue  # a comment in prose
        try:
            shown = ast.literal_eval(literal.group(1))
            value = eval(expression.strip(), namespace)  # noqa: S307 - the page's own example
        except SyntaxError:
            continue  # a statement, not an expression
        except Exception as exc:  # noqa: BLE001 - reported as the line's failure
            failures.append(f"{block.where}: {expression.strip()} raises {exc!r}")
            continue
        if (tuple(value) if isinstance(shown, tuple) else value) != shown:
            failures.append(f"{block.where}: {expression.strip()} is {value!r}, the page shows {shown!r}")
    return failures


RUNNERS = {"console": run_console, "shell": run_shell, "python": run_python}
_RAN: set[str] = set()  # pages whose commands ran on this module's demo store


def _run_page(page: str) -> list[str]:
    """Run a page's executed blocks on the demo store (once per store); the failures."""
    _RAN.add(page)
    failures = []
    for block in command_blocks(page):
        if block.mark is None:
            failures += RUNNERS[block.kind](block)
    return failures


@pytest.mark.real
@pytest.mark.parametrize("page", PAGES)
def test_documented_commands_print_what_the_page_shows(demo_home, page, monkeypatch):
    monkeypatch.chdir(demo_home)
    monkeypatch.delenv("GEOMAP_DB", raising=False)
    monkeypatch.setenv("COLUMNS", "120")
    for earlier in PAGES[:PAGES.index(page)]:  # a reader reaches this page after the ones before it: their commands
        if earlier not in _RAN:                  # changed the store (generate and intervene store prompts)
            _run_page(earlier)
    failures = _run_page(page)
    assert not failures, "\n\n".join(failures)
    assert os.getcwd() == str(demo_home)

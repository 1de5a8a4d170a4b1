"""Cold starts: what a user waits for before a command does anything, beside a bare ``python -c pass``.

Each figure is a fresh process, as a user's shell starts one: ``geomap sql`` on a stored store (it must import
neither torch nor transformers), and ``geomap run`` of a pipeline whose prompts are all stored (it answers from
the model's identity, without loading weights). The store and pipeline are built once, then every command is timed
in interleaved rounds, so the machine's load shifts all of them alike.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from geomap.bench.core import Figure, judged, median, rounds


def _command(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {done.stderr.strip()[-500:]}")


def cold_figures(model: str, texts: list[str], folder: Path, repeats: int) -> list[Figure]:
    """Seconds of a cold ``geomap sql`` and of a rerun with nothing new, beside ``python -c pass``.

    Args:
        model: The model of the pipeline (a preset, directory or hub id).
        texts: Prompts the pipeline stores once before the timed reruns.
        folder: Where the store, the prompt file and the pipeline go.
        repeats: Timed rounds.
    """
    work = folder / "cold"
    work.mkdir(parents=True, exist_ok=True)
    (work / "prompts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    (work / "cold.toml").write_text(f'name = "cold"\nmodel = "{model}"\nstore = "cold.duckdb"\n'
                                    '[[sources]]\npath = "prompts.txt"\n', encoding="utf-8")
    geomap = ("-m", "geomap")
    _command(*geomap, "run", "cold.toml", "--no-reports", cwd=work)  # stores the prompts: not timed
    times = rounds({
        "python": lambda: _command("-c", "pass", cwd=work),
        "sql": lambda: _command(*geomap, "sql", "SELECT count(*) FROM prompts", "--db", "cold.duckdb", cwd=work),
        "rerun": lambda: _command(*geomap, "run", "cold.toml", "--no-reports", cwd=work),
    }, repeats)
    bare = median(times["python"])
    note = f"fresh process, median of {repeats}; `python -c pass` takes {bare:.2f} s here"
    return [
        judged("cold start: python -c pass", bare, "s", note="the interpreter alone, for scale"),
        judged("cold start: geomap sql", median(times["sql"]), "s", "<= 0.7", note=note),
        judged("cold start: a rerun with nothing new (geomap run)", median(times["rerun"]), "s", "<= 2",
               note=f"{len(texts)} prompts all stored: no model load; " + note),
    ]

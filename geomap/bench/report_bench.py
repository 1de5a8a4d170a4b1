"""Report speed as a user meets it, beside a bare ``python -c pass``: three fresh-process figures on a stored demo.

- ``geomap report journey`` of a stored prompt, from a cold CLI (a fresh process per round), into a folder that
  already holds its continuation steps' pages (as ``reports/`` after ``make run``; the warm-up round writes them);
- the report part of ``make run``: ``geomap run`` of the demo pipeline when every prompt is stored (no model load),
  writing all its journey pages, continuation pages and run pages into an empty folder;
- a served journey page, cold: the first request for it to a freshly started ``geomap serve``.

The store is the one ``make run`` builds (its preconditions, the weight slice, the PCA maps and the vocabulary-wide
lookups, hold after that build). Rounds interleave, so the machine's load shifts every figure alike.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from geomap.bench.core import Figure, judged, median, rounds
from geomap.bench.load_bench import stop_server


def _command(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed: {done.stderr.strip()[-800:]}")


def _served_page(db: Path, page: str, work: Path) -> float:
    """Seconds from the request to the page's HTML, on a server started for it (its start is not counted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (work / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "geomap", "serve", "--db", str(db), "--host", "127.0.0.1",
                             "--port", str(port)], cwd=work, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 180
        while True:
            if proc.poll() is not None or time.time() > end:
                raise RuntimeError(f"the server did not start: {(work / 'serve.log').read_text()[-800:]}")
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=5):
                    break
            except OSError:
                time.sleep(0.2)
        t0 = time.perf_counter()
        while True:  # a page whose map is still queued answers 202: the wait counts
            with urllib.request.urlopen(f"{base}/reports/{page}", timeout=600) as r:
                body = r.read()
                if r.status == 200 and b"<html" in body:
                    return time.perf_counter() - t0
            time.sleep(0.1)
    finally:
        stop_server(proc)
        log.close()


def report_figures(db: Path, pipeline: Path, prompt_id: int = 1, repeats: int = 3) -> list[Figure]:
    """The three report figures on a stored demo (see the module docstring), medians of ``repeats`` rounds.

    Args:
        db: The demo's store, every prompt of ``pipeline`` stored (``make run`` builds it).
        pipeline: The demo's pipeline file (its ``reports`` folder is written into a fresh folder per round).
        prompt_id: The journey page timed alone and served.
        repeats: Rounds (the pipeline's reports are written once per round too).
    """
    db, pipeline = db.resolve(), pipeline.resolve()
    with tempfile.TemporaryDirectory(prefix="geomap-report-bench-") as tmp:
        work = Path(tmp)

        def fresh(name: str) -> Path:
            folder = work / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            return folder

        out = fresh("journey")

        def journey() -> None:  # into one folder: its continuation steps' pages, written by the warm-up, stay
            _command("-m", "geomap", "report", "journey", "--prompt", str(prompt_id), "--db", str(db),
                     "--out", str(out / f"journey-{prompt_id}.html"), cwd=out)

        served: list[float] = []
        times = rounds({
            "python": lambda: _command("-c", "pass", cwd=work),
            "journey": journey,
            "pipeline": lambda: _command("-m", "geomap", "run", str(pipeline), "--db", str(db), cwd=fresh("run")),
            "served": lambda: served.append(_served_page(db, f"journey-{prompt_id}.html", fresh("serve"))),
        }, repeats)
        pages = len(list((work / "run" / "reports").glob("*.html")))
    bare = median(times["python"])
    note = f"fresh process, median of {repeats}; `python -c pass` takes {bare:.2f} s here"
    return [
        judged("cold start: python -c pass", bare, "s", note="the interpreter alone, for scale"),
        judged("report: geomap report journey, cold CLI", median(times["journey"]), "s", "<= 1.5",
               note=f"prompt {prompt_id} of a stored demo, into a folder that holds its steps' pages (as after "
                    "make run); " + note),
        judged("report: the report part of make run", median(times["pipeline"]), "s", "<= 60",
               note=f"geomap run of a stored pipeline into an empty folder: {pages} pages, no model load; " + note),
        judged("report: a served journey page, cold", median(served[-repeats:]), "s", "<= 2",
               note=f"first request for journey-{prompt_id}.html after geomap serve starts (start not counted); "
                    f"median of {repeats} fresh servers"),
    ]

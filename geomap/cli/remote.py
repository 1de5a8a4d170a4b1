"""CLI commands through a running ``geomap serve`` that owns the store (instead of failing on its file lock)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from geomap.ingest.summary import RunSummary

from geomap.serve.client import Client, find_server


def server_for(db_path: Path) -> Client | None:
    """The server owning ``db_path``, announced on stderr, or None."""
    client = find_server(db_path)
    if client is not None:
        click.echo(f"geomap serve owns {db_path}: going through {client.url}", err=True)
    return client


def refuse_if_served(db_path: Path, command: str, instead: str = "") -> None:
    """Refuse, in one line naming the server, a command that needs the store's file while geomap's server owns it.

    Raises:
        StoreLockedError: A running ``geomap serve`` owns ``db_path``.
    """
    from geomap.store.db import StoreLockedError

    client = find_server(db_path)
    if client is not None:
        raise StoreLockedError(served_message(db_path, client, command, instead))


def served_message(db_path: Path, client: Client, command: str, instead: str = "") -> str:
    """One line: geomap's own server owns the store, where it is, and what to do."""
    pid = f" (pid {client.pid})" if client.pid is not None else ""
    stop = f"kill {client.pid}" if client.pid is not None else "Ctrl-C in its terminal"
    todo = instead or f"stop the server ({stop}) and run it again, or copy the store and give --db"
    return (f"{db_path} is served by geomap's own server at {client.url}{pid}, which holds the store's file, and "
            f"`geomap {command}` does not go through it: {todo}.")


def run_job(client: Client, prompts, model: str, capture, vector_dtype: str, batch_size: int, name: str,
            progress: bool = True, engine=None) -> tuple[RunSummary, dict]:
    """Submit prompts as a server job, follow its progress, and return its summary and final job view.

    ``engine`` (an `EngineConfig`): ``kind`` and ``workers`` go to the server, which starts Ray on its own machine.
    """
    from tqdm import tqdm

    body = {"prompts": [{"text": p.text, "tags": list(p.tags), "source_id": p.source_id} for p in prompts],
            "model": model, "capture": json.loads(capture.to_json()), "vector_dtype": vector_dtype,
            "batch_size": batch_size, "name": name}
    if engine is not None and engine.kind == "ray":
        body["engine"] = {"kind": "ray", "workers": engine.workers}
    job = client.request("POST", "/runs", body)
    run_id = job["run_id"]
    where = "server, ray" if "engine" in body else "server"
    bar = tqdm(total=len(prompts), unit="prompt", desc=f"run {run_id} ({where})", disable=not progress,
               dynamic_ncols=True)

    def show(view: dict) -> None:
        p = view.get("progress") or {}
        bar.total = p.get("total", bar.total) + p.get("skipped", 0)
        bar.n = p.get("stored", 0) + p.get("failed", 0) + p.get("skipped", 0)
        bar.refresh()

    state = client.wait_run(run_id, show)
    bar.close()
    view = state.get("job") or {}
    if view.get("status") != "done":
        from geomap.errors import GeomapError

        raise GeomapError(f"run {run_id} failed on the server: {view.get('error')}")
    p = view["progress"]
    from geomap.ingest.runs import RunSummary  # torch-free until a job runs (a report's CLI stays fast)

    recorded = p.get("recorded", True)  # False: every prompt was stored before, and the server kept no empty run
    run_id = p.get("run_id") or run_id  # the job took up a killed run of this command: that run's id
    summary = RunSummary(run_id if recorded else None, p.get("stored", 0), p.get("skipped", 0), p.get("failed", 0),
                         p.get("tokens", 0), float(p.get("seconds", 0.0)), tuple(p.get("failures", ())))
    return summary, view


def fetch_report(client: Client, page: str, out: Path) -> Path:
    """Fetch a rendered report page from the server and write it (a single file) to ``out``."""
    from geomap.report.pages import write_index

    html = client.page(f"/reports/{page}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    write_index(out.parent)
    return out

"""The server's report pages: rendered from the store as single files; map fits run as background jobs."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse

from geomap.errors import GeomapError
from geomap.report.render import csp
from geomap.serve.fits import FitsBusy
from geomap.serve.routes import server_of

router = APIRouter()
PAGE = re.compile(r"^(?:journey-(?P<j>\d+)(?:-p(?P<pos>\d+))?|run-(?P<run>\d+)|compare-(?P<a>\d+)-(?P<b>\d+)"
                  r"|(?P<index>index))\.html$")


MAX_ID = 2**31 - 1


def _page(server, page: str) -> dict:
    """Parse and validate a report page name against the store, cheaply, before any model or report work.

    Returns:
        The page's parts (``j``, ``pos``, ``run``, ``a``, ``b``, ``index``) and ``runs``: the runs whose maps it draws.
    """
    match = PAGE.match(page)
    if not match:
        raise HTTPException(404, f"No report page {page!r}: use index.html, journey-<id>.html, "
                                 "journey-<id>-p<pos>.html, run-<id>.html or compare-<a>-<b>.html.")
    g = {k: (int(v) if v and v.isdigit() else v) for k, v in match.groupdict().items()}
    runs: list[int] = []
    if g["run"] is not None:
        found = server.rows("SELECT id FROM runs WHERE id = ?", min(g["run"], MAX_ID + 1))
        if g["run"] > MAX_ID or not found:
            raise HTTPException(404, f"No run with id {g['run']}.")
    for key in ("j", "a", "b"):
        if g[key] is None:
            continue
        found = server.rows("SELECT run_id, n_tokens FROM prompts WHERE id = ? AND status = 'done'",
                            min(g[key], MAX_ID + 1))
        if g[key] > MAX_ID or not found:
            raise HTTPException(404, f"No stored prompt with id {g[key]}.")
        if key == "j" and g["pos"] is not None and not 0 <= g["pos"] < (found[0]["n_tokens"] or 0):
            raise HTTPException(404, f"Prompt {g['j']} has positions 0..{(found[0]['n_tokens'] or 1) - 1}, "
                                     f"not {g['pos']}.")
        runs.append(int(found[0]["run_id"]))
    g["runs"] = sorted(set(runs))
    return g


def _render(server, g: dict) -> str:
    from geomap.report.api import compare_report, journey_report, run_report

    db = server.store
    with server.report_lock:
        if g["index"]:
            return _index(server)
        if g["run"] is not None:
            first = server.rows("SELECT min(id) AS id FROM prompts WHERE run_id = ? AND status = 'done'", g["run"])
            _slices(server, [first[0]["id"]] if first and first[0]["id"] is not None else [])
            return run_report(db, g["run"], single_file=True, write=False, served=True).html
        _slices(server, [p for p in (g["j"], g["a"], g["b"]) if p is not None])
        if g["j"] is not None:
            return journey_report(db, g["j"], single_file=True, write=False, pos=g["pos"], ready=True,
                                  served=True).html
        return compare_report(db, g["a"], g["b"], single_file=True, write=False, ready=True, served=True).html


def _slices(server, prompt_ids: list[int]) -> None:
    """Write the weight slice of an older store's model once (new stores get it at ingestion): pages only read."""
    from geomap.analysis.weights import has_weights, slice_folder

    for pid in prompt_ids:
        sha = server.rows("SELECT r.weights_sha256 AS sha FROM prompts p JOIN runs r ON r.id = p.run_id "
                          "WHERE p.id = ?", pid)[0]["sha"]
        if not has_weights(server.store.path, sha):
            from geomap.models.weights_slice import write_slice  # imports torch: only for an older store

            write_slice(server.model_for_prompt(pid), slice_folder(server.store.path, sha))


def _waiting(server, runs: list[int]) -> HTMLResponse | None:
    """Queue the map fits a page needs; a page saying so (202, reloading itself) while any is pending."""
    from html import escape

    from geomap.serve.fits import missing

    pending = []
    for run_id in runs:
        methods = missing(server.rows, run_id)
        if methods:
            fit = server.fits.request(run_id, methods)
            if fit.status == "failed":
                raise HTTPException(500, f"Fitting the maps of run {run_id} failed: {fit.error}")
            if fit.status == "done":  # it ended meanwhile, or fitted maps that are not in the store
                if missing(server.rows, run_id):
                    raise HTTPException(500, f"The maps of run {run_id} were fitted but are not in the store; see "
                                             "the server log.")
                continue
            pending.append(f"run {run_id}: {', '.join(m.upper() for m in methods)} ({fit.status})")
    if not pending:
        return None
    body = ("<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=5><title>geomap: fitting maps</title>"
            "<p>This page draws its run's maps, which the server is fitting now in the background: "
            + escape("; ".join(pending)) + ". The page reloads itself every 5 seconds until they are stored.</p>")
    return HTMLResponse(body, status_code=202, headers={"retry-after": "5", "content-security-policy": csp(True)})


def _index(server) -> str:
    from geomap.report.api import store_links
    from geomap.report.render import render

    links = store_links(server.store)
    runs = server.rows("SELECT id, pipeline, model FROM runs WHERE status = 'done' ORDER BY id")
    prompts = server.rows("SELECT id, text FROM prompts WHERE status = 'done' ORDER BY id LIMIT 5000")
    entries = [{"href": f"run-{r['id']}.html", "title": f"run {r['id']} ({r['pipeline']}, {r['model']})"}
               for r in runs]
    entries += [{"href": href, "title": f"journey of prompt {p['id']}: {p['text'][:80]}"}
                for p in prompts if (href := links.journey(p["id"]))]
    return render("index.html.j2", {"entries": entries, "served": True}, single_file=True, served=True)


@router.get("/reports/{page}", response_class=HTMLResponse, tags=["reports"])
async def get_report(request: Request, page: Annotated[str, Path(max_length=100, description=(
        "A page name: `index.html`, `journey-ID.html` (`journey-ID-pPOS.html` for one position), `run-ID.html` or "
        "`compare-ID-ID.html`."))]) -> HTMLResponse:
    """A report rendered from the store (pages link to each other by these names)."""
    server = server_of(request)
    try:
        parts = await run_in_threadpool(_page, server, page)
        waiting = await run_in_threadpool(_waiting, server, parts["runs"])
        if waiting is not None:
            return waiting
        html = await run_in_threadpool(_render, server, parts)
    except FitsBusy as exc:
        raise HTTPException(503, str(exc), headers={"retry-after": "30"}) from None
    except GeomapError as exc:
        status = exc.http_status
        raise HTTPException(status, str(exc)) from None
    return HTMLResponse(html, headers={"content-security-policy": csp(True)})


@router.get("/reports", include_in_schema=False)
def reports_root() -> RedirectResponse:
    """The index page (pages link each other by relative names, so it lives beside them)."""
    return RedirectResponse("/reports/index.html")


"""Report API: build a page from the store, write it under ``reports/``, show it inline in Jupyter."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from geomap.report.links import Links, in_folder, journey_name, run_name, served
from geomap.report.pages import journey_page, write_index, write_page
from geomap.store.handle import Store, StoreLike

DEFAULT_FOLDER = Path("reports")


@dataclass(frozen=True)
class Report:
    """A rendered report: its HTML, and the file it was written to (if any)."""

    html: str
    path: Path | None = None

    def _repr_html_(self) -> str:
        """Jupyter display: the page in a sandboxed iframe (its scripts run there, isolated from the notebook)."""
        return (f'<iframe sandbox="allow-scripts" style="width:100%;height:720px;border:1px solid #ddd" '
                f'srcdoc="{html.escape(self.html, quote=True)}"></iframe>')


page_name = journey_name


def store_links(store: StoreLike, folder: Path | None = None, planned: frozenset[str] = frozenset()) -> Links:
    """What a page may link to: in ``folder``, the pages there or ``planned``; without a folder, every page."""
    from geomap.analysis.page_reads import page_keys

    with Store.use(store, "r") as opened, opened.snapshot() as con:
        keys = page_keys(con)
    return served(keys) if folder is None else in_folder(keys, folder, planned)


def prepare(store: StoreLike, prompt_ids, loaded=None, load_model=None) -> None:
    """Satisfy what rendering these prompts' pages needs and does not write: the weight slice, the runs' PCA maps.

    Rendering itself only reads. The CLI (and the tests) call this first; a served store gets its maps from the
    server's fit queue and its slice when the server starts a report.

    Args:
        store: The store (a path opens one for the call).
        prompt_ids: The prompts whose pages (and runs' pages) are about to be rendered.
        loaded: A loaded model whose slice may be written if the store has none (older stores).
        load_model: Called with a `PromptInfo` to load its model when no slice is stored and ``loaded`` does not
            match; without it, a missing slice is a `StoreError` naming the fix.
    """
    from geomap.analysis import load, vocab_lookups
    from geomap.analysis.journey_reads import page_lookups
    from geomap.analysis.weights import weights_for

    with Store.use(store, "w", create=False) as opened:
        with opened.snapshot() as con:
            infos = {int(p): load.prompt_info(con, int(p)) for p in prompt_ids}
            mapped = {r for (r,) in con.execute("SELECT DISTINCT run_id FROM projections WHERE joint AND "
                                                "method = 'pca'").fetchall()}
        _prepare(opened, infos, mapped, loaded, load_model)
        with opened.snapshot() as con:
            lookups = page_lookups(con, sorted(infos))
        for sha, (picks, ids) in lookups.items():
            weights = weights_for(opened.path, sha)
            vocab_lookups.precompute(weights, picks, ids if weights.array("pos_embed") is None else [])


def _prepare(store: Store, infos: dict, mapped: set, loaded, load_model) -> None:
    from geomap.analysis.weights import has_weights, slice_folder, weights_for

    db_path = store.path
    for info in {i.weights_sha256: i for i in infos.values()}.values():
        if has_weights(db_path, info.weights_sha256):
            continue
        model = loaded if loaded is not None and loaded.weights_hash == info.weights_sha256 else None
        if model is None and load_model is not None:
            model = load_model(info)
        if model is None:
            weights_for(db_path, info.weights_sha256)  # raises, naming the fix
        from geomap.models.weights_slice import write_slice

        write_slice(model, slice_folder(db_path, info.weights_sha256))
    for info in {i.run_id: i for i in infos.values()}.values():
        if info.run_id not in mapped:
            from geomap.analysis.maps import project

            project(store, info.run_id, "pca", loaded=weights_for(db_path, info.weights_sha256))


def journey_report(store: StoreLike, prompt_id: int,
                   out: str | Path | None = None, single_file: bool = False, loaded=None,
                   write: bool = True, pos: int | None = None, linked: bool = True,
                   links: Links | None = None, ready: bool = False, served: bool = False,
                   index: bool = True, shared=None) -> Report:
    """The journey report of a stored prompt's token (default its last), from the store only.

    To report on a new text, store it first (`geomap.ingest.engine.store_text`).

    Args:
        store: The store (a path opens one for the call).
        prompt_id: A stored prompt.
        out: The HTML file (default ``reports/journey-<id>.html``).
        single_file: Inline the stylesheet and script instead of linking ``assets/`` beside the page.
        loaded: A loaded model, used only to write the store's weight slice when it has none (older stores).
        write: Write the file (and refresh the folder's ``index.html``).
        pos: The token's position (default: the last).
        linked: Also write the missing pages of the generation steps the page links to.
        links: What the page may link to (default: written, the pages beside it and its steps' pages; else all).
        ready: The preconditions (`prepare`) are known to hold, for its steps' pages too: render without checking.
        served: Rendered for a server (its policy lets the page call that server).
        index: Refresh the folder's ``index.html`` (a build of many pages does it once, at its end).
        shared: What the pages of a build read once (`geomap.report.shared.PageReads`; default: this page's own).
    """
    from geomap.report.data import journey_data

    target = (Path(out) if out else None) if write else None
    with Store.use(store, "r" if ready else "w", create=False) as opened:
        if not ready:
            prepare(opened, [prompt_id], loaded)
        if links is None:
            links = store_links(opened, None)
            if write:  # the pages beside it, and its generations' steps, which it writes below
                steps = frozenset(journey_name(p, s) for p, s in links.keys.steps_of([prompt_id])) if linked else ()
                links = in_folder(links.keys, target.parent if target else DEFAULT_FOLDER, frozenset(steps))
        data = journey_data(opened, prompt_id, pos=pos, links=links, shared=shared)
        page = journey_page(data, single_file, served)
        path = None
        if write:
            name = journey_name(prompt_id, None if data.prompt["is_last"] else data.prompt["pos"])
            path = write_page(page, target or DEFAULT_FOLDER / name, single_file, index=False)
            steps = [s for s in data.generations if s["href"]] if linked else []
            if steps and not ready:  # ready: the caller prepared its steps too (a pipeline's build)
                prepare(opened, {s["prompt_id"] for s in steps}, loaded)
            for step in steps:
                step_out = path.parent / journey_name(step["prompt_id"], step["pos"])
                if not step_out.exists():
                    journey_report(opened, step["prompt_id"], out=step_out, single_file=single_file,
                                   pos=step["pos"], linked=False, links=links, ready=True, index=False,
                                   shared=shared)
            if index:
                write_index(path.parent)
    return Report(page, path)


def run_report(store: StoreLike, run_id: int, out: str | Path | None = None, single_file: bool = False,
               loaded=None, write: bool = True, links: Links | None = None, served: bool = False,
               index: bool = True) -> Report:
    """One page for a whole run (default file ``reports/run-<id>.html``), from the store only.

    ``loaded``: a loaded model, used only to write the store's weight slice when it has none.
    """
    from geomap.report.render import render
    from geomap.report.run_data import run_data
    target = Path(out) if out else DEFAULT_FOLDER / run_name(run_id)
    with Store.use(store, "r" if loaded is None else "w", create=False) as opened:
        first = opened.query("SELECT min(id) FROM prompts WHERE run_id = ? AND status = 'done'", [run_id]).scalar()
        if first is not None and loaded is not None:
            prepare(opened, [first], loaded)
        if links is None:
            links = store_links(opened, target.parent if write else None)
        page = render("run.html.j2", run_data(opened, run_id, links=links), single_file, served=served)
    path = write_page(page, target, single_file, index=index) if write else None
    return Report(page, path)


def compare_report(store: StoreLike, first: int, second: int, out: str | Path | None = None,
                   single_file: bool = False, loaded=None, write: bool = True, ready: bool = False,
                   served: bool = False) -> Report:
    """Two journeys side by side (default file ``reports/compare-<a>-<b>.html``), from the store only."""
    from geomap.report.data import journey_data
    from geomap.report.render import render

    with Store.use(store, "r" if ready else "w", create=False) as opened:
        if not ready:
            prepare(opened, [first, second], loaded)
        data = {"a": journey_data(opened, first), "b": journey_data(opened, second),
                "cosines": _state_cosines(opened, first, second)}
    page = render("compare.html.j2", data, single_file, served=served)
    target = Path(out) if out else DEFAULT_FOLDER / f"compare-{first}-{second}.html"
    return Report(page, write_page(page, target, single_file) if write else None)


def _state_cosines(store: Store, first: int, second: int) -> list[dict]:
    """Per boundary, the cosine between the two prompts' residual states at their last positions."""
    import numpy as np

    from geomap.analysis import load

    with store.snapshot() as con:
        infos = [load.prompt_info(con, p) for p in (first, second)]
        out = []
        for layer in range(min(i.n_layers for i in infos) + 1):
            a, b = (load.state(con, i.id, layer, i.n_tokens - 1).astype(np.float64) for i in infos)
            out.append({"layer": layer, "cos": float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))})
        return out


def pipeline_reports(store: StoreLike, keys: list[str], folder: str | Path, loaded=None,
                     progress: bool = True, load_model=None, workers: int | None = 1) -> int:
    """Write the reports of a pipeline's prompts.

    A journey report for each stored prompt with one of these keys (existing files are kept) and for each step
    of their continuations, then the report of each of their runs, and the folder's index.

    Args:
        store: The store (a path: it is opened for preparing, then read by the workers).
        keys: The pipeline's prompt keys.
        folder: The reports folder.
        loaded: A loaded model, used only to write the weight slice of an older store that has none (`prepare`).
        progress: Show a progress bar.
        load_model: Loads a model for that, when ``loaded`` does not match (`prepare`).
        workers: Processes that render the journey pages; None: `geomap.report.build.workers_for` (one per core
            for a large build). More than one starts worker processes, which import the main module again (as
            multiprocessing's spawn does): a script that calls this must guard its top level with ``if __name__ ==
            "__main__":``; the CLI asks for None. A store passed open renders in this process.

    Returns:
        How many pages were written.
    """
    from geomap.report.build import render_journeys, workers_for
    from geomap.report.shared import PageReads

    folder = Path(folder)
    with Store.use(store, "w", create=False) as opened:
        with opened.snapshot() as con:
            rows = con.execute("SELECT id, run_id FROM prompts WHERE key IN (SELECT unnest(?)) AND status = 'done' "
                               "ORDER BY id", [list(keys)]).fetchall()
            steps = con.execute("""SELECT DISTINCT p.run_id FROM prompts p JOIN decisions d ON d.prompt_id = p.id
                                   AND d.source = 'generate' WHERE p.parent_id IN (SELECT unnest(?))""",
                                [[pid for pid, _ in rows]]).fetchall()
        links = store_links(opened, folder)
        ours = {pid for pid, _ in rows}
        prepare(opened, sorted(ours | {p for p, _ in links.keys.steps_of(ours)}), loaded, load_model)
        runs = sorted({run for _, run in rows} | {run for (run,) in steps})
        planned = {journey_name(p) for p in ours} | {journey_name(p, s) for p, s in links.keys.steps_of(ours)}
        links = in_folder(links.keys, folder, frozenset(planned | {run_name(r) for r in runs}))
        todo = [pid for pid in sorted(ours) if not (folder / journey_name(pid)).exists()]
        db_path = opened.path
        if isinstance(store, Store):
            workers = 1  # held open by the caller (for writing, maybe): no other process may open it
        elif workers is None:
            workers = workers_for(len(todo))
        if workers <= 1:
            written = _journeys_here(opened, todo, folder, links, PageReads(build=True), progress)
            written += _runs_here(opened, runs, folder, links)
    if workers > 1:  # the store is closed for writing here: the workers read it, read-only
        done = render_journeys(db_path, todo, folder, links, workers, progress) if todo else set()
        with Store.use(store, "r") as opened:
            rest = [pid for pid in todo if pid not in done]
            written = len(done) + _journeys_here(opened, rest, folder, links, PageReads(build=True), progress)
            written += _runs_here(opened, runs, folder, links)
    if written or folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_index(folder)
    return written


def _journeys_here(opened: Store, prompt_ids: list[int], folder: Path, links: Links, shared, progress: bool) -> int:
    """Write these prompts' journey pages (and their steps' pages) in this process; how many prompts."""
    from tqdm import tqdm

    for pid in tqdm(prompt_ids, unit="report", desc="reports", disable=not progress or not prompt_ids,
                    dynamic_ncols=True):
        journey_report(opened, pid, out=folder / journey_name(pid), links=links, ready=True, index=False,
                       shared=shared)
    return len(prompt_ids)


def _runs_here(opened: Store, runs: list[int], folder: Path, links: Links) -> int:
    """Write these runs' pages in this process; how many."""
    for run_id in runs:
        run_report(opened, run_id, out=folder / run_name(run_id), links=links, index=False)
    return len(runs)

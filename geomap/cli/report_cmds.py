"""Report commands: journey, run, compare and index pages under reports/."""

from __future__ import annotations

from pathlib import Path

import click

from geomap.cli.prompt_ids import prompt_option
from geomap.cli.store_cmds import db_option, store_path


def _fetched(path: Path) -> None:
    click.echo(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, rendered by the server as a single file); "
               f"index: {path.parent / 'index.html'}")


@click.group()
def report() -> None:
    """Write HTML reports (self-contained pages under reports/, listed in reports/index.html)."""


@report.command("journey")
@prompt_option(required=False)
@click.option("--text", default=None, help="A prompt to store (everything captured) and report on.")
@click.option("--pos", type=int, default=None, help="Token position (default: the last; e.g. a generation step).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file (default: reports/journey-<id>.html). Beside it geomap also writes assets/ (unless "
                   "--single-file) and refreshes its index.html listing the folder's reports; an index.html that "
                   "geomap did not write is never overwritten.")
@click.option("--single-file", is_flag=True, help="Inline the stylesheet and script (no assets/ folder).")
@db_option
def report_journey(prompt_id: int | None, text: str | None, pos: int | None, out: Path | None, single_file: bool,
                   db: Path | None) -> None:
    """The journey of a prompt's last token, section by section, with the store's numbers."""
    from geomap.cli import quiet_transformers
    from geomap.cli.remote import fetch_report, run_job, server_for
    from geomap.report.api import DEFAULT_FOLDER, journey_report, page_name

    if (prompt_id is None) == (text is None):
        raise click.UsageError("Give exactly one of --prompt ID or --text TEXT.")
    _not_the_store(db, out)
    if (client := server_for(store_path(db))) is not None:
        if prompt_id is None:
            from geomap.capture import CaptureConfig
            from geomap.models import DEFAULT_MODEL
            from geomap.store.writer import PromptSpec

            config = CaptureConfig(attn_positions="all", lens_positions="all")
            _, view = run_job(client, [PromptSpec(text)], DEFAULT_MODEL, config, "float32", 1, "report",
                              progress=False)
            prompt_id = view["progress"]["prompts"][0][0]
        page = page_name(prompt_id, pos)
        _fetched(fetch_report(client, page, out or DEFAULT_FOLDER / page))
        return
    if prompt_id is None:
        from geomap.ingest.engine import store_text

        quiet_transformers()
        prompt_id = store_text(store_path(db), text)
    _prepare(store_path(db), [prompt_id])
    done = journey_report(store_path(db), prompt_id, out, single_file, pos=pos)
    click.echo(f"wrote {done.path} ({len(done.html.encode()) / 1e3:.0f} kB); index: {done.path.parent / 'index.html'}")


def _not_the_store(db: Path | None, out: Path | None) -> None:
    """Refuse an ``--out`` that is the store's own or a device or pipe (`geomap.store.owned`), before anything runs."""
    from geomap.store.owned import refuse_output

    if out is not None:
        refuse_output(store_path(db), out)


def _prepare(db: Path, prompt_ids: list[int]) -> None:
    """What a report needs beyond reading (a PCA map; an older store's weight slice, which loads its model once)."""
    from geomap.report.api import prepare

    def load(info):
        from geomap.analysis.api import model_for
        from geomap.cli import quiet_transformers

        quiet_transformers()
        return model_for(info)

    prepare(db, prompt_ids, load_model=load)


def _prepare_run(db: Path, run_id: int) -> None:
    from geomap.store.handle import Store

    with Store.use(db, "r") as opened:
        first = opened.query("SELECT min(id) FROM prompts WHERE run_id = ? AND status = 'done'", [run_id]).scalar()
    if first is not None:
        _prepare(db, [first])


@report.command("run")
@click.option("--run", "run_id", type=int, required=True, help="Stored run id.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file (default: reports/run-<id>.html).")
@click.option("--single-file", is_flag=True, help="Inline the stylesheet and script (no assets/ folder).")
@db_option
def report_run(run_id: int, out: Path | None, single_file: bool, db: Path | None) -> None:
    """One page for a whole run: final-state map, layer curves, prediction depth, head entropy, prompts."""
    from geomap.cli.remote import fetch_report, server_for
    from geomap.report.api import DEFAULT_FOLDER, run_report

    _not_the_store(db, out)
    if (client := server_for(store_path(db))) is not None:
        _fetched(fetch_report(client, f"run-{run_id}.html", out or DEFAULT_FOLDER / f"run-{run_id}.html"))
        return
    _prepare_run(store_path(db), run_id)
    done = run_report(store_path(db), run_id, out, single_file)
    click.echo(f"wrote {done.path} ({len(done.html.encode()) / 1e3:.0f} kB)")


@report.command("compare")
@prompt_option("prompt_ids", multiple=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file (default: reports/compare-<a>-<b>.html).")
@click.option("--single-file", is_flag=True, help="Inline the stylesheet and script (no assets/ folder).")
@db_option
def report_compare(prompt_ids: tuple[int, ...], out: Path | None, single_file: bool, db: Path | None) -> None:
    """Two journeys side by side, e.g. --prompt 1 --prompt 2."""
    from geomap.cli.remote import fetch_report, server_for
    from geomap.report.api import DEFAULT_FOLDER, compare_report

    if len(prompt_ids) != 2:
        raise click.UsageError("Give --prompt exactly twice.")
    _not_the_store(db, out)
    if (client := server_for(store_path(db))) is not None:
        page = f"compare-{prompt_ids[0]}-{prompt_ids[1]}.html"
        _fetched(fetch_report(client, page, out or DEFAULT_FOLDER / page))
        return
    _prepare(store_path(db), list(prompt_ids))
    done = compare_report(store_path(db), prompt_ids[0], prompt_ids[1], out, single_file)
    click.echo(f"wrote {done.path} ({len(done.html.encode()) / 1e3:.0f} kB)")


@report.command("index")
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True)
def report_index(folder: Path) -> None:
    """Rewrite the folder's index.html listing every report in it."""
    from geomap.report.pages import write_index

    click.echo(f"wrote {write_index(folder)}")


COMMANDS = [report]

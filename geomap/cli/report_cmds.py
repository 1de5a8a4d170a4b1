"""Report commands: journey, run, compare and index pages under reports/."""

from __future__ import annotations

from pathlib import Path

import click

from geomap.cli.store_cmds import _db, db_option


@click.group()
def report() -> None:
    """Write HTML reports (self-contained pages under reports/, listed in reports/index.html)."""


@report.command("journey")
@click.option("--prompt", "prompt_id", type=int, default=None, help="Stored prompt id.")
@click.option("--text", default=None, help="A prompt to store (everything captured) and report on.")
@click.option("--pos", type=int, default=None, help="Token position (default: the last; e.g. a generation step).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file (default: reports/journey-<id>.html).")
@click.option("--single-file", is_flag=True, help="Inline the stylesheet and script (no assets/ folder).")
@db_option
def report_journey(prompt_id: int | None, text: str | None, pos: int | None, out: Path | None, single_file: bool,
                   db: Path | None) -> None:
    """The journey of a prompt's last token, section by section, with the store's numbers."""
    from geomap.cli import _quiet_transformers
    from geomap.report.api import journey_report

    if (prompt_id is None) == (text is None):
        raise click.UsageError("Give exactly one of --prompt ID or --text TEXT.")
    _quiet_transformers()
    done = journey_report(_db(db), prompt_id, text, out, single_file, pos=pos)
    click.echo(f"wrote {done.path} ({len(done.html.encode()) / 1e3:.0f} kB); index: {done.path.parent / 'index.html'}")


@report.command("run")
@click.option("--run", "run_id", type=int, required=True, help="Stored run id.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file (default: reports/run-<id>.html).")
@click.option("--single-file", is_flag=True, help="Inline the stylesheet and script (no assets/ folder).")
@db_option
def report_run(run_id: int, out: Path | None, single_file: bool, db: Path | None) -> None:
    """One page for a whole run: final-state map, layer curves, prediction depth, head entropy, prompts."""
    from geomap.cli import _quiet_transformers
    from geomap.report.api import run_report

    _quiet_transformers()
    done = run_report(_db(db), run_id, out, single_file)
    click.echo(f"wrote {done.path} ({len(done.html.encode()) / 1e3:.0f} kB)")


@report.command("compare")
@click.option("--prompt", "prompt_ids", type=int, multiple=True, required=True, help="Two stored prompt ids.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file (default: reports/compare-<a>-<b>.html).")
@click.option("--single-file", is_flag=True, help="Inline the stylesheet and script (no assets/ folder).")
@db_option
def report_compare(prompt_ids: tuple[int, ...], out: Path | None, single_file: bool, db: Path | None) -> None:
    """Two journeys side by side, e.g. --prompt 1 --prompt 2."""
    from geomap.cli import _quiet_transformers
    from geomap.report.api import compare_report

    if len(prompt_ids) != 2:
        raise click.UsageError("Give --prompt exactly twice.")
    _quiet_transformers()
    done = compare_report(_db(db), prompt_ids[0], prompt_ids[1], out, single_file)
    click.echo(f"wrote {done.path} ({len(done.html.encode()) / 1e3:.0f} kB)")


@report.command("index")
@click.option("--folder", type=click.Path(file_okay=False, path_type=Path), default=Path("reports"),
              show_default=True)
def report_index(folder: Path) -> None:
    """Rewrite the folder's index.html listing every report in it."""
    from geomap.report.pages import write_index

    click.echo(f"wrote {write_index(folder)}")


COMMANDS = [report]

"""``geomap bench``: the benchmark harness."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.command()
@click.option("--quick", is_flag=True,
              help="Fewer prompts, rounds and sizes: about 20 minutes on 2 cores (the full run takes hours: its "
                   "memory figure stores 5,000 prompts).")
@click.option("--json", "as_json", is_flag=True, help="Print {machine, figures: [{name, value, unit, target, met}]}.")
@click.option("--model", "model_name", default="gemma-3-270m", show_default=True)
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as a Markdown table (e.g. for docs/benchmarks.md).")
def bench(quick: bool, as_json: bool, model_name: str, markdown: Path | None) -> None:
    """Measure geomap beside the bare model, the peers and the machine (medians of interleaved rounds)."""
    from geomap.bench import run_bench
    from geomap.bench.core import as_json as to_json
    from geomap.bench.core import as_markdown, as_text
    from geomap.cli import _quiet_transformers

    _quiet_transformers()
    info, figures, seconds = run_bench(model_name, quick, say=lambda line: click.echo(f"bench: {line}", err=True))
    command = "geomap bench" + (" --quick" if quick else "") + ("" if model_name == "gemma-3-270m"
                                                                 else f" --model {model_name}")
    if markdown:
        markdown.write_text(as_markdown(info, figures, command, seconds), encoding="utf-8")
    click.echo(json.dumps(to_json(info, figures, {"seconds": round(seconds, 1), "command": command}))
               if as_json else as_text(figures))
    missed = [f.name for f in figures if f.met is False]
    if missed:
        click.echo(f"{len(missed)} target(s) missed: {', '.join(missed)}", err=True)
    sys.exit(0)


COMMANDS = [bench]

"""The ``geomap`` command line: a thin layer over the stages."""

from __future__ import annotations

import json
import sys

import click

from geomap.errors import GeomapError


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and advice; geomap prints its own progress."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="geomap")
def cli() -> None:
    """Measure, store and explore the journey of an inference token through a real language model."""
    from geomap.cli.textout import install

    install()  # every command's output shows terminal control characters instead of obeying them


@cli.command()
@click.argument("text", required=False)
@click.option("--file", "prompt_file", type=click.Path(dir_okay=False), default=None,
              help="Trace every prompt of a text file (one per line) instead of TEXT.")
@click.option("--model", "model_name", default=None, help="Preset, local model directory or hub id.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available, else CPU).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Weights dtype (default: float32 on CPU).")
@click.option("--overflow", default="error", type=click.Choice(["error", "truncate"]),
              help="What to do with a prompt longer than the context window (or --max-tokens): refuse it, or "
                   "keep its last tokens (BOS stays first).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None, metavar="N",
              help="Token budget per prompt, BOS included (default: the model's context window).")
@click.option("--top-k", "top", default=10, show_default=True, type=click.IntRange(min=1),
              help="Next-token candidates to show.")
@click.option("--top", "top_alias", default=None, type=click.IntRange(min=1), hidden=True)  # its former name
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
def trace(text: str | None, prompt_file: str | None, model_name: str | None, device: str | None,
          dtype: str | None, overflow: str, max_tokens: int | None, top: int, top_alias: int | None,
          as_json: bool) -> None:
    """Print the journey of the last token of TEXT: tokens, logit lens per layer, heads, next tokens.

    With --file, every prompt of the file is traced; a prompt that fails is reported and the others proceed.
    """
    from geomap.capture import CaptureConfig, PromptFailure, capture
    from geomap.capture.prompts import read_prompt_lines
    from geomap.cli.summary import format_trace, trace_summary
    from geomap.errors import PromptError
    from geomap.models import DEFAULT_MODEL, load_model

    top = top_alias if top_alias is not None else top
    if (text is None) == (prompt_file is None):
        raise click.UsageError("Give either TEXT or --file PATH.")
    texts = read_prompt_lines(prompt_file) if prompt_file else [text]
    if not texts:
        raise PromptError(f"no prompts to trace: {prompt_file} holds no prompt (empty, or blank lines only)")
    if text is not None and not text.strip():
        raise PromptError(f"Prompt is empty or whitespace only: {text!r}")
    quiet_transformers()
    loaded = load_model(model_name or DEFAULT_MODEL, device=device, dtype=dtype)
    failed = 0
    for result in capture(loaded, texts, CaptureConfig(overflow=overflow, max_tokens=max_tokens,
                                                               top_k=max(top, 10))):
        if isinstance(result, PromptFailure):
            failed += 1
            click.echo(f"error: prompt {result.index + 1}: {result.reason}", err=True)
            continue
        summary = trace_summary(result, loaded.tokenizer, next_top=top)
        click.echo(json.dumps(summary, ensure_ascii=False) if as_json else format_trace(summary) + "\n")
    if failed:
        sys.exit(2)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def models(as_json: bool) -> None:
    """List the model presets, where each comes from, and whether it is converted and cached."""
    from geomap.models import DEFAULT_MODEL, PRESETS, cache_home

    rows = [{"name": p.name, "default": p.name == DEFAULT_MODEL, "description": p.description,
             "source": p.source, "install": p.install, "cached": p.is_cached,
             "path": str(p.cache_dir) if p.is_cached else None} for p in PRESETS.values()]
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"cache home: {cache_home()}  (set GEOMAP_HOME to move it)\n")
    for r in rows:
        state = f"converted and cached at {r['path']}" if r["cached"] else "not converted yet (first use converts)"
        click.echo(f"{r['name']}{' (default)' if r['default'] else ''}: {r['description']}")
        click.echo(f"    source:  {r['source']}\n    install: {r['install']}\n    status:  {state}\n")
    click.echo("Any local Hugging Face model directory or hub id (with network) works too: --model PATH_OR_ID")


def _add_commands() -> None:
    from geomap.cli import (
        analysis_cmds,
        bench_cmds,
        export_cmds,
        intervene_cmds,
        query_cmds,
        report_cmds,
        serve_cmds,
        store_cmds,
        store_group,
    )

    for command in [*store_cmds.COMMANDS, *query_cmds.COMMANDS, *store_group.COMMANDS, *export_cmds.COMMANDS,
                    *analysis_cmds.COMMANDS, *report_cmds.COMMANDS, *serve_cmds.COMMANDS, *bench_cmds.COMMANDS,
                    *intervene_cmds.COMMANDS]:
        cli.add_command(command)


_add_commands()


def main() -> None:
    """Console entry point: turns geomap's own errors (and a refused write) into one clear line and exit status 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        if isinstance(exc, click.UsageError):  # one line, like every other error (click's own is three)
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            click.echo(f"error: {_one_line(exc.format_message())}{where}", err=True)
        else:
            exc.show()
        sys.exit(exc.exit_code)
    except GeomapError as exc:
        from geomap.cli.textout import visible

        click.echo(f"error: {visible(_one_line(str(exc)))}", err=True)
        sys.exit(2)
    except OSError as exc:  # the disk or the file system refused (full, read-only, permissions): one line, no traceback
        from geomap.store.db import storage_error

        error = storage_error(exc, exc.filename or "")
        message = str(error) if error else f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
        click.echo(f"error: {_one_line(message)}", err=True)
        sys.exit(2)
    except Exception as exc:  # DuckDB's own error types are not imported here (the CLI starts without DuckDB)
        missing = _missing_segment(exc)
        if missing is None:
            raise
        click.echo(f"error: The store's segment file {missing} is missing: a store is its .duckdb file and the "
                   "<name>.segments folder beside it (its vectors); copy or move them together.", err=True)
        sys.exit(2)


def _missing_segment(exc: Exception) -> str | None:
    """The segment file a DuckDB error says it cannot find (a store copied without its segment folder), else None."""
    import re

    found = re.search(r'No files found that match the pattern "([^"]*\.segments/[^"]*)"', str(exc))
    return found.group(1) if found and type(exc).__name__ == "IOException" else None


def _one_line(message: str) -> str:
    """A message on one line (DuckDB and Arrow messages carry newlines and caret lines)."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())

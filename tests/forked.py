"""Run ``geomap`` commands in real child processes that start fast: forked from a server that imported geomap once.

A fresh ``python -m geomap`` spends most of its time importing torch and transformers; the fault and bad-input
tests start dozens of commands, so they fork each one from a multiprocessing *forkserver* that preloaded those
modules (and never ran a torch operation, so forking it is safe). Each command is still its own process: it can be
SIGKILLed at a kill point (`geomap.faults`), and its exit status and stderr are what a user would see.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
from dataclasses import dataclass

_PRELOAD = ["geomap.cli", "geomap.ingest.engine", "geomap.models.loading", "geomap.store.vectors", "torch",
            "transformers"]
_context = None


@dataclass(frozen=True)
class Done:
    """How a command ended: exit status (negative: killed by that signal), stdout and stderr."""

    status: int
    stdout: str
    stderr: str


def _child(args: list[str], env: dict[str, str | None], out_path: str, err_path: str) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    out = os.open(out_path, os.O_WRONLY | os.O_TRUNC)
    err = os.open(err_path, os.O_WRONLY | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.argv = ["geomap", *args]
    code = 0
    try:
        from geomap.cli import main

        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # an uncaught error: print it as Python would, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def geomap(*args: str, env: dict[str, str | None] | None = None, timeout: float = 600) -> Done:
    """Run ``geomap ARGS`` in a forked child (``env`` entries set, or removed when None); wait for it."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    env = {"HF_HUB_OFFLINE": "1", "GEOMAP_KILL_AT": None, **(env or {})}
    with tempfile.NamedTemporaryFile() as out, tempfile.NamedTemporaryFile() as err:
        proc = _context.Process(target=_child, args=(list(args), env, out.name, err.name))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise TimeoutError(f"geomap {' '.join(args)} ran past {timeout}s")
        with open(out.name, encoding="utf-8", errors="replace") as o, open(err.name, encoding="utf-8",
                                                                          errors="replace") as e:
            return Done(proc.exitcode, o.read(), e.read())

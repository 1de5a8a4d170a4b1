"""Where a command may write its output: not over the store's own files and folders, not over a device or a pipe."""

from __future__ import annotations

from pathlib import Path

FILES = (".wal", ".serve.json")  # beside ``<db>``: DuckDB's log, the running server's discovery file
FOLDERS = ((".segments", ".indexes", ".shards"), (".weights",))  # ``<db stem>.*`` and ``<db>.*`` folders


def owns(db: str | Path, path: str | Path) -> bool:
    """Whether the store at ``db`` owns ``path``.

    It does when ``path`` is the store's file (or a link to it), its WAL or server file, or a path inside its
    segment, index, shard or weights folder.
    """
    db, out = Path(db).resolve(), Path(path)
    target = out.resolve()
    files = [db, *(db.with_name(db.name + suffix) for suffix in FILES)]
    folders = [db.with_name(db.stem + suffix) for suffix in FOLDERS[0]]
    folders += [db.with_name(db.name + suffix) for suffix in FOLDERS[1]]
    if target in files or any(target == folder or folder in target.parents for folder in folders):
        return True
    return out.exists() and db.exists() and out.samefile(db)


def refuse_store_file(db: str | Path, out: str | Path, option: str = "--out") -> None:
    """Refuse to write ``out`` when the store at ``db`` owns it (`owns`).

    Raises:
        StoreError: ``out`` is one of the store's own paths.
    """
    from geomap.store.db import StoreError

    if owns(db, out):
        raise StoreError(f"{option} {out} is one of the store's own files ({Path(db).resolve()} and the files and "
                         "folders named after it): writing it would damage the store; write to another path.")


def refuse_special(out: str | Path, option: str = "--out") -> None:
    """Refuse an ``out`` that exists and is not a regular file: a device, pipe or socket.

    Outputs are written beside their destination and renamed into place, which would replace such a file (as root,
    ``/dev/full`` became a plain file).

    Raises:
        GeomapError: ``out`` is a device, pipe or socket.
    """
    from geomap.errors import GeomapError

    out = Path(out)
    if out.exists() and not out.is_file() and not out.is_dir():
        raise GeomapError(f"{option} {out} is not a regular file (a device, pipe or socket): the output is written "
                          "beside it and renamed into place; give a file path.")


def refuse_output(db: str | Path, out: str | Path, option: str = "--out") -> None:
    """Refuse an output file that is a device, pipe or socket (`refuse_special`) or one of the store's (`owns`)."""
    refuse_special(out, option)
    refuse_store_file(db, out, option)

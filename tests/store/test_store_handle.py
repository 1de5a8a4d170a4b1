"""The `Store` handle: one DuckDB instance per open store, snapshots that never see a later commit, writes that
commit whole or not at all, and no registry of open stores anywhere in the package."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import duckdb
import pytest

from geomap.store.db import StoreError, ensure_schema
from geomap.store.handle import Results, Store


def _store(tmp_path: Path) -> Store:
    store = Store.open(tmp_path / "s.duckdb", "w")
    with store.writer() as con:
        ensure_schema(con)
        con.execute("INSERT INTO runs (id, model, status) VALUES (1, 'tiny', 'done')")
    return store


def test_a_snapshot_does_not_see_a_commit_made_after_it_began(tmp_path):
    with _store(tmp_path) as store:
        with store.snapshot() as before:
            assert before.execute("SELECT count(*) FROM runs").fetchall() == [(1,)]
            with store.transaction() as con:
                con.execute("INSERT INTO runs (id, model, status) VALUES (2, 'tiny', 'done')")
            assert before.execute("SELECT count(*) FROM runs").fetchall() == [(1,)]
        assert store.query("SELECT count(*) AS n FROM runs").scalar() == 2


def test_a_snapshot_refuses_writes_and_a_failed_transaction_leaves_nothing(tmp_path):
    with _store(tmp_path) as store:
        with pytest.raises(duckdb.Error, match="read-only|read only"), store.snapshot() as con:
            con.execute("DELETE FROM runs")
        with pytest.raises(RuntimeError, match="boom"), store.transaction() as con:
            con.execute("DELETE FROM runs")
            raise RuntimeError("boom")
        assert store.query("SELECT id FROM runs").rows == [(1,)]


def test_results_carry_their_columns(tmp_path):
    with _store(tmp_path) as store:
        got = store.query("SELECT id, model AS name FROM runs WHERE id = ?", [1])
    assert isinstance(got, Results) and got.columns == ("id", "name")
    assert got.dicts() == [{"id": 1, "name": "tiny"}] and got.first() == (1, "tiny") and len(got) == 1


def test_a_read_only_store_cannot_write_and_a_missing_one_is_named(tmp_path):
    _store(tmp_path).close()
    with Store.open(tmp_path / "s.duckdb") as store:
        assert store.mode == "r" and store.index_dir == tmp_path / "s.indexes"
        with pytest.raises(StoreError, match="read-only"), store.transaction():
            pass
        assert store.query("SELECT count(*) FROM runs").scalar() == 1
    with pytest.raises(StoreError, match="No store at"):
        Store.open(tmp_path / "missing.duckdb")
    assert not (tmp_path / "missing.duckdb").exists()


def test_threads_share_one_instance_and_a_closed_store_says_so(tmp_path):
    store = _store(tmp_path)
    seen: dict[int, list[int]] = {}

    def read(i: int) -> None:
        seen[i] = [store.query("SELECT count(*) FROM runs").scalar() for _ in range(20)]

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for i in range(2, 12):
        with store.transaction() as con:
            con.execute("INSERT INTO runs (id, model, status) VALUES (?, 'tiny', 'done')", [i])
    for t in threads:
        t.join()
    assert sorted(seen) == [0, 1, 2, 3]
    for counts in seen.values():  # each thread sees whole commits, in order, never a count going back
        assert counts == sorted(counts) and 1 <= counts[0] and counts[-1] <= 11
    store.close()
    store.close()  # twice is harmless
    assert store.closed
    with pytest.raises(StoreError, match="closed"), store.snapshot():
        pass


def test_use_passes_an_open_store_through_and_opens_a_path_for_the_block(tmp_path):
    store = _store(tmp_path)
    with Store.use(store) as same:
        assert same is store
    assert not store.closed
    store.close()
    with Store.use(tmp_path / "s.duckdb") as opened:
        assert opened.query("SELECT count(*) FROM runs").scalar() == 1
    assert opened.closed


MUTATORS = {"append", "add", "pop", "update", "setdefault", "clear", "remove", "extend", "insert", "discard",
            "popitem", "__setitem__"}


def test_no_module_keeps_a_registry_of_open_stores():
    """A module-level dict, list or set that the module mutates is a registry; none may remain except bounded
    caches, which say so (the word "bounded") in a comment on the line that creates them."""
    root = Path(__file__).resolve().parents[2] / "geomap"
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines, tree = source.splitlines(), ast.parse(source)
        containers = {}
        for node in tree.body:
            value = getattr(node, "value", None)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                    isinstance(value, ast.Call) and getattr(value.func, "id", None) in ("dict", "list", "set")):
                containers.update({t.id: node.lineno for t in targets if isinstance(t, ast.Name)})
        for node in ast.walk(tree):
            name = None
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                for t in getattr(node, "targets", None) or [getattr(node, "target", None)]:
                    if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
                        name = t.value.id
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS \
                    and isinstance(node.func.value, ast.Name):
                name = node.func.value.id
            if name in containers and "bounded" not in lines[containers[name] - 1]:
                found.append(f"{path.relative_to(root.parent)}:{containers[name]} {name}")
    assert not found, sorted(set(found))

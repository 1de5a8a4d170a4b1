"""A table of bad inputs: each ends with exit status 2, one line on stderr naming the problem, no traceback, and a
store whose every file is byte for byte what it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geomap.store.segments import segment_dir
from tests.forked import geomap
from tests.storedb import copy_store


def store_checksum(db: Path) -> str:
    """sha256 over every file of the store (the DuckDB file, its WAL, and every folder beside it: indexes, weights)."""
    h = hashlib.sha256()
    beside = sorted(db.parent.glob(db.name + "*")) + sorted(db.parent.glob(db.stem + ".*"))
    for top in dict.fromkeys(beside):
        for path in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            h.update(str(path.relative_to(db.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("user-errors")
    model = tiny_dirs["llama"]
    (root / "good.txt").write_text("The storm is\nParis is\n")
    db = root / "store" / "s.duckdb"
    done = geomap("ingest", str(root / "good.txt"), "--db", str(db), "--model", str(model))
    assert done.status == 0, done.stderr
    files = {
        "empty.txt": b"", "blank.txt": b"\n   \n\t\n", "bad-utf8.txt": b"fine\n\xc3\x28 broken\n",
        "text-int.jsonl": b'{"text": 123}\n', "tags-int.jsonl": b'{"text": "x", "tags": 5}\n',
        "no-text.jsonl": b'{"prompt": "x"}\n', "bad-json.jsonl": b'{"text": "x"\n',
        "corrupt.parquet": b"PAR1 not really", "prompts.xyz": b"The storm is\n",
        "long.txt": b"The storm is\n" + b"storm " * 40 + b"\n",
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    os.mkfifo(root / "pipe")  # a report over it would make it a plain file
    pq.write_table(pa.table({"text": [1, 2]}), root / "int-text.parquet")
    pipelines = {
        "tags-string": 'tags = "demo"', "unknown-key": "tag = ['demo']", "batch-eight": 'batch_size = "eight"',
        "store-int": "store = 5", "topk-string": '[capture]\ntop_k = "50"', "batch-zero": "batch_size = 0",
        "float16": '[capture]\nvector_dtype = "float16"', "layers-99": "[capture]\nlayers = [99]",
        "lens-50": "[capture]\nlens_positions = [50]", "positions-word": '[capture]\nattn_positions = "first"',
        "continuation-negative": "continuation_tokens = -1", "missing-source": None, "no-sources": None,
        "bad-toml": None, "source-missing-file": None, "unquoted": None, "source-singular": None,
        "max-tokens-string": '[capture]\nmax_tokens = "8"', "max-tokens-over": None,
    }
    for name, extra in pipelines.items():
        head = f'model = "{model}"\n' + ("" if name == "store-int" else f'store = "{db}"\n')
        source = '[[sources]]\npath = "good.txt"\n'
        if name == "tags-string":
            text = head + source + 'tags = "demo"\n'
        elif name == "missing-source":
            text = head + "[[sources]]\ntags = ['x']\n"
        elif name == "no-sources":
            text = head
        elif name == "bad-toml":
            text = head + "batch_size = = 3\n" + source
        elif name == "unquoted":
            text = head + "name = journey\n" + source
        elif name == "source-singular":
            text = head + '[[source]]\npath = "good.txt"\n'
        elif name == "max-tokens-over":
            text = head + '[[sources]]\npath = "long.txt"\n[capture]\nmax_tokens = 8\n'
        elif name == "source-missing-file":
            text = head + '[[sources]]\npath = "nowhere.txt"\n'
        elif extra.startswith("["):
            text = head + source + extra + "\n"
        else:
            text = head + extra + "\n" + source
        (root / f"{name}.toml").write_text(text)
    return {"root": root, "db": db, "model": model}


# (case id, arguments, a piece of the one error line). {root}, {db}, {model} are filled in.
ING = ["ingest", "{root}/good.txt", "--db", "{db}", "--model", "{model}"]
CASES = [
    ("neighbors-k-0", ["neighbors", "--db", "{db}", "--prompt", "1", "--layer", "1", "-k", "0"], "-k"),
    ("neighbors-k-negative", ["neighbors", "--db", "{db}", "--prompt", "1", "--layer", "1", "-k", "-5"], "-k"),
    ("neighbors-layer-40", ["neighbors", "--db", "{db}", "--prompt", "1", "--layer", "40"], "0..3"),
    ("neighbors-layer-negative", ["neighbors", "--db", "{db}", "--prompt", "1", "--layer", "-1"], "0..3"),
    ("neighbors-no-prompt", ["neighbors", "--db", "{db}", "--prompt", "999", "--layer", "1"], "999"),
    ("neighbors-no-store", ["neighbors", "--db", "{root}/none.duckdb", "--prompt", "1", "--layer", "1"], "No store"),
    ("rebuild-no-store", ["index", "rebuild", "--db", "{root}/none.duckdb"], "No store at"),
    ("verify-no-store", ["index", "verify", "--db", "{root}/none.duckdb"], "No store at"),
    ("batch-size-0", [*ING, "--batch-size", "0"], "--batch-size"),
    ("batch-size-negative", [*ING, "--batch-size", "-3"], "--batch-size"),
    ("top-k-0", [*ING, "--top-k", "0"], "--top-k"),
    ("mlp-top-word", [*ING, "--mlp-top", "many"], "--mlp-top"),
    ("overflow-drop", [*ING, "--overflow", "drop"], "--overflow"),
    ("positions-word", [*ING, "--lens-positions", "1,x"], "--lens-positions"),
    ("layers-word", [*ING, "--layers", "first"], "--layers"),
    ("layers-99", [*ING, "--layers", "0,99"], "0..3"),
    ("positions-50", [*ING, "--attn-positions", "50"], "attn_positions [50]"),
    ("unknown-option", [*ING, "--overflw", "truncate"], "--overflw"),
    ("empty-file", ["ingest", "{root}/empty.txt", "--db", "{db}", "--model", "{model}"], "no prompts to store"),
    ("blank-file", ["ingest", "{root}/blank.txt", "--db", "{db}", "--model", "{model}"], "no prompts to store"),
    ("bad-utf8", ["ingest", "{root}/bad-utf8.txt", "--db", "{db}", "--model", "{model}"], "line 2: not valid UTF-8"),
    ("jsonl-text-int", ["ingest", "{root}/text-int.jsonl", "--db", "{db}"], "'text' must be a string"),
    ("jsonl-tags-int", ["ingest", "{root}/tags-int.jsonl", "--db", "{db}"], "'tags' must be a list"),
    ("jsonl-no-text", ["ingest", "{root}/no-text.jsonl", "--db", "{db}"], "no 'text' field"),
    ("jsonl-bad-json", ["ingest", "{root}/bad-json.jsonl", "--db", "{db}"], "line 1: invalid JSON"),
    ("parquet-corrupt", ["ingest", "{root}/corrupt.parquet", "--db", "{db}"], "not a readable parquet file"),
    ("parquet-int-text", ["ingest", "{root}/int-text.parquet", "--db", "{db}"], "'text' must be a string"),
    ("unknown-format", ["ingest", "{root}/prompts.xyz", "--db", "{db}"], "unknown prompt format"),
    ("missing-model", [*ING[:-1], "{root}/no-such-model"], "no-such-model"),
    ("toml-tags-string", ["run", "{root}/tags-string.toml"], "sources[0].tags = 'demo'"),
    ("toml-unknown-key", ["run", "{root}/unknown-key.toml"], "unknown key 'tag'"),
    ("toml-batch-eight", ["run", "{root}/batch-eight.toml"], "batch_size = 'eight'"),
    ("toml-batch-zero", ["run", "{root}/batch-zero.toml"], "batch_size = 0"),
    ("toml-store-int", ["run", "{root}/store-int.toml"], "store = 5"),
    ("toml-topk-string", ["run", "{root}/topk-string.toml"], "capture.top_k = '50'"),
    ("toml-float16", ["run", "{root}/float16.toml"], "capture.vector_dtype = 'float16'"),
    ("toml-positions-word", ["run", "{root}/positions-word.toml"], "capture.attn_positions = 'first'"),
    ("toml-continuation-negative", ["run", "{root}/continuation-negative.toml"], "continuation_tokens = -1"),
    ("toml-layers-99", ["run", "{root}/layers-99.toml"], "layers [99]"),
    ("toml-lens-50", ["run", "{root}/lens-50.toml"], "lens_positions [50]"),
    ("toml-source-without-path", ["run", "{root}/missing-source.toml"], "missing key 'sources[0].path'"),
    ("toml-no-sources", ["run", "{root}/no-sources.toml"], "missing key 'sources'"),
    ("toml-syntax", ["run", "{root}/bad-toml.toml"], "Cannot read pipeline"),
    ("toml-source-file-missing", ["run", "{root}/source-missing-file.toml"], "nowhere.txt"),
    ("toml-missing", ["run", "{root}/none.toml"], "none.toml"),
    ("toml-unquoted-text", ["run", "{root}/unquoted.toml"], "a text value needs quotes"),
    ("toml-source-singular", ["run", "{root}/source-singular.toml"], "unknown key 'source'"),
    ("export-unknown-suffix", ["export", "prompts", "--out", "{root}/x.xyz", "--db", "{db}"], "--format"),
    ("export-copy", ["export", "COPY prompts TO 'x.csv'", "--out", "{root}/x.csv", "--db", "{db}"], "COPY"),
    ("export-npy-text", ["export", "SELECT text FROM prompts", "--out", "{root}/x.npy", "--db", "{db}"],
     "numbers only"),
    ("prompt-unknown-source-id", ["stats", "--prompt", "nosuch", "--db", "{db}"], "'nosuch'"),
    ("trace-top-k-0", ["trace", "x", "--top-k", "0"], "--top-k"),
    ("trace-empty-file", ["trace", "--file", "{root}/empty.txt"], "no prompts to trace"),
    # an --out that is one of the store's own files or folders: refused before anything is written over it
    ("export-over-store", ["export", "prompts", "--out", "{db}", "--format", "parquet", "--db", "{db}"],
     "one of the store's own files"),
    ("export-into-segments", ["export", "prompts", "--out", "{root}/store/s.segments/x.parquet", "--db", "{db}"],
     "one of the store's own files"),
    ("report-run-over-store", ["report", "run", "--run", "1", "--out", "{db}", "--db", "{db}"],
     "one of the store's own files"),
    ("report-journey-over-wal", ["report", "journey", "--prompt", "1", "--out", "{db}.wal", "--db", "{db}"],
     "one of the store's own files"),
    ("report-compare-into-indexes", ["report", "compare", "--prompt", "1", "--prompt", "2", "--out",
                                     "{root}/store/s.indexes/c.html", "--db", "{db}"], "one of the store's own files"),
    ("intervene-report-into-segments", ["intervene", "report", "--out", "{root}/store/s.segments", "--db", "{db}"],
     "one of the store's own files"),
    ("report-run-to-a-pipe", ["report", "run", "--run", "1", "--out", "{root}/pipe", "--db", "{db}"],
     "not a regular file"),
    ("report-no-prompt", ["report", "journey", "--prompt", "999", "--db", "{db}", "--out", "{root}/r/x.html"], "999"),
    ("attribute-no-prompt", ["attribute", "--prompt", "999", "--db", "{db}"], "999"),
    # a token budget: a prompt over it is refused before anything is stored (naming it, its length, the budget)
    ("max-tokens-over-budget", ["ingest", "{root}/long.txt", "--db", "{db}", "--model", "{model}", "--max-tokens", "8"],
     "Prompt 2 ('storm storm storm storm storm storm stor') has 83 tokens, over the budget of --max-tokens 8"),
    ("max-tokens-1", [*ING, "--max-tokens", "1"], "--max-tokens"),
    ("max-tokens-word", [*ING, "--max-tokens", "many"], "--max-tokens"),
    ("trace-over-budget", ["trace", "storm " * 40, "--model", "{model}", "--max-tokens", "8"],
     "tokens, over the budget of --max-tokens 8"),
    ("toml-max-tokens-string", ["run", "{root}/max-tokens-string.toml"], "capture.max_tokens = '8'"),
    ("toml-max-tokens-over", ["run", "{root}/max-tokens-over.toml"], "over the budget of --max-tokens 8"),
]


@pytest.mark.parametrize(("case", "args", "names"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, case, args, names):
    db = world["db"]
    before = store_checksum(db)
    args = [a.format(root=world["root"], db=db, model=world["model"]) for a in args]
    done = geomap(*args)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.status == 2, (case, done.stderr)
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert names.format(root=world["root"]) in lines[0], lines[0]
    assert store_checksum(db) == before
    assert not (world["root"] / "none.duckdb").exists()  # nothing created where no store was


def test_second_writer_fails_before_loading_the_model(world):
    con = duckdb.connect(str(world["db"]))  # this process now holds the write lock
    try:
        done = geomap("ingest", str(world["root"] / "good.txt"), "--db", str(world["db"]), "--model",
                      str(world["root"] / "no-such-model"))  # a lock checked after loading would fail on the model
    finally:
        con.close()
    assert done.status == 2
    assert done.stderr.strip().startswith("error: The store") and "locked" in done.stderr


def test_read_only_geomap_home_is_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(home)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a read-only mount (root): {mounted.stderr.strip()}")
    try:
        done = geomap("trace", "The storm is", env={"GEOMAP_HOME": str(home)})
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("[geomap]")]
    assert done.status == 2 and "Traceback" not in done.stderr
    assert len(lines) == 1 and "GEOMAP_HOME" in lines[0] and "Read-only file system" in lines[0], lines


def test_bom_is_dropped_and_long_prompts_can_be_truncated_from_the_cli(world, tmp_path):
    db = tmp_path / "s.duckdb"
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfThe storm is\n")
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "Paris is"}\n')
    long = tmp_path / "long.txt"
    long.write_text("storm " * 5000 + "\n")
    for path, extra in ((bom, []), (jsonl, []), (long, ["--overflow", "truncate"])):
        done = geomap("ingest", str(path), "--db", str(db), "--model", str(world["model"]), *extra)
        assert done.status == 0, done.stderr
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT text, status, truncated FROM prompts ORDER BY id").fetchall()
    finally:
        con.close()
    assert [r[0][:12] for r in rows] == ["The storm is", "Paris is", "storm storm "]
    assert all(r[1] == "done" for r in rows) and rows[2][2] is True


def test_a_token_budget_with_truncate_keeps_the_last_tokens_and_bos(world, tmp_path):
    db = tmp_path / "s.duckdb"
    done = geomap("ingest", str(world["root"] / "long.txt"), "--db", str(db), "--model", str(world["model"]),
                  "--max-tokens", "8", "--overflow", "truncate")
    assert done.status == 0, done.stderr
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT n_tokens, truncated FROM prompts ORDER BY id").fetchall()
        first = con.execute("SELECT token_id FROM tokens WHERE prompt_id = 2 ORDER BY pos LIMIT 1").fetchall()
        bos = con.execute("SELECT token_id FROM tokens WHERE prompt_id = 1 ORDER BY pos LIMIT 1").fetchall()
    finally:
        con.close()
    assert rows[1] == (8, True) and rows[0][1] is False  # cut to the budget; the short prompt untouched
    assert first == bos  # BOS stays at position 0


def test_rerun_of_a_finished_ingestion_records_no_empty_run(world):
    con = duckdb.connect(str(world["db"]), read_only=True)
    runs = con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
    con.close()
    done = geomap("ingest", str(world["root"] / "good.txt"), "--db", str(world["db"]), "--model",
                  str(world["model"]), "--json")
    assert done.status == 0, done.stderr
    assert json.loads(done.stdout)["run_id"] is None
    con = duckdb.connect(str(world["db"]), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM runs").fetchall()[0][0] == runs
    finally:
        con.close()


def test_a_segments_store_copied_without_its_segment_folder_says_so(world, tmp_path):
    if not segment_dir(world["db"]).is_dir():
        pytest.skip("a rows store has no segment folder")
    db = tmp_path / "alone.duckdb"
    shutil.copy(world["db"], db)  # the file without its folder
    done = geomap("report", "journey", "--prompt", "1", "--db", str(db), "--out", str(tmp_path / "x.html"))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.status == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: The store's segment file "), lines
    assert "alone.segments/" in lines[0] and "copy or move them together" in lines[0]


@pytest.mark.parametrize("command", [["sql", "SELECT count(*) FROM states"],
                                     ["export", "states", "--out", "{tmp}/states.parquet"]])
def test_sql_on_a_store_copied_without_its_folder_says_so(world, tmp_path, command):
    """The original folder is still there: the copy's views name it, which store SQL may not read."""
    if not segment_dir(world["db"]).is_dir():
        pytest.skip("a rows store has no segment folder")
    db = tmp_path / "alone.duckdb"
    shutil.copy(world["db"], db)  # the file without its folder
    done = geomap(*[a.format(tmp=tmp_path) for a in command], "--db", str(db))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.status == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and "without its .segments folder" in lines[0], lines  # not "reaches outside the store"
    assert "copy or move the .duckdb file and its folder together" in lines[0]


def test_report_never_overwrites_a_foreign_index_html(world, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "index.html").write_text("<html>my own page</html>")
    db = tmp_path / "s.duckdb"
    copy_store(world["db"], db)  # a segments store is the file and its segment folder
    done = geomap("report", "journey", "--prompt", "1", "--db", str(db), "--out", str(out / "x.html"))
    assert done.status == 0, done.stderr
    assert (out / "x.html").exists()
    assert (out / "index.html").read_text() == "<html>my own page</html>"

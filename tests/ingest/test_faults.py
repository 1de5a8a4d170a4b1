"""Kill points at every commit boundary of ingestion and of index builds; a full disk.

Each case SIGKILLs a real ``geomap`` process at a named point (`geomap.faults`), reruns the same command once, and
checks that the store equals an uninterrupted run's and that ``geomap index verify`` passes.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from geomap.faults import POINTS
from geomap.store.parquet_fast import WRITER
from geomap.store.segments import LAYOUT_ENV, segment_dir
from tests.forked import geomap
from tests.store.test_segments import as_before_scalars
from tests.storedb import copy_store

TABLES = ["prompts", "tokens", "states", "contributions", "attention", "norms", "mlp_features", "lens", "lens_stats",
          "next_token", "final_logits", "vocab", "norm_names"]


def _prompts(path: Path, start: int, n: int) -> Path:
    path.write_text("\n".join(f"Prompt {i}: the storm is {'very ' * (i % 4)}close" for i in range(start, start + n)))
    return path


def _ingest_args(files: list[Path], db: Path, model: Path) -> list[str]:
    return ["ingest", *map(str, files), "--db", str(db), "--model", str(model), "--batch-size", "2",
            "--attn-positions", "all", "--lens-positions", "all"]


def _copy_store(src: Path, dst: Path) -> None:
    copy_store(src, dst, indexes=True)


def _segments_clean(db: Path) -> None:
    """The segment folder holds exactly the cataloged files (no orphan, no temp, no retired file left)."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        cataloged = sorted(r[0] for r in con.execute("SELECT file FROM internal.segments").fetchall())
    finally:
        con.close()
    assert sorted(p.name for p in segment_dir(db).iterdir()) == cataloged


def snapshot(db: Path) -> dict:
    """What an uninterrupted run and a killed-then-resumed one must agree on."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        return {
            "counts": {t: q(f"SELECT count(*) FROM {t}")[0][0] for t in TABLES},
            "prompts": q("SELECT id, key, run_id, status FROM prompts ORDER BY id"),
            "states": q("SELECT p.key, s.id, s.pos, s.layer, round(s.norm, 4) FROM states s "
                        "JOIN prompts p ON p.id = s.prompt_id ORDER BY s.id"),
            "trajectory": q("SELECT p.key, t.pos, t.layer, round(t.norm, 4), round(t.cos_final, 4), t.top1_id "
                            "FROM trajectory t JOIN prompts p ON p.id = t.prompt_id ORDER BY ALL"),
            "runs": q("SELECT id, status, pipeline FROM runs ORDER BY id"),
            "norm_names": q("SELECT * FROM norm_names ORDER BY ALL"),
            "manifest": q("SELECT layer, kind, dim, ntotal, max_id FROM faiss_manifest ORDER BY layer"),
        }
    finally:
        con.close()


def _verified(db: Path) -> None:
    done = geomap("index", "verify", "--db", str(db))
    assert done.status == 0, done.stderr
    assert not list(db.with_name(db.stem + ".indexes").glob("*.tmp"))


@pytest.fixture(scope="module")
def setup(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    first, second = _prompts(root / "first.txt", 0, 9), _prompts(root / "second.txt", 100, 5)
    model = tiny_dirs["llama"]
    rows = {LAYOUT_ENV: "rows"}  # the references are rows stores, whatever layout new stores get in this run
    base = root / "base.duckdb"  # the first file, uninterrupted
    assert geomap(*_ingest_args([first], base, model), env=rows).status == 0
    both = root / "both.duckdb"  # then the second file, uninterrupted
    _copy_store(base, both)
    assert geomap(*_ingest_args([second], both, model), env=rows).status == 0
    return {"root": root, "model": model, "first": first, "second": second, "base": base, "both": both}


# (kill point, stage): "fresh" ingests the first file into a new store; "append" ingests the second file into the
# store the first made (its indexes are extended, not built). Counts pick a call in the middle of the run.
CASES = [("vocab.inserted", "fresh"), ("run.started", "fresh"), ("batch.inserted@3", "fresh"),
         ("batch.committed@3", "fresh"), ("batch.committed@5", "fresh"), ("index.temp_written@2", "fresh"),
         ("index.manifest_committed@2", "fresh"), ("index.published@4", "fresh"), ("run.indexed", "fresh"),
         ("run.started", "append"), ("batch.inserted@2", "append"), ("batch.committed@3", "append"),
         ("index.temp_written@1", "append"), ("index.manifest_committed@3", "append"), ("index.published@2", "append"),
         ("run.indexed", "append")]


# Kill points of the segment layout: an ingestion into a segments store ("fresh", "append"), `geomap store compact`
# of a segments store written in batches of two, `geomap store migrate` of a rows store, and an append to a segments
# store written before its states' scalars had a table ("backfill": the table is filled from the segments first).
SEGMENT_CASES = [("segment.temp_written@2", "fresh"), ("segment.cataloged@3", "fresh"), ("batch.inserted@2", "fresh"),
                 ("segment.cataloged@2", "append"), ("segment.compacted@2", "compact"),
                 ("segment.migrated@2", "migrate"), ("scalars.backfilled", "migrate"),
                 ("scalars.backfilled", "backfill")]


def test_every_kill_point_is_exercised():
    covered = {point.split("@")[0] for point, _ in CASES + SEGMENT_CASES}
    assert covered == set(POINTS)  # every boundary has a case


@pytest.fixture(scope="module")
def segment_setup(setup):
    """The same ingestions into segments stores: the first file, then the second."""
    root, env = setup["root"], {LAYOUT_ENV: "segments"}
    base = root / "seg-base.duckdb"
    assert geomap(*_ingest_args([setup["first"]], base, setup["model"]), env=env).status == 0
    both = root / "seg-both.duckdb"
    _copy_store(base, both)
    assert geomap(*_ingest_args([setup["second"]], both, setup["model"]), env=env).status == 0
    return {"base": base, "both": both}


def test_a_segments_store_reads_as_the_rows_store(setup, segment_setup):
    assert snapshot(segment_setup["base"]) == snapshot(setup["base"])
    assert snapshot(segment_setup["both"]) == snapshot(setup["both"])


@pytest.mark.parametrize(("point", "stage"), SEGMENT_CASES, ids=[f"{s}-{p}" for p, s in SEGMENT_CASES])
def test_kill_at_a_segment_boundary_then_rerun(setup, segment_setup, tmp_path, point, stage):
    db, env = tmp_path / "store.duckdb", {LAYOUT_ENV: "segments"}
    if stage == "fresh":
        args, reference = _ingest_args([setup["first"]], db, setup["model"]), segment_setup["base"]
    elif stage in ("append", "backfill"):
        _copy_store(segment_setup["base"], db)
        if stage == "backfill":
            as_before_scalars(db)
        args, reference = _ingest_args([setup["second"]], db, setup["model"]), segment_setup["both"]
    else:
        _copy_store(segment_setup["both"] if stage == "compact" else setup["both"], db)
        args, reference = ["store", stage, "--db", str(db)], setup["both"]
    killed = geomap(*args, env={**env, "GEOMAP_KILL_AT": point})
    assert killed.status == -signal.SIGKILL, f"the kill point {point} was not reached: {killed.stderr[-2000:]}"
    rerun = geomap(*args, env=env)
    assert rerun.status == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert snapshot(db) == snapshot(reference)
    _verified(db)
    _segments_clean(db)
    if stage in ("compact", "migrate"):
        con = duckdb.connect(str(db), read_only=True)
        try:
            per_table = con.execute("SELECT count(*) FROM internal.segments GROUP BY table_name").fetchall()
        finally:
            con.close()
        assert sorted(per_table) == [(1,)] * 4  # the small segments are one per table now
        again = geomap(*args, env=env)  # idempotent: a second run changes nothing
        assert again.status == 0 and snapshot(db) == snapshot(reference)


def _with_a_foreign_segment(db: Path, monkeypatch) -> None:
    """Compact ``db`` as geomap did before fb7a196: contributions through pyarrow's uncompressed fallback."""
    from geomap.store import segments
    from geomap.store.compaction import compact
    from geomap.store.db import connect

    con = connect(db)
    try:
        with monkeypatch.context() as m:
            m.setattr(segments, "write_parquet", lambda *args, **kwargs: None)
            compact(con, names=["contributions"], stream=False)
        compact(con)
    finally:
        con.close()
    writers = {pq.read_metadata(p).created_by for p in segment_dir(db).iterdir()}
    assert len(writers) == 2 and WRITER in writers  # one file for `rewrite_foreign` to write again


@pytest.mark.parametrize("point", ["segment.temp_written@1", "segment.compacted@1"])
def test_kill_while_store_compact_rewrites_a_foreign_segment_then_rerun(setup, segment_setup, tmp_path, monkeypatch,
                                                                       point):
    """`rewrite_foreign`'s swap: killed after its temp file, or before its commit; one rerun finishes it."""
    db, env = tmp_path / "store.duckdb", {LAYOUT_ENV: "segments"}
    _copy_store(segment_setup["both"], db)
    _with_a_foreign_segment(db, monkeypatch)
    args = ["store", "compact", "--db", str(db)]
    killed = geomap(*args, env={**env, "GEOMAP_KILL_AT": point})  # compaction has nothing to do: the rewrite's call
    assert killed.status == -signal.SIGKILL, f"the kill point {point} was not reached: {killed.stderr[-2000:]}"
    rerun = geomap(*args, env=env)
    assert rerun.status == 0 and "rewrote 1 written by an older geomap" in rerun.stdout, rerun.stderr
    assert snapshot(db) == snapshot(setup["both"])
    _verified(db)
    _segments_clean(db)
    assert {pq.read_metadata(p).created_by for p in segment_dir(db).iterdir()} == {WRITER}


@pytest.mark.parametrize(("point", "stage"), CASES, ids=[f"{s}-{p}" for p, s in CASES])
def test_kill_at_a_commit_boundary_then_rerun(setup, tmp_path, point, stage):
    db = tmp_path / "store.duckdb"
    if stage == "append":
        _copy_store(setup["base"], db)
        files, reference = [setup["second"]], setup["both"]
    else:
        files, reference = [setup["first"]], setup["base"]
    args = _ingest_args(files, db, setup["model"])
    killed = geomap(*args, env={"GEOMAP_KILL_AT": point})
    assert killed.status == -signal.SIGKILL, f"the kill point {point} was not reached: {killed.stderr[-2000:]}"
    rerun = geomap(*args)
    assert rerun.status == 0, rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert snapshot(db) == snapshot(reference)
    _verified(db)


def _generations(db: Path) -> list[tuple]:
    """Each stored continuation: its parent's key, its text and how many decisions it has."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("""SELECT parent.key, g.text, (SELECT count(*) FROM decisions d WHERE d.prompt_id = g.id)
                              FROM prompts g JOIN prompts parent ON parent.id = g.parent_id ORDER BY g.id""").fetchall()
    finally:
        con.close()


def test_kill_during_a_pipelines_continuations_then_rerun(setup, tmp_path):
    """The continuations after a pipeline's prompts: a kill inside their second batch, one rerun, the same store."""
    toml = tmp_path / "pipe.toml"
    toml.write_text(f'name = "kill"\nmodel = "{setup["model"]}"\nbatch_size = 2\ncontinuation_tokens = 2\n'
                    f'[capture]\nattn_positions = "all"\nlens_positions = "all"\n'
                    f'[[sources]]\npath = "{setup["first"]}"\n', encoding="utf-8")
    reference, db = tmp_path / "reference.duckdb", tmp_path / "store.duckdb"
    assert geomap("run", str(toml), "--db", str(reference)).status == 0
    want = _generations(reference)
    assert len(want) == 9 and all(n == 2 for _, _, n in want)  # every continuation with its two decisions
    killed = geomap("run", str(toml), "--db", str(db), env={"GEOMAP_KILL_AT": "batch.inserted@7"})  # 5 + 2
    assert killed.status == -signal.SIGKILL, killed.stderr[-2000:]
    assert 0 < len(_generations(db)) < 9
    rerun = geomap("run", str(toml), "--db", str(db))
    assert rerun.status == 0, rerun.stderr
    assert snapshot(db) == snapshot(reference)
    assert _generations(db) == want
    _verified(db)


@pytest.mark.parametrize("point", ["index.temp_written@2", "index.manifest_committed@2", "index.published@3"])
def test_kill_during_index_rebuild_then_rerun(setup, tmp_path, point):
    db = tmp_path / "store.duckdb"
    _copy_store(setup["both"], db)
    killed = geomap("index", "rebuild", "--db", str(db), env={"GEOMAP_KILL_AT": point})
    assert killed.status == -signal.SIGKILL
    assert geomap("index", "rebuild", "--db", str(db)).status == 0
    _verified(db)
    assert snapshot(db) == snapshot(setup["both"])
    reference = tmp_path / "reference.duckdb"  # the same rebuild, uninterrupted
    _copy_store(setup["both"], reference)
    assert geomap("index", "rebuild", "--db", str(reference)).status == 0
    want = geomap("neighbors", "--db", str(reference), "--prompt", "3", "--layer", "2", "-k", "5", "--json")
    got = geomap("neighbors", "--db", str(db), "--prompt", "3", "--layer", "2", "-k", "5", "--json")
    assert got.status == want.status == 0 and got.stdout == want.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A 40 MB tmpfs (root only); unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"a disk-full test needs to mount a small tmpfs (as root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave: int) -> Path:
    """Fill the file system until ``leave`` bytes are free."""
    filler = mount / "filler"
    free = shutil.disk_usage(mount).free
    with open(filler, "wb") as f:
        f.truncate(0)
        block = b"\0" * (1 << 20)
        remaining = max(free - leave, 0)
        while remaining > 0:
            f.write(block[:remaining])
            remaining -= len(block)
    return filler


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_disk_full_during_ingestion_then_rerun_after_freeing_space(setup, small_disk):
    db = small_disk / "store.duckdb"
    filler = _fill(small_disk, 3 << 20)  # room for a few batches of the nine prompts, not for all (either layout)
    args = _ingest_args([setup["first"]], db, setup["model"])
    full = geomap(*args)
    assert full.status == 2, full.stderr
    line = _one_error_line(full.stderr)
    assert "No space left on device" in line and str(db) in line
    assert not list(small_disk.glob("*.indexes/*.tmp"))
    filler.unlink()
    assert geomap(*args).status == 0
    got, want = snapshot(db), snapshot(setup["base"])
    assert got == want  # the failed run was taken up again and finished: one run, done
    if segment_dir(db).is_dir():
        _segments_clean(db)  # a segment the full disk cut short is gone
    _verified(db)


def test_disk_full_during_index_rebuild_leaves_no_temp_file(setup, small_disk):
    db = small_disk / "store.duckdb"
    _copy_store(setup["both"], db)
    filler = _fill(small_disk, 8 << 10)
    full = geomap("index", "rebuild", "--db", str(db))
    assert full.status == 2, full.stderr
    line = _one_error_line(full.stderr)
    assert "No space left on device" in line
    assert not list(small_disk.glob("*.indexes/*.tmp"))
    filler.unlink()
    assert geomap("index", "rebuild", "--db", str(db)).status == 0
    _verified(db)
    assert snapshot(db) == snapshot(setup["both"])


def test_disk_full_during_store_compact_then_rerun_after_freeing_space(setup, segment_setup, small_disk):
    db = small_disk / "store.duckdb"
    _copy_store(segment_setup["both"], db)
    filler = _fill(small_disk, 64 << 10)  # room for none of the compacted segments
    args = ["store", "compact", "--db", str(db)]
    full = geomap(*args, env={LAYOUT_ENV: "segments"})
    assert full.status == 2, full.stderr
    line = _one_error_line(full.stderr)
    assert "No space left on device" in line and str(db) in line, line  # the store named, not "Cannot write :"
    filler.unlink()
    assert geomap(*args).status == 0
    assert snapshot(db) == snapshot(setup["both"])
    _verified(db)
    _segments_clean(db)

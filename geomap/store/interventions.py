"""The interventions ledger, the counterfactual deltas and the effects table (`interventions.sql`).

A batch of interventions is written in one transaction: its ledger rows, their delta rows and their effects. A spec
whose key is in the ledger already is never written again, so a sweep killed between two batches and rerun stores
what an uninterrupted sweep stores.
"""

from __future__ import annotations

from importlib.resources import files

import duckdb
import numpy as np
import pyarrow as pa

from geomap.faults import kill_point
from geomap.store.db import rollback_quietly

_MARKER = "-- @@ vector tables @@"


def ensure_intervention_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the interventions tables and views (idempotent); the store's width must be fixed already."""
    text = files("geomap.store").joinpath("interventions.sql").read_text()
    static, vectors = text.split(_MARKER)
    rows = con.execute("SELECT value FROM store_meta WHERE key = 'd_model'").fetchall()
    con.execute(static)
    if rows:
        con.execute(vectors.replace("{d}", str(int(rows[0][0]))))


def has_intervention_tables(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether this store holds the interventions tables."""
    return bool(con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'intervention_states' "
                            "AND database_name = current_database() AND schema_name = 'main'").fetchall()[0][0])


def stored_keys(con: duckdb.DuckDBPyConnection, keys: list[str]) -> set[str]:
    """The keys among ``keys`` that the ledger holds."""
    if not keys:
        return set()
    con.register("_geomap_keys", pa.table({"key": pa.array(keys)}))
    try:
        return {r[0] for r in con.execute("SELECT key FROM interventions JOIN _geomap_keys USING (key)").fetchall()}
    finally:
        con.unregister("_geomap_keys")


def write_interventions(con: duckdb.DuckDBPyConnection, ledger: list[dict], deltas: list[dict],
                        effects: list[list[dict]], width: int) -> list[int]:
    """Insert a batch of interventions (ledger row, delta, effects each) in one transaction; return their ids.

    Args:
        con: A writing connection.
        ledger: One dict per intervention with the ledger's columns but ``id``.
        deltas: Per intervention, `geomap.intervene.effects.delta_rows`'s arrays.
        effects: Per intervention, `geomap.intervene.effects.effect_rows`'s rows (with ``token`` filled in).
        width: The residual width.
    """
    con.execute("BEGIN TRANSACTION")
    try:
        first = int(con.execute("SELECT coalesce(max(id), 0) + 1 FROM interventions").fetchall()[0][0])
        ids = list(range(first, first + len(ledger)))
        columns = ["key", "run_id", "prompt_id", "source_prompt_id", "operation", "site", "layer", "head",
                   "positions", "coefficient", "seed", "sweep", "first_layer", "first_pos", "spec"]
        con.executemany(f"INSERT INTO interventions (id, {', '.join(columns)}) VALUES "
                        f"({', '.join(['?'] * (len(columns) + 1))})",
                        [[i, *(row[c] for c in columns)] for i, row in zip(ids, ledger)])
        _insert_deltas(con, ids, deltas, width)
        _insert_effects(con, ids, effects)
        kill_point("intervene.batch_inserted")
        con.execute("COMMIT")
    except BaseException:
        rollback_quietly(con)
        raise
    kill_point("intervene.batch_committed")
    return ids


def _insert_deltas(con, ids: list[int], deltas: list[dict], width: int) -> None:
    n_rows = [len(d["pos"]) for d in deltas]
    vectors = [v for d in deltas for v in d["vec"]]
    flat = np.zeros((len(vectors), width), np.float32)
    present = np.array([v is not None for v in vectors], bool)
    if present.any():
        flat[present] = np.stack([v for v in vectors if v is not None])
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)
    vec = pa.array(values.to_pylist() if False else values, pa.list_(pa.float32(), width))  # noqa: SIM108
    mask = pa.array(~present)
    vec = pa.compute.if_else(mask, pa.nulls(len(vectors), vec.type), vec)
    top1 = np.concatenate([d["top1_id"] for d in deltas])
    top1_prob = np.concatenate([d["top1_prob"] for d in deltas])
    table = pa.table({
        "intervention_id": pa.array(np.repeat(np.asarray(ids, np.int32), n_rows)),
        "pos": pa.array(np.concatenate([d["pos"] for d in deltas])),
        "layer": pa.array(np.concatenate([d["layer"] for d in deltas])),
        "norm": pa.array(np.concatenate([d["norm"] for d in deltas])),
        "cos_final": pa.array(np.concatenate([d["cos_final"] for d in deltas])),
        "vec": vec,
        "top1_id": pa.array(top1.astype(np.int32), mask=top1 < 0),
        "top1_prob": pa.array(top1_prob.astype(np.float32), mask=np.isnan(top1_prob)),
    })
    con.register("_geomap_delta", table)
    try:
        con.execute("INSERT INTO intervention_states SELECT * FROM _geomap_delta")
    finally:
        con.unregister("_geomap_delta")


def _insert_effects(con, ids: list[int], effects: list[list[dict]]) -> None:
    rows = [{"intervention_id": i, **row} for i, rows in zip(ids, effects) for row in rows]
    if not rows:
        return
    columns = ["intervention_id", "token_id", "token", "logit", "prob", "rank", "clean_logit", "clean_prob",
               "clean_rank", "logit_change", "prob_change", "kl", "top1_id", "top1_changed", "first_flip_layer",
               "lens_ranks", "clean_lens_ranks"]
    con.executemany(f"INSERT INTO effects ({', '.join(columns)}) VALUES ({', '.join(['?'] * len(columns))})",
                    [[row[c] for c in columns] for row in rows])

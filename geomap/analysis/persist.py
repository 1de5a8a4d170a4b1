"""Write analysis results into a store's analysis tables (`geomap/store/analysis.sql`)."""

from __future__ import annotations

import duckdb
import pandas as pd
import pyarrow as pa

from geomap.analysis.decoding import Decision


def next_id(con: duckdb.DuckDBPyConnection, table: str) -> int:
    """1 + the largest id of an analysis table."""
    return int(con.execute(f"SELECT coalesce(max(id), 0) + 1 FROM {table}").fetchall()[0][0])


def decision_row(d: Decision, prompt_id: int, pos: int, source: str, step: int | None = None) -> dict:
    """A `decisions` row (without id) for one decision."""
    s = d.strategy.to_dict()
    return {"prompt_id": prompt_id, "pos": pos, "step": step, "source": source, "strategy": s["strategy"],
            "temperature": s["temperature"], "top_k": s["top_k"], "top_p": s["top_p"], "min_p": s["min_p"],
            "seed": s["seed"], "exact": d.exact, "tail_mass": d.tail_mass, "cut_mass": d.cut_mass,
            "kept_ids": [int(i) for i in d.kept_ids], "kept_probs": [float(p) for p in d.kept_probs],
            "chosen_id": d.chosen_id, "chosen_rank": d.chosen_rank, "chosen_prob": d.chosen_prob,
            "model_prob": d.model_prob}


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict], with_id: bool = False) -> list[int]:
    """Insert rows (dicts with the same keys) into an analysis table; returns the ids given when ``with_id``."""
    if not rows:
        return []
    ids: list[int] = []
    if with_id:
        start = next_id(con, table)
        ids = list(range(start, start + len(rows)))
        rows = [{"id": i, **row} for i, row in zip(ids, rows)]
    if table in ("decisions", "projections", "tuned_lens"):
        now = pd.Timestamp.now().to_pydatetime()
        rows = [{**row, "created_at": now} for row in rows]
    frame = pa.Table.from_pylist(rows)  # None stays NULL (pandas would turn it into NaN)
    con.register("_incoming", frame)
    try:
        columns = ", ".join(frame.column_names)
        con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _incoming")
    finally:
        con.unregister("_incoming")
    return ids

"""Reading interventions back: effects, whole counterfactual journeys, trace grids and stored directions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from geomap.errors import GeomapError
from geomap.store.codec import from_blob
from geomap.store.handle import Store
from geomap.store.interventions import has_intervention_tables


class NoInterventionsError(GeomapError):
    """The store holds no such intervention (or none at all)."""


def _read(db_path: str | Path, sql: str, params: list | None = None) -> pd.DataFrame:
    with Store.use(db_path, "r") as opened, opened.snapshot() as con:
        if not has_intervention_tables(con):
            raise NoInterventionsError(f"{db_path} holds no interventions; run `geomap intervene` first")
        return con.execute(sql, params or []).df()


def effects(db_path: str | Path, sweep: str | None = None) -> pd.DataFrame:
    """Every intervention's effects (one row per intervention and target token), with its ledger columns."""
    where = "WHERE i.sweep = ?" if sweep else ""
    return _read(db_path, f"""SELECT i.id AS intervention_id, i.sweep, i.operation, i.site, i.layer, i.head,
                                     i.positions, i.coefficient, i.seed, i.prompt_id, i.source_prompt_id, e.*
                                      EXCLUDE (intervention_id)
                              FROM interventions i JOIN effects e ON e.intervention_id = i.id {where}
                              ORDER BY i.id, e.token_id""", [sweep] if sweep else [])


def sweeps(db_path: str | Path) -> pd.DataFrame:
    """The sweeps a store holds: name, operation, interventions, prompts."""
    return _read(db_path, """SELECT sweep, any_value(operation) AS operation, count(*) AS interventions,
                                    count(DISTINCT prompt_id) AS prompts, min(id) AS first_id
                             FROM interventions GROUP BY sweep ORDER BY min(id)""")


def counterfactual(db_path: str | Path, intervention_id: int) -> tuple[pd.DataFrame, np.ndarray]:
    """An intervened journey as a whole: `trajectory`-style rows and the residual vectors (L+1, T, d)."""
    frame = _read(db_path, """SELECT c.pos, c.layer, c.norm, c.cos_final, c.changed, c.vec, c.vec_bf16
                              FROM counterfactual_states c WHERE c.intervention_id = ? ORDER BY layer, pos""",
                  [intervention_id])
    if frame.empty:
        raise NoInterventionsError(f"no intervention {intervention_id} in {db_path}")
    vectors = [np.asarray(v, np.float32) if v is not None else from_blob(b)
               for v, b in zip(frame.pop("vec"), frame.pop("vec_bf16"))]
    n_layers, n_pos = int(frame.layer.max()) + 1, int(frame.pos.max()) + 1
    return frame, np.stack(vectors).reshape(n_layers, n_pos, -1)


def journey_diff(db_path: str | Path, intervention_id: int) -> pd.DataFrame:
    """Clean vs intervened at the last position, per boundary: cosine, norms, lens top-1 of both."""
    return _read(db_path, """
        WITH i AS (SELECT id, prompt_id FROM interventions WHERE id = ?),
        last AS (SELECT max(pos) AS pos FROM states WHERE prompt_id = (SELECT prompt_id FROM i))
        SELECT s.layer, s.norm AS clean_norm, c.norm AS norm,
               CASE WHEN c.changed THEN list_cosine_similarity(c.vec::FLOAT[], s.vec::FLOAT[]) ELSE 1.0 END
                   AS cosine,
               t.clean_top1_id, t.top1_id, t.top1_prob, c.changed
        FROM i JOIN states s ON s.prompt_id = i.prompt_id AND s.pos = (SELECT pos FROM last)
        JOIN counterfactual_states c ON c.intervention_id = i.id AND c.pos = s.pos AND c.layer = s.layer
        JOIN counterfactual_trajectory t ON t.intervention_id = i.id AND t.pos = s.pos AND t.layer = s.layer
        ORDER BY s.layer""", [intervention_id])


def trace_grid(db_path: str | Path, sweep: str, token_id: int | None = None) -> pd.DataFrame:
    """A trace or patch sweep as a (layer, position) grid of the target token's probability and its change."""
    frame = effects(db_path, sweep)
    if frame.empty:
        raise NoInterventionsError(f"no sweep {sweep!r} in {db_path}")
    token = token_id if token_id is not None else int(frame.token_id.iloc[0])
    frame = frame[frame.token_id == token].copy()
    frame["pos"] = [int(p[0]) for p in frame.positions]
    return frame[["intervention_id", "layer", "pos", "prob", "clean_prob", "prob_change", "logit_change", "kl",
                  "first_flip_layer"]].reset_index(drop=True)


def tagged_mean_state(db_path: str | Path, tag: str, layer: int) -> np.ndarray:
    """The mean stored residual at ``layer`` of the last position of every prompt tagged ``tag`` (d,)."""
    with Store.use(db_path, "r") as opened, opened.snapshot() as con:
        rows = con.execute("""SELECT s.vec, s.vec_bf16 FROM states s JOIN prompts p ON p.id = s.prompt_id
                              WHERE list_contains(p.tags, ?) AND s.layer = ? AND s.pos = p.n_tokens - 1
                                AND p.status = 'done'""", [tag, layer]).fetchall()
    if not rows:
        raise NoInterventionsError(f"no stored prompt is tagged {tag!r}")
    return np.mean([_vector(v, b) for v, b in rows], axis=0)


def stored_state(db_path: str | Path, state_id: int) -> np.ndarray:
    """One stored residual vector by its ``states.id`` (d,)."""
    with Store.use(db_path, "r") as opened, opened.snapshot() as con:
        rows = con.execute("SELECT vec, vec_bf16 FROM states WHERE id = ?", [state_id]).fetchall()
    if not rows:
        raise NoInterventionsError(f"no stored state {state_id}")
    return _vector(*rows[0])


def _vector(vec, blob) -> np.ndarray:
    return np.asarray(vec, np.float32) if vec is not None else from_blob(blob)

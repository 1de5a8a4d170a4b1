"""The API behind `geomap stats`: a stored position's trajectory from the statistics views (SQL only, no torch)."""

from __future__ import annotations

import pandas as pd

from geomap.analysis import load
from geomap.store.db import ensure_schema
from geomap.store.handle import Store, StoreLike


def trajectory_stats(store: StoreLike, prompt_id: int, pos: int | None = None) -> pd.DataFrame:
    """One position's trajectory through the layers, from the ``layer_curves`` and ``position_stats`` views.

    Returns:
        One row per boundary: ``layer, top1_id, top1_token, top1_prob, lens_margin, entropy, kl_to_final,
        final_rank, norm, norm_growth, cos_final``. ``attrs`` holds ``prediction_depth``, ``final`` (the
        model's top-1 ``{id, token}``) and ``pos``.
    """
    with Store.use(store, "w") as opened, opened.writer() as con:
        ensure_schema(con)
        info = load.prompt_info(con, prompt_id)
        pos = load.resolve_pos(info, pos)
        frame = con.execute("""
            SELECT c.layer, c.top1_id, v.text AS top1_token, l.top1_prob, c.lens_margin, c.entropy, c.kl_to_final,
                   c.final_rank, c.norm, c.norm_growth, c.cos_final
            FROM layer_curves c
            LEFT JOIN lens_stats l USING (prompt_id, pos, layer)
            LEFT JOIN vocab v ON v.weights_sha256 = ? AND v.token_id = c.top1_id
            WHERE c.prompt_id = ? AND c.pos = ? ORDER BY c.layer""", [info.weights_sha256, prompt_id, pos]).df()
        depth = con.execute("SELECT prediction_depth FROM position_stats WHERE prompt_id = ? AND pos = ?",
                            [prompt_id, pos]).fetchall()
        final = con.execute("SELECT token_ids[1] FROM next_token WHERE prompt_id = ? AND pos = ?",
                            [prompt_id, pos]).fetchall()[0][0]
        final_text = load.token_texts(con, info.weights_sha256, [final]).get(final)
    frame.attrs.update(prediction_depth=depth[0][0] if depth else None, final={"id": final, "token": final_text},
                       pos=pos, prompt_id=prompt_id, text=info.text)
    return frame

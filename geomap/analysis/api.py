"""The analysis stage's Python API over a store: each function reads, analyses, persists, returns a DataFrame.

Scalars that describe a whole result (the chosen token, the margin, the logit) travel in ``frame.attrs``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from geomap.analysis import load
from geomap.analysis.decoding import Strategy, decide
from geomap.analysis.persist import decision_row, insert_rows
from geomap.store.db import connect, ensure_schema


def decode(db_path: str | Path, prompt_id: int, strategy: Strategy, pos: int | None = None) -> pd.DataFrame:
    """Decide the next token from stored logits (no model rerun) and store the decision in ``decisions``.

    Args:
        db_path: The store.
        prompt_id: A stored prompt.
        strategy: Greedy, or sampling with temperature / top-k / top-p / min-p and a seed.
        pos: The position whose next token is decided (default: the last, where the full logits are stored).

    Returns:
        The kept candidates (``id, token, prob``), most probable first. ``attrs`` holds ``chosen`` (``id, token,
        rank, prob``), ``exact``, ``cut_mass``, ``tail_mass``, ``strategy``, ``pos`` and ``decision_id``.
    """
    con = connect(db_path)
    try:
        ensure_schema(con)
        info = load.prompt_info(con, prompt_id)
        pos = load.resolve_pos(info, pos)
        d = decide(load.candidates(con, info, pos), strategy)
        (decision_id,) = insert_rows(con, "decisions", [decision_row(d, prompt_id, pos, "decode")], with_id=True)
        texts = load.token_texts(con, info.weights_sha256, [*d.kept_ids, d.chosen_id])
    finally:
        con.close()
    frame = pd.DataFrame({"id": d.kept_ids.astype(int), "token": [texts.get(int(i)) for i in d.kept_ids],
                          "prob": d.kept_probs.astype(float)})
    frame.attrs.update(
        chosen={"id": d.chosen_id, "token": texts.get(d.chosen_id), "rank": d.chosen_rank, "prob": d.chosen_prob},
        exact=d.exact, cut_mass=d.cut_mass, tail_mass=d.tail_mass, strategy=strategy.to_dict(), pos=pos,
        prompt_id=prompt_id, decision_id=decision_id)
    return frame

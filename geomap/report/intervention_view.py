"""Report pages of interventions: a sweep's heatmap or steering chart, and each intervened journey beside its clean one.

Pages read the store only (the ledger, the effects and the counterfactual views). A sweep page is
``intervene-<first id>.html`` (its ledger id range names it uniquely); each intervention's journey diff is
``intervention-<id>.html``, and every heatmap cell and chart point links to one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from geomap.analysis.interventions import effects, journey_diff, sweeps
from geomap.report.pages import write_page
from geomap.report.render import render
from geomap.store.handle import Store


def _tokens(db_path, prompt_id: int) -> list[str]:
    with Store.use(db_path, "r") as opened, opened.snapshot() as con:
        return [r[0] for r in con.execute("SELECT text FROM tokens WHERE prompt_id = ? ORDER BY pos",
                                          [prompt_id]).fetchall()]


def _vocab(db_path, ids: list[int]) -> dict[int, str]:
    with Store.use(db_path, "r") as opened, opened.snapshot() as con:
        rows = con.execute("SELECT token_id, any_value(text) FROM vocab WHERE token_id IN (SELECT unnest(?)) "
                           "GROUP BY token_id", [[int(i) for i in ids]]).fetchall()
    return {int(i): t for i, t in rows}


def _prompt_text(db_path, prompt_id: int) -> str:
    with Store.use(db_path, "r") as opened, opened.snapshot() as con:
        return con.execute("SELECT text FROM prompts WHERE id = ?", [prompt_id]).fetchall()[0][0]


def _vector_label(db_path, intervention_id: int) -> str | None:
    """The label of a steer's direction (e.g. ``u(' over') - u(' coming')``), from the ledger's spec."""
    with Store.use(db_path, "r") as opened, opened.snapshot() as con:
        label = con.execute("SELECT spec->>'$.vector.label' FROM interventions WHERE id = ?",
                            [intervention_id]).fetchall()
    return label[0][0] if label else None


def _none(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value) else value


def sweep_data(db_path: str | Path, name: str) -> dict:
    """A sweep as plain data.

    A layer × position grid (one prompt, or a mean with a 95% CI over prompts aligned from the end), or for a steer
    the probability of each target token against α.
    """
    frame = effects(db_path, name)
    targets = list(dict.fromkeys(int(t) for t in frame.token_id))
    texts = dict(zip(frame.token_id.astype(int), frame.token))
    op = str(frame.operation.iloc[0])
    sources = [int(p) for p in frame.source_prompt_id.dropna().unique()]
    data = {"name": name, "operation": op, "targets": [{"id": t, "text": texts[t]} for t in targets],
            "prompts": [{"id": int(p), "text": _prompt_text(db_path, int(p))} for p in frame.prompt_id.unique()],
            "sources": [{"id": p, "text": _prompt_text(db_path, p)} for p in sources],
            "sites": sorted({str(x) for x in frame.site}), "layers": sorted({int(x) for x in frame.layer}),
            "positions": sorted({int(p) for ps in frame.positions for p in ps})}
    if op == "steer":
        data["vector"] = _vector_label(db_path, int(frame.intervention_id.iloc[0]))
        data["series"] = _series(frame, targets)
        return data
    target = targets[0]
    sub = frame[frame.token_id == target].copy()
    sub["pos"] = [int(p[0]) for p in sub.positions]
    first_prompt = int(sub.prompt_id.iloc[0])
    tokens = _tokens(db_path, first_prompt)
    n = len(tokens)
    sub["col"] = sub.pos - [len(_tokens(db_path, int(p))) for p in sub.prompt_id] + n  # aligned from the end
    layers = sorted(sub.layer.unique())
    cells = {}
    for (layer, col), group in sub.groupby(["layer", "col"]):
        probs = group.prob.to_numpy(np.float64)
        mean = float(probs.mean())
        half = float(1.96 * probs.std(ddof=1) / math.sqrt(len(probs))) if len(probs) > 1 else None
        cells[(int(layer), int(col))] = {
            "mean": mean, "ci": half, "n": len(probs),
            "change": float(group.prob_change.mean()),
            "links": [{"id": int(i), "prompt": int(p)} for i, p in zip(group.intervention_id, group.prompt_id)]}
    top = max((c["mean"] for c in cells.values()), default=1.0) or 1.0
    data.update(target=target, target_text=texts[target], tokens=tokens, layers=[int(x) for x in layers],
                columns=list(range(n)), top=top, aggregate=len(data["prompts"]) > 1,
                clean_prob=float(sub.clean_prob.mean()),
                grid=[[cells.get((int(layer), col)) for col in range(n)] for layer in layers],
                site=str(sub.site.iloc[0]))
    return data


def _series(frame: pd.DataFrame, targets: list[int]) -> dict:
    frame = frame.sort_values("coefficient")
    alphas = sorted(float(a) for a in frame.coefficient.unique())
    lines = []
    for t in targets:
        sub = frame[frame.token_id == t]
        lines.append({"token_id": t, "text": str(sub.token.iloc[0]),
                      "points": [{"alpha": float(a), "prob": float(p), "id": int(i), "top1_changed": bool(c)}
                                 for a, p, i, c in zip(sub.coefficient, sub.prob, sub.intervention_id,
                                                       sub.top1_changed)]})
    first = frame[frame.token_id == targets[0]]
    flipped = [float(a) for a, c in zip(first.coefficient, first.top1_changed) if c]
    top1 = _vocab_top1(frame)
    return {"alphas": alphas, "lines": lines, "flip_alpha": flipped[0] if flipped else None,
            "top1": top1, "max_prob": max(float(frame.prob.max()), 1e-9)}


def _vocab_top1(frame: pd.DataFrame) -> list[dict]:
    first = frame.drop_duplicates("intervention_id").sort_values("coefficient")
    return [{"alpha": float(a), "top1_id": int(t)} for a, t in zip(first.coefficient, first.top1_id)]


def diff_data(db_path: str | Path, intervention_id: int) -> dict:
    """Clean vs intervened per layer at the last position, the divergence marked, and the effects."""
    diff = journey_diff(db_path, intervention_id)
    eff = effects(db_path)
    eff = eff[eff.intervention_id == intervention_id]
    row = eff.iloc[0]
    names = _vocab(db_path, [*diff.clean_top1_id.dropna(), *diff.top1_id.dropna()])
    first_flip = _none(row.first_flip_layer)
    head = _none(row["head"])  # not row.head: that is the Series' own head() method
    source = _none(row.source_prompt_id)
    ranks = _ranks(eff)
    layers = [{"layer": int(r.layer), "clean_norm": float(r.clean_norm), "norm": float(r.norm),
               "cosine": float(r.cosine), "changed": bool(r.changed),
               "clean_top1": names.get(int(r.clean_top1_id)) if _none(r.clean_top1_id) is not None else None,
               "top1": names.get(int(r.top1_id)) if _none(r.top1_id) is not None else None,
               "top1_prob": _none(r.top1_prob), "diverged": first_flip is not None and int(r.layer) == int(first_flip),
               "ranks": [{"token_id": t["token_id"], "clean": t["clean"][int(r.layer)], "rank": t["rank"][int(r.layer)]}
                         if t["rank"] else {"token_id": t["token_id"], "clean": None, "rank": None} for t in ranks]}
              for r in diff.itertuples()]
    return {"id": intervention_id, "sweep": str(row.sweep), "operation": str(row.operation), "site": str(row.site),
            "layer": int(row.layer), "head": None if head is None else int(head),
            "positions": [int(p) for p in row.positions],
            "source": None if source is None else {"id": int(source), "text": _prompt_text(db_path, int(source))},
            "coefficient": float(row.coefficient or 0.0), "prompt": _prompt_text(db_path, int(row.prompt_id)),
            "tokens": _tokens(db_path, int(row.prompt_id)), "first_flip": first_flip, "layers": layers,
            "rank_targets": [{"token_id": t["token_id"], "text": t["text"]} for t in ranks],
            "effects": [{k: _none(v) for k, v in r.items() if k not in ("lens_ranks", "clean_lens_ranks")}
                        for r in eff.to_dict(orient="records")]}


def _ranks(eff: pd.DataFrame) -> list[dict]:
    """Each target's lens rank at the last position per boundary, clean and intervened (empty: an older store)."""
    out = []
    for r in eff.itertuples():
        stored = r.lens_ranks is not None and not (isinstance(r.lens_ranks, float) and math.isnan(r.lens_ranks))
        out.append({"token_id": int(r.token_id), "text": str(r.token),
                    "rank": [int(x) for x in r.lens_ranks] if stored else [],
                    "clean": [int(x) for x in r.clean_lens_ranks] if stored else []})
    return out


def intervention_reports(db_path: str | Path, folder: str | Path, names: list[str] | None = None,
                         single_file: bool = False) -> list[Path]:
    """Write every sweep's page (or those named) and the journey diff of each of its interventions."""
    folder = Path(folder)
    table = sweeps(db_path)
    written = []
    for sweep in table.itertuples():
        if names is not None and sweep.sweep not in names:
            continue
        data = sweep_data(db_path, sweep.sweep)
        ids = sorted({int(i) for i in effects(db_path, sweep.sweep).intervention_id})
        data["page"] = f"intervene-{int(sweep.first_id)}.html"
        for iid in ids:
            diff = diff_data(db_path, iid)
            diff["back"] = data["page"]
            written.append(write_page(render("intervention.html.j2", diff, single_file),
                                      folder / f"intervention-{iid}.html", single_file))
        written.append(write_page(render("intervene_sweep.html.j2", data, single_file), folder / data["page"],
                                  single_file))
    return written

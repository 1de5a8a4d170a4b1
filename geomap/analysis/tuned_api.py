"""The API behind `geomap tuned-lens`: train on a run's stored states, store translators and statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from geomap.analysis import load
from geomap.analysis.persist import insert_rows, next_id
from geomap.analysis.tuned_lens import final_logprobs, full_kl, train_tuned_lens
from geomap.store.db import ensure_schema, in_transaction
from geomap.store.handle import Store, StoreLike


def tuned_lens(store: StoreLike, run_id: int, steps: int = 150, heldout_every: int = 5, seed: int = 0,
               loaded=None) -> pd.DataFrame:
    """Train a tuned lens on a run's states; every ``heldout_every``-th prompt is held out for the report.

    Position 0 (the BOS token, whose state does not depend on the text) is left out. Results go to
    ``tuned_lens`` (translators and held-out KL of both lenses) and ``tuned_lens_stats`` (per prompt, position
    and layer, beside ``lens_stats``).

    Returns:
        One row per layer: ``layer, tuned_kl, logit_kl, steps``; ``attrs`` holds ``lens_id``, ``train_prompts``,
        ``heldout_prompts``, ``positions``.
    """
    from geomap.analysis.maps import run_model

    with Store.use(store, "w") as opened, opened.writer() as con:
        ensure_schema(con)
        loaded = run_model(con, run_id, loaded)
        states = load.run_states(con, run_id)
        keep = states.pos > 0
        keys = sorted(set(zip(states.prompt_ids[keep].tolist(), states.pos[keep].tolist())))
        index = {key: i for i, key in enumerate(keys)}
        n_layers = int(states.layers.max())
        resid = np.zeros((n_layers + 1, len(keys), states.x.shape[1]), np.float32)
        for i in np.flatnonzero(keep):
            resid[states.layers[i], index[(int(states.prompt_ids[i]), int(states.pos[i]))]] = states.x[i]
        prompts = np.asarray([k[0] for k in keys])
        order = {p: i for i, p in enumerate(sorted(set(prompts.tolist())))}
        heldout = np.asarray([order[p] % heldout_every == heldout_every - 1 for p in prompts])
        lens, reports = train_tuned_lens(loaded, resid, ~heldout, heldout, steps=steps, seed=seed)
        with torch.no_grad():
            final_logp = final_logprobs(loaded, torch.as_tensor(resid[-1]))
            stats = []
            for i, layer in enumerate(lens.layers.tolist()):
                h = torch.as_tensor(resid[layer])
                kl, top1 = full_kl(loaded, h + h @ torch.as_tensor(lens.weights[i]) + torch.as_tensor(lens.biases[i]),
                                   final_logp)
                stats.append((layer, kl.numpy(), top1.numpy()))
        with in_transaction(con):
            lens_id = next_id(con, "tuned_lens")
            n_train = len(set(prompts[~heldout].tolist()))
            insert_rows(con, "tuned_lens", [{
                "id": lens_id, "layer": r.layer, "weights_sha256": loaded.weights_hash, "d": resid.shape[2],
                "weight": lens.weights[i].astype("<f4").tobytes(), "bias": lens.biases[i].astype("<f4").tobytes(),
                "train_prompts": n_train, "heldout_kl": r.tuned_kl, "logit_lens_kl": r.logit_kl}
                for i, r in enumerate(reports)])
            insert_rows(con, "tuned_lens_stats", [
                {"lens_id": lens_id, "prompt_id": int(prompts[j]), "pos": keys[j][1], "layer": layer,
                 "top1_id": int(top1[j]), "kl_to_final": float(kl[j]), "heldout": bool(heldout[j])}
                for layer, kl, top1 in stats for j in range(len(keys))])
    frame = pd.DataFrame([{"layer": r.layer, "tuned_kl": r.tuned_kl, "logit_kl": r.logit_kl, "steps": r.steps}
                          for r in reports])
    frame.attrs.update(lens_id=lens_id, train_prompts=n_train, heldout_prompts=len(set(prompts[heldout].tolist())),
                       positions=len(keys), run_id=run_id)
    return frame

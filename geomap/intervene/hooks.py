"""Edits of one forward pass, row by row of the batch, through hooks on the wrapped Hugging Face model.

A *site* is a place in the computation the registry names: the residual stream at a boundary (``resid``, 0..L: the
input of decoder layer l, or the last layer's output at L), what a layer's attention adds to it (``attn``: the
output of `Anatomy.attn_add`), what its MLP adds (``mlp``: `Anatomy.mlp_add`), one head's share of the attention
(``head``: the head's slice of the input of W_O), or the token embedding (``embed``: the embedding module's output,
where a causal trace adds its noise). An `Edit` sets or adds a value at given positions of one site; `Edits` applies
a list of edits per batch row while its context is open, and records the residual stream it produced. Nothing is
computed by geomap itself: the model runs its own modules and geomap only rewrites the tensors between them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from geomap.intervene.sites import Site
from geomap.models.registry import Anatomy


@dataclass
class Edit:
    """Set (``mode="set"``) or add (``mode="add"``) ``value`` at ``positions`` of a site.

    ``value`` is (P, width) for the P positions, or (width,) for all of them.
    """

    site: Site
    positions: list[int]
    value: torch.Tensor
    mode: str = "set"


def _apply(x: torch.Tensor, row: int, edit: Edit, head_dim: int) -> None:
    pos = torch.as_tensor(edit.positions, dtype=torch.long, device=x.device)
    value = edit.value.to(device=x.device, dtype=x.dtype)
    if edit.site.kind == "head":
        cols = slice(edit.site.head * head_dim, (edit.site.head + 1) * head_dim)
        target = x[row, :, cols]
    else:
        target = x[row]
    if edit.mode == "add":
        target[pos] = target[pos] + value
    else:
        target[pos] = value.expand(len(edit.positions), value.shape[-1])


@dataclass
class Edits:
    """Context manager that applies per-row edits and records the residual stream of one forward pass.

    Args:
        anatomy: The model's registry view.
        rows: One list of edits per batch row (an empty list leaves the row as the model computes it).
        record: Sites whose values (after the edits) are kept in `values` as {site: (B, T, width)}; the residual
            boundaries are always kept in `resid`.

    Hooks are registered on entry and removed on exit; a row's edits touch that row only.
    """

    anatomy: Anatomy
    rows: list[list[Edit]]
    record: tuple[Site, ...] = ()
    resid: list[torch.Tensor | None] = field(default_factory=list)
    values: dict[Site, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> Edits:
        a = self.anatomy
        self._by_site: dict[Site, list[tuple[int, Edit]]] = defaultdict(list)
        for row, edits in enumerate(self.rows):
            for edit in edits:
                self._by_site[edit.site].append((row, edit))
        self.resid = [None] * (a.n_layers + 1)
        touched = {*self._by_site, *self.record}
        heads = defaultdict(list)
        for site in sorted(touched, key=lambda s: (s.kind, s.layer, s.head or 0)):
            site.check(a)
            if site.kind == "head":
                heads[site.layer].append(site)
        for i, layer in enumerate(a.layers):
            self._pre(layer, lambda x, i=i: self._keep(i, self._edit(x, [Site("resid", i)])))
            for kind, module in (("attn", a.attn_add), ("mlp", a.mlp_add)):
                if Site(kind, i) in touched:
                    site = Site(kind, i)
                    self._post(module(i), lambda y, s=site: self._edit(y, [s]))
            if heads.get(i):
                proj = a.attn(i).get_submodule(a.spec.o_proj)
                self._pre(proj, lambda x, s=heads[i]: self._edit(x, s))
        n = a.n_layers
        self._post(a.layers[-1], lambda y: self._keep(n, self._edit(y, [Site("resid", n)])))
        if Site("embed", 0) in touched:
            self._post(a.embed, lambda y: self._edit(y, [Site("embed", 0)]))
        return self

    def _edit(self, x: torch.Tensor, sites: list[Site]) -> torch.Tensor:
        """Apply the rows' edits of ``sites`` to a copy of ``x`` (in the order given), and record what is asked."""
        todo = [(row, e) for s in sites for row, e in self._by_site.get(s, ())]
        if todo:
            x = x.clone()
            for row, e in todo:
                _apply(x, row, e, self.anatomy.head_dim)
        for s in sites:
            if s in self.record:
                self.values[s] = _read(x, s, self.anatomy.head_dim)
        return x

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _keep(self, boundary: int, x: torch.Tensor) -> torch.Tensor:
        self.resid[boundary] = x
        return x

    def _pre(self, module, fn) -> None:
        def hook(_module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            name = next(iter(kwargs))
            return args, {**kwargs, name: fn(kwargs[name])}

        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, module, fn) -> None:
        def hook(_module, _args, out):
            if isinstance(out, tuple):
                return (fn(out[0]), *out[1:])
            return fn(out)

        self._handles.append(module.register_forward_hook(hook))


def _read(x: torch.Tensor, site: Site, head_dim: int) -> torch.Tensor:
    if site.kind == "head":
        return x[..., site.head * head_dim:(site.head + 1) * head_dim].detach().clone()
    return x.detach().clone()

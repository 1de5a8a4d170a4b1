"""Sites of an intervention: where in the forward pass an edit lands, checked against a model's anatomy.

Torch-free, so a pipeline file's ``[[interventions]]`` are validated without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from geomap.errors import GeomapError

if TYPE_CHECKING:
    from geomap.models.registry import Anatomy

SITE_KINDS = ("resid", "attn", "mlp", "head", "embed")


class InterventionError(GeomapError):
    """An intervention the model or the prompt cannot take (a layer, head or position it does not have)."""


@dataclass(frozen=True)
class Site:
    """One place in the forward pass.

    Attributes:
        kind: ``resid``, ``attn``, ``mlp``, ``head`` or ``embed``.
        layer: Residual boundary (0..L) for ``resid``; decoder layer (0..L-1) for ``attn``, ``mlp``, ``head``;
            0 for ``embed``.
        head: Query head for ``head``, else None.
    """

    kind: str
    layer: int = 0
    head: int | None = None

    def check(self, anatomy: Anatomy) -> None:
        """Raise `InterventionError` when the model has no such site."""
        n = anatomy.n_layers
        if self.kind not in SITE_KINDS:
            raise InterventionError(f"site {self.kind!r} is not one of {', '.join(SITE_KINDS)}")
        top = n if self.kind == "resid" else (0 if self.kind == "embed" else n - 1)
        if not 0 <= self.layer <= top:
            raise InterventionError(f"layer {self.layer} is out of range for site {self.kind!r} (0..{top})")
        if self.kind == "head" and not (self.head is not None and 0 <= self.head < anatomy.n_heads):
            raise InterventionError(f"head {self.head} is out of range (0..{anatomy.n_heads - 1})")

    def first_boundary(self) -> int:
        """The first residual boundary an edit of this site can change."""
        if self.kind == "resid":
            return self.layer
        return 0 if self.kind == "embed" else self.layer + 1

    def width(self, anatomy: Anatomy) -> int:
        """Size of the vectors at this site."""
        return anatomy.head_dim if self.kind == "head" else anatomy.d_model

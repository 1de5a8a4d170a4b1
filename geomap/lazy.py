"""Lazy package exports (PEP 562): a package names what it exports, each loaded from its module on first use.

So importing a torch-free module of a package (``geomap.capture.config``, ``geomap.models.identity``,
``geomap.intervene.sites``) does not import the package's torch modules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each name of ``where`` from ``package.<module>``."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__

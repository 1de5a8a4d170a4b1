"""`Lru`: a mapping that keeps at most ``size`` entries, dropping the least recently used (the package's caches)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class Lru(Generic[V]):
    """A thread-safe cache of at most ``size`` values by key; the least recently used entry goes first.

    Args:
        size: The most entries kept (at least 1).
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        self.size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        """The value cached under ``key`` (now the most recently used), or None."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: V) -> V:
        """Cache ``value`` under ``key`` (dropping the least recently used entry beyond ``size``); returns it."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def get_or_put(self, key: Hashable, make: Callable[[], V]) -> V:
        """The cached value, else ``make()`` cached (``make`` runs outside the lock; a race computes it twice)."""
        found = self.get(key)
        return found if found is not None else self.put(key, make())

    def __len__(self) -> int:
        return len(self._items)

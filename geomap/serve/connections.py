"""Bounded connections: slow or idle clients cannot hold the server (uvicorn's h11 protocol, with two limits).

uvicorn closes a keep-alive connection that stays idle after a response, but a connection that never finishes its
request headers lives on (every byte it trickles restarts nothing), and each one counts against uvicorn's
``limit_concurrency``, past which every request, ``/healthz`` included, gets 503. This protocol adds:

- a **header timeout**: a connection must complete a request's headers within `HEADER_TIMEOUT_S` of opening or of its
  previous response, else it is closed;
- an **idle budget**: at most `MAX_IDLE` connections may wait without a request in progress (opening, sending headers,
  or idle between requests); a new one past the budget closes the one that has waited longest, so a crowd of slow
  clients cannot lock others out, and a client that sends its request at once is always served.

Slow request bodies are bounded by the perimeter (`geomap.serve.security`), and request headers by h11's own size
limit (16 KiB).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
MAX_IDLE = 32
LIMIT_CONCURRENCY = 256  # uvicorn's bound on open connections and running requests together


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a budget of idle connections."""

    header_timeout: float = HEADER_TIMEOUT_S
    max_idle: int = MAX_IDLE

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection as idle until its first request, arm its header timer, and keep to the budget."""
        super().connection_made(transport)
        self._arm()
        idle = sorted((c for c in self.connections if getattr(c, "_idle_since", None) is not None and c is not self),
                      key=lambda c: c._idle_since)
        for old in idle[: max(0, len(idle) + 1 - self.max_idle)]:
            old._close_idle()

    def handle_events(self) -> None:
        """Mark the connection busy once h11 has a whole request's headers."""
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:
            self._disarm()

    def on_response_complete(self) -> None:
        """Idle again after a response: re-arm the header timer for the next request."""
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the timer of a closed connection."""
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._idle_since = self.loop.time()
        self._header_timer = self.loop.call_later(self.header_timeout, self._close_idle)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = None
        self._idle_since = None

    def _close_idle(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()

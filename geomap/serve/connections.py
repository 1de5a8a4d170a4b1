"""Bounded connections: slow or idle clients cannot hold the server (uvicorn's HTTP protocols, with three limits).

uvicorn closes a keep-alive connection that stays idle after a response, but a connection that never finishes its
request headers lives on (every byte it trickles restarts nothing), and each one counts against uvicorn's
``limit_concurrency``, past which every request, ``/healthz`` included, gets 503. These protocols add:

- a **header timeout**: a connection must complete a request's headers within `HEADER_TIMEOUT_S` of opening or of its
  previous response, else it is closed;
- an **idle budget**: at most `MAX_IDLE` connections may wait without a request in progress (opening, sending headers,
  or idle between requests); a new one past the budget closes the one that has waited longest, so a crowd of slow
  clients cannot lock others out, and a client that sends its request at once is always served;
- a **header size limit** of `MAX_HEADER_BYTES` (h11's own limit on headers still incomplete; the httptools parser
  has none, so there the request line and headers are counted as they are parsed, and a request past the limit gets
  400 and a closed connection, as from h11).

Each response's status line and headers are held until its first body bytes and leave in one write with them
(`Coalescing`): a write is a system call made holding the GIL, and one that wakes the client while the body is still
to come costs every other request thread a wait (half of the GIL's time under 16 clients went there).

The server speaks HTTP through httptools (llhttp, in C) when it is installed, which costs a fraction of the pure
Python h11 parser per request (`protocol_class`); the limits are the same in both. Slow request bodies are bounded by
the perimeter (`geomap.serve.security`).
"""

from __future__ import annotations

import asyncio
import importlib.util

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0
MAX_IDLE = 32
MAX_HEADER_BYTES = 16 * 1024
LIMIT_CONCURRENCY = 256  # uvicorn's bound on open connections and running requests together


class Coalescing:
    """A transport that holds a response's head (status line and headers) until the next write, then sends both at once.

    Armed when a request's headers are in; the next write that is a final response's head is held, and any later
    write, `flush` or `close` sends it first, so bytes always leave in order. Everything else passes straight through.
    """

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self._armed = False
        self._held: bytes | None = None

    def arm(self) -> None:
        """Hold the next write if it is a response head."""
        self._armed = True

    def write(self, data: bytes) -> None:
        """Write ``data`` (after any held head), or hold it when it is the head of the armed response."""
        if self._armed:
            self._armed = False
            if data[:9] == b"HTTP/1.1 " and data[9:10] != b"1":  # a 1xx (100 Continue) must leave at once
                self._held = bytes(data)
                return
        if self._held is not None:
            data, self._held = self._held + data, None
        self.transport.write(data)

    def flush(self) -> None:
        """Send a held head now (dropped when the connection is already closing: nobody can read it)."""
        if self._held is not None:
            held, self._held = self._held, None
            if not self.transport.is_closing():
                self.transport.write(held)

    def close(self) -> None:
        """Send what is held, then close."""
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str):
        return getattr(self.transport, name)


class _Bounded:
    """The header timer and the idle budget, shared by both protocols (a mixin before uvicorn's class)."""

    header_timeout: float = HEADER_TIMEOUT_S
    max_idle: int = MAX_IDLE

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection as idle until its first request, arm its header timer, and keep to the budget."""
        super().connection_made(transport)  # type: ignore[misc]
        self.transport = Coalescing(transport)  # what each request's cycle writes to
        self._arm()
        idle = sorted((c for c in self.connections if getattr(c, "_idle_since", None) is not None and c is not self),
                      key=lambda c: c._idle_since)
        for old in idle[: max(0, len(idle) + 1 - self.max_idle)]:
            old._close_idle()

    def on_response_complete(self) -> None:
        """Idle again after a response: re-arm the header timer for the next request."""
        self.transport.flush()  # a held head never outlives its response
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the timer of a closed connection."""
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        self._disarm()
        self._idle_since = self.loop.time()
        self._waiting_bytes = 0
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


class BoundedH11Protocol(_Bounded, H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a budget of idle connections (h11 bounds header size)."""

    def handle_events(self) -> None:
        """Mark the connection busy once h11 has a whole request's headers."""
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:
            self._disarm()
            self.transport.arm()


def _httptools_protocol() -> type | None:
    """`_Bounded` over uvicorn's httptools protocol, or None when httptools is not installed."""
    if importlib.util.find_spec("httptools") is None:
        return None
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeadersTooLarge(httptools.HttpParserError):
        """A request's headers passed `MAX_HEADER_BYTES`."""

    class BoundedHttpToolsProtocol(_Bounded, HttpToolsProtocol):
        """uvicorn's httptools protocol with a header timeout, a budget of idle connections and a header size limit."""

        def on_message_begin(self) -> None:
            """A new request: its headers are counted from zero."""
            self._header_bytes = 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            """Mark the connection busy once a whole request's headers are in."""
            self._disarm()
            self.transport.arm()
            super().on_headers_complete()

        def on_url(self, url: bytes) -> None:
            """Count the request line against the header size limit."""
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            """Count each header against the header size limit."""
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def data_received(self, data: bytes) -> None:
            """Parse; a connection still short of a whole request's headers past the limit is refused (trickled)."""
            super().data_received(data)
            if self._idle_since is None or self.transport.is_closing():
                return
            self._waiting_bytes += len(data)
            if self._waiting_bytes > MAX_HEADER_BYTES:
                self._disarm()
                self.send_400_response("Request headers too large.")

        def _count(self, size: int) -> None:
            self._header_bytes += size
            if self._header_bytes > MAX_HEADER_BYTES:  # the parser stops; uvicorn answers 400 and closes
                raise HeadersTooLarge(f"request headers past {MAX_HEADER_BYTES} bytes")

    return BoundedHttpToolsProtocol


def protocol_class() -> type:
    """The server's HTTP protocol: bounded httptools when installed, else bounded h11."""
    return _httptools_protocol() or BoundedH11Protocol


def event_loop() -> str:
    """The event loop uvicorn runs: uvloop when installed (a faster event loop in C), else asyncio's."""
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"

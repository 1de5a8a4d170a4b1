"""Admission: at most as many store readers inside the application as the reader pool has slots; the rest wait in line.

A read request (``POST /sql``, and the ``GET`` views of runs, prompts and neighbours) does a few milliseconds of
Python (routing, validation, the query's setup, encoding) around DuckDB's work. With sixteen clients, sixteen such
requests used to be inside the application at once: twelve waited for a reader slot in worker threads
(`geomap.store.sql_budget.ReaderGate`), and the event loop parsed and validated the next requests while four ran.
Every thread wanted the GIL, and each request cost more CPU than with four clients: sixteen clients reached less
throughput than four.

`Admission` lets in as many read requests as the pool has slots, first come first served, and parks the others as
coroutines of the event loop, which cost nothing while they wait. A request's wait here counts against its SQL time
limit, as a wait for a reader slot always has: `arrived` gives the time it reached the server. A request that waits
longer than the server's longest time limit gets 408. Other requests (health, reports, job submissions, the docs)
are not held.

A request's body is read before it joins the line, so a client that trickles its body holds no slot while it does.
The body's limits (size, a body that stops arriving) stay the perimeter's, which reads the body first and answers
them itself (`geomap.serve.security`); an error of the body that reaches here is handed on to the application at
the point where it reads the body.
"""

from __future__ import annotations

import asyncio
import re
import time

from geomap.serve.security import read_body, replay, reply

ARRIVED = "geomap.arrived"  # the scope key holding a gated request's arrival (``time.perf_counter()``)
READS = re.compile(r"^/(runs|runs/[^/]+|prompts|prompts/.+|neighbors)$")


def is_read(method: str, path: str) -> bool:
    """Whether a request reads the store: ``POST /sql``, or ``GET`` of runs, prompts or neighbours."""
    return path == "/sql" if method == "POST" else method == "GET" and READS.match(path) is not None


def arrived(scope: dict) -> float:
    """When a request reached the server (its admission), as ``time.perf_counter()``; now if it was not held."""
    return scope.get(ARRIVED) or time.perf_counter()


class Admission:
    """ASGI middleware admitting at most ``slots`` read requests at once, in order of arrival.

    Args:
        app: The wrapped ASGI app.
        slots: Read requests inside ``app`` at once (the reader pool's size).
        max_wait: Seconds a request may wait for admission before it gets 408 (the server's longest time limit).
    """

    def __init__(self, app, slots: int, max_wait: float):
        self.app, self.slots, self.max_wait = app, slots, max_wait
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free: asyncio.Semaphore | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # one semaphore per event loop (a test client may run several in turn)
            self._loop, self._free = loop, asyncio.Semaphore(self.slots)
        return self._free

    async def __call__(self, scope, receive, send):
        """Hold a read request until a slot is free, then pass it on; others pass at once."""
        if scope["type"] != "http" or not is_read(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        scope[ARRIVED] = time.perf_counter()
        messages, failure = await read_body(receive)
        receive = replay(messages, failure, receive)
        if failure is not None or messages[-1]["type"] != "http.request":
            return await self.app(scope, receive, send)  # the app answers the body's error, or sees the disconnect
        free = self._semaphore()
        if free.locked():
            try:
                await asyncio.wait_for(free.acquire(), self.max_wait)
            except TimeoutError:
                return await reply(send, 408, f"Refused: all {self.slots} reader slots stayed busy for "
                                              f"{self.max_wait:g} s, the longest time limit of this server; try "
                                              "again.")
        else:
            await free.acquire()
        try:
            return await self.app(scope, receive, send)
        finally:
            free.release()

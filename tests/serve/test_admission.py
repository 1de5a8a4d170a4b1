"""Admission: read requests enter the application as many at a time as the pool has slots, in order of arrival.

An ASGI application of the test's own stands behind the middleware, on a real event loop, so that the test controls
when each request leaves.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from geomap.serve.admission import ARRIVED, Admission, arrived, is_read
from geomap.store.sql import SqlTimeout, run_sql


class Held:
    """An app that records who is inside and answers a request only when the test releases its path."""

    def __init__(self):
        self.inside: set[str] = set()
        self.most = 0
        self.reads = 0
        self.order: list[str] = []
        self.release: dict[str, asyncio.Event] = {}
        self.bodies: dict[str, bytes] = {}

    async def __call__(self, scope, receive, send):
        key = scope["path"] + "?" + scope.get("query_string", b"").decode()
        read = is_read(scope["method"], scope["path"])
        self.inside.add(key)
        self.reads += read
        self.most = max(self.most, self.reads)
        self.order.append(key)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies[key] = body
        await self.release.setdefault(key, asyncio.Event()).wait()
        self.inside.discard(key)
        self.reads -= read
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def scope(method: str, path: str, query: str = "") -> dict:
    return {"type": "http", "method": method, "path": path, "query_string": query.encode(), "headers": []}


async def call(app, method: str, path: str, query: str = "", chunks: list | None = None) -> dict:
    """Send one request through ``app``; returns the status and the decoded body."""
    pending = list(chunks or [b""])
    sent: list[dict] = []

    async def receive():
        if not pending:
            await asyncio.sleep(3600)
        chunk = pending.pop(0)
        if isinstance(chunk, asyncio.Event):  # the body stalls until the test sets it
            await chunk.wait()
            chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    await app(scope(method, path, query), receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": sent[0]["status"], "body": body}


async def settle():
    for _ in range(20):
        await asyncio.sleep(0)


def test_read_requests_enter_as_many_as_the_slots_in_order_and_others_pass():
    async def main():
        inner = Held()
        app = Admission(inner, slots=2, max_wait=30)
        reads = [asyncio.create_task(call(app, "GET", "/runs", f"n={i}")) for i in range(6)]
        await settle()
        assert sorted(inner.inside) == ["/runs?n=0", "/runs?n=1"]  # two in, four waiting in line
        other = asyncio.create_task(call(app, "POST", "/runs"))  # a job submission is not held
        health = asyncio.create_task(call(app, "GET", "/healthz"))
        await settle()
        assert {"/runs?", "/healthz?"} <= inner.inside
        for i in range(6):
            inner.release.setdefault(f"/runs?n={i}", asyncio.Event()).set()
            await settle()
        inner.release["/runs?"].set()
        inner.release["/healthz?"].set()
        answers = await asyncio.gather(*reads, other, health)
        assert [a["status"] for a in answers] == [200] * 8
        assert [k for k in inner.order if k.startswith("/runs?n=")] == [f"/runs?n={i}" for i in range(6)]
        assert inner.most == 2

    asyncio.run(main())


def test_a_request_waiting_past_the_longest_time_limit_gets_408():
    async def main():
        inner = Held()
        app = Admission(inner, slots=1, max_wait=0.2)
        first = asyncio.create_task(call(app, "POST", "/sql", chunks=[b"{}"]))
        await settle()
        start = time.perf_counter()
        late = await call(app, "GET", "/prompts/3/trajectory")
        assert late["status"] == 408 and time.perf_counter() - start >= 0.2
        assert "reader slots stayed busy" in json.loads(late["body"])["detail"]
        inner.release["/sql?"].set()
        assert (await first)["status"] == 200

    asyncio.run(main())


def test_a_body_that_trickles_holds_no_slot_and_arrives_whole():
    async def main():
        inner = Held()
        app = Admission(inner, slots=1, max_wait=30)
        stall = asyncio.Event()
        slow = asyncio.create_task(call(app, "POST", "/sql", chunks=[b'{"sql": ', stall, b'"SELECT 1"}']))
        await settle()
        assert not inner.inside  # its body is still coming: not admitted yet
        inner.release["/runs/7?"] = asyncio.Event()
        quick = asyncio.create_task(call(app, "GET", "/runs/7"))
        await settle()
        assert inner.inside == {"/runs/7?"}  # a complete request passes the trickling one
        stall.set()
        await settle()
        assert "/sql?" not in inner.inside  # in line behind the one slot
        inner.release["/runs/7?"].set()
        await settle()
        inner.release.setdefault("/sql?", asyncio.Event()).set()
        assert (await quick)["status"] == 200 and (await slow)["status"] == 200
        assert inner.bodies["/sql?"] == b'{"sql": "SELECT 1"}'

    asyncio.run(main())


def test_a_body_error_reaches_the_app_where_it_reads_and_takes_no_slot():
    class TooLarge(Exception):
        pass

    async def main():
        seen = []

        async def inner(scope, receive, send):
            try:
                await receive()
                await receive()
            except TooLarge:
                seen.append(scope[ARRIVED])
                await send({"type": "http.response.start", "status": 413, "headers": []})
                await send({"type": "http.response.body", "body": b""})

        app = Admission(inner, slots=1, max_wait=30)
        calls = 0

        async def receive():
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": b"x" * 10, "more_body": True}
            raise TooLarge()

        sent = []

        async def send(message):
            sent.append(message)

        await app(scope("POST", "/sql"), receive, send)
        assert sent[0]["status"] == 413 and seen and app._free is None  # answered without taking a slot

    asyncio.run(main())


def test_which_requests_are_reads():
    assert is_read("POST", "/sql") and not is_read("GET", "/sql")
    for path in ("/runs", "/runs/3", "/prompts", "/prompts/3", "/prompts/3/lens", "/neighbors"):
        assert is_read("GET", path), path
    for method, path in (("POST", "/runs"), ("GET", "/healthz"), ("GET", "/reports/journey"), ("GET", "/docs"),
                         ("GET", "/openapi.json"), ("GET", "/runsx")):
        assert not is_read(method, path), (method, path)
    assert arrived({ARRIVED: 12.5}) == 12.5 and arrived({}) <= time.perf_counter()


def test_a_wait_before_the_query_counts_against_its_time_limit(tmp_path):
    import duckdb

    path = tmp_path / "s.duckdb"
    duckdb.connect(str(path)).close()
    with pytest.raises(SqlTimeout, match="reader slots stayed busy for the whole time limit of 0.5 s"):
        run_sql(path, "SELECT 1", time_limit=0.5, since=time.perf_counter() - 0.6)
    result = run_sql(path, "SELECT 1", time_limit=5, since=time.perf_counter() - 0.3)
    assert result.rows == [(1,)] and result.elapsed_s >= 0.3

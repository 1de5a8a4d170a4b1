"""The perimeter's body limits in front of a FastAPI application: a body streamed past the size limit gets 413, and
one that stops arriving gets 408, each with its own message (raised inside FastAPI's read of the body, both were
its "There was an error parsing the body", 400)."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI
from pydantic import BaseModel

from geomap.serve import security
from geomap.serve.admission import Admission
from geomap.serve.security import Perimeter


class Query(BaseModel):
    """A body as ``POST /sql`` takes one."""

    sql: str


def _app() -> Perimeter:
    app = FastAPI()

    @app.post("/sql")
    def sql(body: Query) -> dict:
        return {"length": len(body.sql)}

    return Perimeter(Admission(app, slots=1, max_wait=5), {"127.0.0.1"}, None, max_body=1000)


def _call(chunks: list[bytes], stall: float = 0.0) -> tuple[int, dict]:
    """POST ``chunks`` as a streamed body (no Content-Length); ``stall`` seconds before the last chunk."""

    async def main():
        pending = list(chunks)

        async def receive():
            if len(pending) == 1 and stall:
                await asyncio.sleep(stall)
            body = pending.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pending)}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/sql", "raw_path": b"/sql", "query_string": b"",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")], "scheme": "http",
                 "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1234), "http_version": "1.1",
                 "root_path": ""}
        await _app()(scope, receive, send)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return status, json.loads(body)

    return asyncio.run(main())


def test_a_streamed_body_within_the_limit_reaches_the_app():
    assert _call([b'{"sql": "SEL', b'ECT 1"}']) == (200, {"length": 8})


def test_a_body_streamed_past_the_limit_gets_413():
    status, got = _call([b'{"sql": "' + b"x" * 600, b"x" * 600 + b'"}'])
    assert status == 413 and "too large" in got["detail"], got


def test_a_body_that_stops_arriving_gets_408(monkeypatch):
    monkeypatch.setattr(security, "BODY_TIMEOUT_S", 0.2)
    status, got = _call([b'{"sql": ', b'"SELECT 1"}'], stall=2.0)
    assert status == 408 and "stopped arriving" in got["detail"], got


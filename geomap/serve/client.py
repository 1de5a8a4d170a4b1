"""The CLI's way to a running server: find it from the store's discovery file, then talk JSON over HTTP."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from geomap.errors import GeomapError
from geomap.serve.runner import discovery_path


class ServerError(GeomapError):
    """The server answered with an error (its message is kept)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"server: {detail}" if status < 500 else f"server error {status}: {detail}")
        self.status = status


class ServerGone(GeomapError):
    """The server did not answer at all: stopped, killed, or unreachable."""


class Client:
    """JSON over HTTP to one geomap server (standard library only)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0, pid: int | None = None):
        self.url, self.token, self.timeout, self.pid = url.rstrip("/"), token, timeout, pid

    def page(self, path: str, wait: float = 3600.0) -> str:
        """GET a report page, waiting while the server answers 202 (it is fitting the maps the page draws).

        Raises:
            ServerError: Any non-2xx answer, or still 202 after ``wait`` seconds.
        """
        end = time.monotonic() + wait
        while True:
            status, text, retry = self._send("GET", path, None)
            if status != 202:
                return text
            if time.monotonic() > end:
                raise ServerError(503, f"{path} was still being prepared after {wait:g} s")
            time.sleep(max(0.5, min(retry, 10.0)))

    def request(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        """Send a request; the decoded JSON answer (or text with ``raw``).

        Raises:
            ServerError: Any non-2xx answer, with the server's ``detail``.
        """
        text = self._send(method, path, body)[1]
        return text if raw else json.loads(text)

    def _send(self, method: str, path: str, body: Any) -> tuple[int, str, float]:
        """One request: status, body text and Retry-After seconds (non-2xx raise `ServerError`)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        if self.token:
            req.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - our own server's URL
                text = resp.read().decode("utf-8")
                status, retry = resp.status, resp.headers.get("retry-after", "1")
        except urllib.error.HTTPError as exc:
            payload = exc.read().decode("utf-8", "replace")
            try:
                detail = json.loads(payload).get("detail", payload)
            except ValueError:
                detail = payload
            raise ServerError(exc.code, detail if isinstance(detail, str) else json.dumps(detail)) from None
        except OSError as exc:  # URLError, a reset or closed connection, a timeout: no answer at all
            reason = getattr(exc, "reason", None) or exc
            raise ServerGone(f"The server at {self.url} did not answer ({reason}): it stopped or was stopped. "
                             "Start it again, or run without it, and rerun the same command: it takes up where it "
                             "left off.") from None
        try:
            seconds = float(retry)
        except ValueError:
            seconds = 1.0
        return status, text, seconds

    def wait_run(self, run_id: int, on_progress=None, poll: float = 0.5) -> dict:
        """Poll ``GET /runs/{id}`` until its job ends; the final answer."""
        while True:
            state = self.request("GET", f"/runs/{run_id}")
            job = state.get("job") or {}
            if on_progress is not None:
                on_progress(job)
            if job.get("status") in ("done", "failed", None):
                return state
            time.sleep(poll)


def find_server(db_path: str | Path) -> Client | None:
    """The server that owns the store at ``db_path``, if one is running (a stale discovery file is ignored)."""
    path = discovery_path(db_path)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    client = Client(info["url"], info.get("token"), timeout=600.0, pid=int(info["pid"]))
    try:
        health = Client(info["url"], info.get("token"), timeout=3.0).request("GET", "/healthz")
    except (GeomapError, OSError):
        return None
    return client if health.get("db") == str(Path(db_path).resolve()) else None

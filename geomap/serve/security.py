"""The server's perimeter, as one ASGI middleware: Host and Origin checks, bearer token, request size limit.

- **Host** (against DNS rebinding): a request whose ``Host`` is not one of the allowed names gets 403.
- **Origin** (against cross-site requests from a browser): a request carrying a foreign ``Origin`` gets 403, and so
  does one a browser marks ``Sec-Fetch-Site: cross-site`` or ``same-site`` (a page of another site or port: an
  ``<img>`` or link to a report would otherwise start work here), or one whose ``Referer`` is a foreign page.
  Browsers send no ``Origin`` on such GETs, but every current one sends ``Sec-Fetch-Site``; a request typed in the
  address bar says ``none``, the server's own pages ``same-origin``, and clients that are not browsers send none.
- **Token**: when the server has one (always when it binds beyond loopback), every request but ``/healthz`` needs
  ``Authorization: Bearer <token>``, else 401.
- **Size**: a body over the limit gets 413, whether announced by ``Content-Length`` or streamed.
- **Slow bodies**: a request whose body stops arriving for `BODY_TIMEOUT_S` is dropped (408), so a client that
  trickles its body cannot hold a request slot.

A body is read whole here, before the application sees the request, so these two are answered here: raised
inside FastAPI's own read of the body, they became its "There was an error parsing the body" (400).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections import deque

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
BODY_TIMEOUT_S = 10.0
BODY_METHODS = ("POST", "PUT", "PATCH")  # requests whose body the perimeter reads before the application sees them


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The name part of a ``Host`` or ``Origin`` authority: no scheme, port or IPv6 brackets; lower case."""
    value = value.strip().lower().split("://", 1)[-1].split("/", 1)[0]
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Perimeter:
    """ASGI middleware applying the checks above before the application sees a request.

    Args:
        app: The wrapped ASGI app.
        allowed_hosts: Host names accepted in ``Host`` and ``Origin`` (lower case).
        token: The bearer token, or None for none (loopback only).
        max_body: Largest request body in bytes.
        open_paths: Paths served without a token.
    """

    def __init__(self, app, allowed_hosts: set[str], token: str | None, max_body: int,
                 open_paths: tuple[str, ...] = ("/healthz",)):
        self.app, self.allowed, self.token, self.max_body, self.open_paths = app, allowed_hosts, token, max_body, \
            open_paths

    async def __call__(self, scope, receive, send):
        """Check one request, answering it directly when a check fails."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = host_name(headers.get("host", ""))
        if host not in self.allowed:
            return await reply(send, 403, f"Host {host!r} is not served here (allowed: {sorted(self.allowed)}); "
                                          "this check stops DNS-rebinding attacks.")
        origin = headers.get("origin")
        if origin and origin != "null" and host_name(origin) not in self.allowed:
            return await reply(send, 403, f"Cross-origin requests from {origin!r} are refused.")
        if origin == "null":
            return await reply(send, 403, "Requests from an opaque origin are refused.")
        site = headers.get("sec-fetch-site", "").strip().lower()
        if site and site not in ("same-origin", "none") and scope["path"] not in self.open_paths:
            return await reply(send, 403, f"Cross-site requests are refused (Sec-Fetch-Site: {site}): open this "
                                          "server's pages directly, not from another site's page.")
        referer = headers.get("referer")
        if referer and host_name(referer) not in self.allowed and scope["path"] not in self.open_paths:
            return await reply(send, 403, "Cross-site requests are refused: the request came from a page of "
                                          "another site (Referer).")
        if self.token and scope["path"] not in self.open_paths:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return await reply(send, 401, "A bearer token is required: send 'Authorization: Bearer <token>' "
                                              "(geomap serve printed it, and wrote it to the store's .serve.json).",
                                   {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await reply(send, 413, f"Request body too large: the limit is {self.max_body} bytes.")
        return await self._with_body(scope, self._limited(receive), send)

    async def _with_body(self, scope, receive, send):
        """Read a request's body whole (answering its limits' errors here, not as FastAPI's 400), then pass it on."""
        if scope["method"] in BODY_METHODS:
            messages, failure = await read_body(receive)
            if isinstance(failure, BodyTooLarge):
                return await reply(send, 413, f"Request body too large: the limit is {self.max_body} bytes.",
                                   {"connection": "close"})
            if isinstance(failure, BodyTimeout):
                return await reply(send, 408, f"The request body stopped arriving for {BODY_TIMEOUT_S:g} s.",
                                   {"connection": "close"})
            receive = replay(messages, failure, receive)
        return await self.app(scope, receive, send)

    def _limited(self, receive):
        seen = 0

        async def wrapped():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
            except TimeoutError:
                raise BodyTimeout(BODY_TIMEOUT_S) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return wrapped


async def read_body(receive) -> tuple[list[dict], BaseException | None]:
    """A request's messages up to its whole body (or a disconnect), and the error that stopped reading, if any."""
    messages: list[dict] = []
    try:
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                return messages, None
    except Exception as exc:  # noqa: BLE001 - the body's limits, or the server's own error: the caller decides
        return messages, exc


def replay(messages: list[dict], failure: BaseException | None, receive):
    """A ``receive`` that gives the messages already read, then raises their error or goes on with ``receive``."""
    queue = deque(messages)

    async def replayed() -> dict:
        if queue:
            return queue.popleft()
        if failure is not None:
            raise failure
        return await receive()

    return replayed


class BodyTooLarge(Exception):
    """A streamed request body passed the size limit."""


class BodyTimeout(Exception):
    """A request body stopped arriving."""


async def reply(send, status: int, detail: str, extra: dict | None = None) -> None:
    """Answer a request directly: ``{"detail": detail}`` as JSON, with ``status`` and any ``extra`` headers."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

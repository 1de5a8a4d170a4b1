"""The server's perimeter, as one ASGI middleware: Host and Origin checks, bearer token, request size limit.

- **Host** (against DNS rebinding): a request whose ``Host`` is not one of the allowed names gets 403.
- **Origin** (against cross-site requests from a browser): a request carrying a foreign ``Origin`` gets 403.
- **Token**: when the server has one (always when it binds beyond loopback), every request but ``/healthz`` needs
  ``Authorization: Bearer <token>``, else 401.
- **Size**: a body over the limit gets 413, whether announced by ``Content-Length`` or streamed.
"""

from __future__ import annotations

import hmac
import ipaddress
import json

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


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
            return await _reply(send, 403, f"Host {host!r} is not served here (allowed: {sorted(self.allowed)}); "
                                           "this check stops DNS-rebinding attacks.")
        origin = headers.get("origin")
        if origin and origin != "null" and host_name(origin) not in self.allowed:
            return await _reply(send, 403, f"Cross-origin requests from {origin!r} are refused.")
        if origin == "null":
            return await _reply(send, 403, "Requests from an opaque origin are refused.")
        if self.token and scope["path"] not in self.open_paths:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                return await _reply(send, 401, "A bearer token is required: send 'Authorization: Bearer <token>' "
                                               "(geomap serve printed it, and wrote it to the store's .serve.json).",
                                    {"www-authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _reply(send, 413, f"Request body too large: the limit is {self.max_body} bytes.")
        return await self.app(scope, self._limited(receive), send)

    def _limited(self, receive):
        seen = 0

        async def wrapped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return wrapped


class BodyTooLarge(Exception):
    """A streamed request body passed the size limit."""


async def _reply(send, status: int, detail: str, extra: dict | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

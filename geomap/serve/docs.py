"""The API docs page, rendered from files that ship with geomap: nothing is loaded from the network.

FastAPI's own ``/docs`` loads Swagger UI from a CDN, which renders nothing offline. This page (``assets/docs.*``)
reads the server's ``/openapi.json`` and lists every endpoint with its parameters, body fields and limits; its
Content-Security-Policy allows only this server's own script, style and ``fetch``.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_TYPES = {"docs.html": "text/html; charset=utf-8", "docs.js": "text/javascript; charset=utf-8",
          "docs.css": "text/css; charset=utf-8"}


def _asset(name: str) -> Response:
    body = files("geomap.serve").joinpath("assets", name).read_bytes()
    return Response(body, media_type=_TYPES[name], headers={"content-security-policy": CSP,
                                                           "x-content-type-options": "nosniff",
                                                           "cache-control": "no-cache"})


@router.get("/docs")
def docs_page() -> Response:
    """The docs page."""
    return _asset("docs.html")


@router.get("/docs/docs.js")
def docs_script() -> Response:
    """The docs page's script."""
    return _asset("docs.js")


@router.get("/docs/docs.css")
def docs_style() -> Response:
    """The docs page's style sheet."""
    return _asset("docs.css")

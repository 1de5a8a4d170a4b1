"""Start a server: settings from the command line, a discovery file for the CLI, uvicorn."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from geomap.errors import GeomapError
from geomap.serve.security import is_loopback

if TYPE_CHECKING:  # the app (and torch) load only when a server starts: the CLI's discovery stays light
    from geomap.serve.app import Settings


def discovery_path(db_path: str | Path) -> Path:
    """``<db>.serve.json``: where a running server says how to reach it (read by the CLI)."""
    path = Path(db_path).resolve()
    return path.with_name(path.name + ".serve.json")


def write_discovery(db_path: Path, url: str, token: str | None) -> Path:
    """Write the discovery file, readable by its owner only (it may hold the token)."""
    target = discovery_path(db_path)
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump({"url": url, "pid": os.getpid(), "db": str(Path(db_path).resolve()), "token": token}, handle)
    os.replace(tmp, target)
    return target


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          access_log: bool = False) -> None:
    """Run the server until interrupted (``access_log``: a line per request on stderr).

    Raises:
        GeomapError: The bind address is not loopback and no token is set (one is generated and printed then,
            so this only fails when token generation is refused with ``token=""``).
    """
    import uvicorn

    if not is_loopback(host):
        if settings.token == "":
            raise GeomapError(f"Binding to {host} needs a bearer token; give --token or GEOMAP_TOKEN.")
        if settings.token is None:
            settings.token = secrets.token_urlsafe(24)
            print(f"geomap serve: bearer token for this session: {settings.token}", flush=True)
        settings.allowed_hosts = (*settings.allowed_hosts, host)
    from geomap.serve.app import create_app

    app = create_app(settings)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    from geomap.serve.connections import LIMIT_CONCURRENCY, event_loop, protocol_class

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=protocol_class(),
                            loop=event_loop(), limit_concurrency=LIMIT_CONCURRENCY, timeout_keep_alive=5,
                            access_log=access_log)
    class _Announcing(uvicorn.Server):
        """Writes the discovery file once listening; removes it on shutdown (before uvicorn re-raises a signal)."""

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                write_discovery(settings.db_path, url, settings.token)

        async def shutdown(self, sockets=None):
            remove_discovery(settings.db_path)
            await super().shutdown(sockets)

    try:
        _Announcing(config).run()
    finally:
        remove_discovery(settings.db_path)


def remove_discovery(db_path: Path) -> None:
    """Remove the discovery file if this process wrote it."""
    found = discovery_path(db_path)
    try:
        if json.loads(found.read_text(encoding="utf-8")).get("pid") == os.getpid():
            found.unlink()
    except (OSError, ValueError):
        pass

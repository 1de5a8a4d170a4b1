"""The CLI's client of a server: a server that does not answer at all is one `GeomapError` naming it."""

from __future__ import annotations

import socket

import pytest

from geomap.errors import GeomapError
from geomap.serve.client import Client, find_server


def test_a_server_that_does_not_answer_is_one_geomap_error_naming_it(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(GeomapError) as info:
        Client(url, timeout=5.0).request("GET", "/runs/1")
    message = str(info.value)
    assert url in message and "did not answer" in message and "\n" not in message, message
    (tmp_path / "s.duckdb.serve.json").write_text(f'{{"pid": 1, "url": "{url}"}}')
    assert find_server(tmp_path / "s.duckdb") is None  # a discovery file whose server is gone is ignored

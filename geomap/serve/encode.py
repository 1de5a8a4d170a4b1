"""Response bodies: JSON by orjson (floats are most of a trajectory's bytes), and Arrow IPC for clients that ask.

orjson writes the same values as the standard library (shortest round-trip floats; NaN, which geomap's JSON never
holds, as null) several times faster. A value it cannot write (an integer past 64 bits, a key that is not a string)
falls back to `json.dumps`, so every body the server wrote before, it still writes.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from fastapi.responses import JSONResponse, Response

ARROW_STREAM = "application/vnd.apache.arrow.stream"


def dumps(content: Any) -> bytes:
    """JSON bytes of ``content``: orjson, else the standard library for what orjson refuses."""
    try:
        return orjson.dumps(content)
    except TypeError:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


class FastJSONResponse(JSONResponse):
    """FastAPI's JSON response, rendered by `dumps`."""

    def render(self, content: Any) -> bytes:
        """The body."""
        return dumps(content)


def wants_arrow(accept: str | None) -> bool:
    """Whether an ``Accept`` header asks for an Arrow IPC stream."""
    return bool(accept) and ARROW_STREAM in accept.lower()


def arrow_response(table: Any, headers: dict[str, str]) -> Response:
    """An Arrow table as one IPC stream (schema, then record batches)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return Response(sink.getvalue().to_pybytes(), media_type=ARROW_STREAM, headers=headers)

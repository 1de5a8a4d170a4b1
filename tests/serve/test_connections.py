"""A response's head and body leave in one write (`Coalescing`), over a real socket and a real event loop."""

from __future__ import annotations

import asyncio
import socket

from geomap.serve.connections import Coalescing


def _pending(sock: socket.socket) -> bytes:
    """What the peer has received so far (nothing blocks)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _exchange(steps):
    """Run ``steps(transport, settle)`` over a real socket pair; returns what the peer saw after each settle."""
    server_side, peer = socket.socketpair()
    peer.setblocking(False)
    seen: list[bytes] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=server_side)

        async def settle() -> None:
            await asyncio.sleep(0.05)
            seen.append(_pending(peer))

        await steps(Coalescing(transport), settle)

    try:
        asyncio.run(main())
    finally:
        peer.close()
    return seen


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


def test_the_head_waits_for_the_body_and_both_arrive_together():
    async def steps(t, settle):
        t.arm()
        t.write(HEAD)
        await settle()
        t.write(b"hello")
        await settle()
        t.write(b"next")  # not armed: straight through
        await settle()
        t.close()

    assert _exchange(steps) == [b"", HEAD + b"hello", b"next"]


def test_a_100_continue_and_unarmed_writes_are_never_held():
    async def steps(t, settle):
        t.arm()
        t.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await settle()
        t.write(HEAD)  # armed once only: the 100 used it
        await settle()
        t.close()

    assert _exchange(steps) == [b"HTTP/1.1 100 Continue\r\n\r\n", HEAD]


def test_a_held_head_is_sent_by_flush_and_by_close():
    async def steps(t, settle):
        t.arm()
        t.write(HEAD)
        t.flush()
        await settle()
        t.arm()
        t.write(HEAD)
        t.close()
        await settle()

    assert _exchange(steps) == [HEAD, HEAD]


def test_a_head_held_when_the_connection_closes_under_it_is_dropped_quietly():
    async def steps(t, settle):
        t.arm()
        t.write(HEAD)
        t.transport.close()  # the peer went away: the transport closed beneath the cycle
        t.flush()
        t.close()
        await settle()

    assert _exchange(steps) == [b""]

"""`MqttStream` over real loopback sockets: reading whole packets, flow control, and a bounded close."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from broker import stream as stream_module
from broker.stream import FLUSH_AT, HIGH_WATER, MqttStream

WAIT_S = 5.0


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[tuple[MqttStream, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A server-side MqttStream and the client's asyncio streams, on 127.0.0.1."""
    made: asyncio.Future[MqttStream] = asyncio.get_running_loop().create_future()
    held = asyncio.Event()

    async def serve(connection: MqttStream, _writer: MqttStream) -> None:
        made.set_result(connection)
        await held.wait()

    server = await asyncio.get_running_loop().create_server(lambda: MqttStream(serve), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield await asyncio.wait_for(made, WAIT_S), reader, writer
    finally:
        held.set()
        if made.done() and made.result().transport is not None:
            made.result().transport.abort()  # type: ignore[union-attr]
        writer.close()
        await asyncio.sleep(0)
        server.close()
        await server.wait_closed()


async def test_reads_exactly_what_was_asked_across_several_sends() -> None:
    async with connected() as (stream, _reader, writer):
        writer.write(b"ab")
        await writer.drain()
        assert await asyncio.wait_for(stream.readexactly(2), WAIT_S) == b"ab"
        assert stream.take(1) is None  # nothing there: no wait
        reading = asyncio.ensure_future(stream.readexactly(5))
        for part in (b"cd", b"efg"):
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.05)
        assert await asyncio.wait_for(reading, WAIT_S) == b"cdefg"
        assert stream.buffered == 0


async def test_end_of_stream_in_the_middle_ends_the_read_with_what_came() -> None:
    async with connected() as (stream, _reader, writer):
        writer.write(b"xyz")
        writer.write_eof()
        with pytest.raises(asyncio.IncompleteReadError) as ended:
            await asyncio.wait_for(stream.readexactly(10), WAIT_S)
        assert ended.value.partial == b"xyz"
        assert await asyncio.wait_for(stream.more(), WAIT_S) is False
        assert await stream.read(4) == b""


async def test_reading_pauses_past_the_high_water_mark_and_resumes_when_read() -> None:
    """A client sending faster than the broker reads fills the kernel's buffers, not the broker's memory."""
    async with connected() as (stream, _reader, writer):
        chunk = b"x" * 65536
        sent = 0
        sending = True

        async def send() -> None:
            nonlocal sent
            while sending and sent < 64 * len(chunk):  # bounded: 4 MiB at most
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)

        sender = asyncio.ensure_future(send())
        await asyncio.sleep(0.5)
        assert stream.buffered <= HIGH_WATER + len(chunk) * 2  # paused, with what was in flight
        assert sent > stream.buffered  # the rest waits in the kernel or at the client
        total = 0
        while total < 2 * HIGH_WATER:  # reading makes it resume
            total += len(await asyncio.wait_for(stream.readexactly(4096), WAIT_S))
        sending = False
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender


async def test_writes_in_one_turn_leave_together_and_in_order() -> None:
    async with connected() as (stream, reader, _writer):
        for part in (b"one ", b"two ", b"three"):
            stream.write(part)
        assert stream.pending_bytes == 13
        await stream.drain()
        assert await asyncio.wait_for(reader.readexactly(13), WAIT_S) == b"one two three"


async def test_a_large_burst_in_one_turn_leaves_in_bounded_sends_in_order() -> None:
    """A reader routing thousands of publishes to one subscriber in one turn: what it wrote is handed to
    the transport every `FLUSH_AT` bytes or so (not in one huge send at the end of the turn), the count of
    bytes not handed over stays exact, and the subscriber gets everything in order."""
    async with connected() as (stream, reader, _writer):
        assert stream.transport is not None
        sends: list[int] = []
        real_write = stream.transport.write

        def counting_write(data: bytes) -> None:
            sends.append(len(data))
            real_write(data)

        stream.transport.write = counting_write  # type: ignore[method-assign]
        packets = [b"%06d" % i + b"." * 94 for i in range(20_000)]  # 2 MB, 100 bytes each
        for i, packet in enumerate(packets):
            stream.write(packet)
            assert stream.pending_bytes == (i + 1) * 100 - sum(sends)
        assert len(sends) >= 2_000_000 // (FLUSH_AT + 100)
        assert max(sends) < FLUSH_AT + 100
        await stream.drain()
        received = await asyncio.wait_for(reader.readexactly(2_000_000), WAIT_S)
        assert received == b"".join(packets)


async def test_close_of_a_client_that_reads_nothing_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graceful close waits for what was written to be sent, but a client that never reads gets the
    connection dropped after `CLOSE_TIMEOUT_S` instead of holding it open."""
    monkeypatch.setattr(stream_module, "CLOSE_TIMEOUT_S", 0.5)
    async with connected() as (stream, _reader, writer):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert stream.transport is not None
        for _ in range(64):  # 16 MiB the client never reads (bounded)
            stream.write(b"y" * 262144)
        stream.flush()
        await asyncio.wait_for(stream.close(), WAIT_S)
        assert stream.transport.is_closing()
        assert stream.is_closed
        stream.write(b"after")  # ignored once closed
        assert stream.pending_bytes == 0


async def test_connections_that_write_in_one_turn_are_flushed_by_one_callback() -> None:
    """Two connections writing in the same turn of the loop: one callback hands both over (not one each),
    each connection's bytes still leave whole and in order; a connection whose hand-over fails does not
    hold back the other's."""
    async with connected() as (first, first_reader, _w1), connected() as (second, second_reader, _w2):
        loop = asyncio.get_running_loop()
        scheduled: list[object] = []
        real_call_soon = loop.call_soon

        def counting(callback: object, *args: object, **kwargs: object) -> asyncio.Handle:
            scheduled.append(callback)
            return real_call_soon(callback, *args, **kwargs)  # type: ignore[arg-type]

        loop.call_soon = counting  # type: ignore[method-assign]
        try:
            first.write(b"a1 ")
            second.write(b"b1 ")
            first.write(b"a2")
            second.write(b"b2")
        finally:
            del loop.call_soon  # the instance attribute goes; the loop's own method is back
        assert len(scheduled) == 1
        assert await asyncio.wait_for(first_reader.readexactly(5), WAIT_S) == b"a1 a2"
        assert await asyncio.wait_for(second_reader.readexactly(5), WAIT_S) == b"b1 b2"

        assert first.transport is not None
        real_write = first.transport.write

        def failing(_data: bytes) -> None:
            raise RuntimeError("the transport broke")

        first.transport.write = failing  # type: ignore[method-assign]
        try:
            first.write(b"lost")
            second.write(b"kept")
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        finally:
            first.transport.write = real_write  # type: ignore[method-assign]
        assert await asyncio.wait_for(second_reader.readexactly(4), WAIT_S) == b"kept"

"""`MqttStream`: one TCP or TLS connection of the broker, as one object: its asyncio protocol, and the
reader and writer amqtt's handler is given.

asyncio's streams give a connection a `StreamReaderProtocol`, a `StreamReader` and a `StreamWriter`, and amqtt
wraps the last two in adapters: five objects, two deques of 64 slots (one a waiter queue for `drain`, never
more than one waiter here), and five coroutine frames under each wait for data (the reader's, amqtt's
`read_or_raise`, its adapter, `readexactly`, `_wait_for_data`), about 4 KB per connected client before it
sends anything. Here the bytes received wait in one `bytearray`; the reader waits on one future made only
while it waits, and reads what is already there without awaiting at all (`take`); writes made in one turn
of the event loop leave in one send (a burst of deliveries or acknowledgements costs one system call), and
one callback per turn of the loop hands over what every connection wrote in it (`Flusher`: a crowd
connecting gets its CONNACKs and SUBACKs sent by one callback a turn, not one each).

Flow control is asyncio's: reading pauses while more than `HIGH_WATER` bytes wait unread, and resumes when
the reader wants more; `drain` waits while the transport's write buffer is over its high-water mark.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, cast

HIGH_WATER = 128 * 1024  # unread bytes past which the socket is not read from (asyncio's streams: 2 x 64 KiB)
FLUSH_AT = 64 * 1024  # bytes written in one turn past which they are handed to the transport at once
CLOSE_TIMEOUT_S = 10.0  # a graceful close (what was written is sent first) that takes longer is an abort

log = logging.getLogger("ota.broker")

Connected = Callable[["MqttStream", "MqttStream"], Coroutine[Any, Any, None]]  # (reader, writer): the same


class Flusher:
    """The connections of one event loop that wrote in this turn of it, handed to their transports together
    at the start of the next turn (what each wrote still leaves in one send)."""

    __slots__ = ("_loop", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: list[MqttStream] | None = None

    def add(self, stream: MqttStream) -> None:
        if self._waiting is None:
            self._waiting = [stream]
            self._loop.call_soon(self._flush)
        else:
            self._waiting.append(stream)

    def _flush(self) -> None:
        waiting, self._waiting = self._waiting, None
        for stream in waiting or ():
            try:
                stream.flush()
            except Exception:  # one connection's failure must not hold back the others' bytes
                log.exception("sending to a connection failed")


_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Flusher] = weakref.WeakKeyDictionary()


def flusher_of(loop: asyncio.AbstractEventLoop) -> Flusher:
    found = _flushers.get(loop)
    if found is None:
        found = _flushers[loop] = Flusher(loop)
    return found


class BufferedReading:
    """`readexactly` and amqtt's reader-adapter `read`, for a reader that keeps what it received in
    `_buffer` and offers `take` and `more` (`MqttStream`, `broker.websocket.WebSocketReader`)."""

    __slots__ = ()
    _buffer: bytearray

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet."""
        return len(self._buffer)

    def peek(self) -> bytearray:
        """The bytes received and not read yet (not a copy: read it before the next await)."""
        return self._buffer

    def take(self, n: int) -> bytes | None:
        raise NotImplementedError

    def more(self) -> Awaitable[bool]:
        raise NotImplementedError

    async def readexactly(self, n: int) -> bytes:
        """`n` bytes, or `asyncio.IncompleteReadError` at the end of the stream."""
        while True:
            data = self.take(n)
            if data is not None:
                return data
            if not await self.more():
                partial = bytes(self._buffer)
                self._buffer.clear()
                raise asyncio.IncompleteReadError(partial, n)

    async def read(self, n: int = -1) -> bytes:
        """amqtt's reader adapter: `n` bytes (b"" when the stream ended first), or with -1 all there is
        until the end of the stream."""
        if n >= 0:
            try:
                return await self.readexactly(n)
            except asyncio.IncompleteReadError:
                return b""
        while await self.more():
            pass
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class MqttStream(BufferedReading, asyncio.Protocol):
    __slots__ = (
        "_buffer",
        "_connected",
        "_drained",
        "_eof",
        "_flusher",
        "_gone",
        "_loop",
        "_lost",
        "_paused",
        "_pending",
        "_pending_size",
        "_task",
        "_waiter",
        "_writing_paused",
        "is_closed",
        "transport",
    )

    def __init__(self, connected: Connected) -> None:
        # run in a task of its own once the connection is made (one callable, shared by the listener); it
        # closes the connection however it ends
        self._connected = connected
        # asyncio.get_running_loop() costs a getpid() system call each time: asked once per connection
        self._loop = asyncio.get_running_loop()
        self._flusher = flusher_of(self._loop)
        self._task: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._paused = False  # reading paused: HIGH_WATER bytes wait unread
        self._waiter: asyncio.Future[bool] | None = None  # the reader waiting for more bytes
        self._pending: list[bytes] | None = None  # written in this turn of the loop, not handed over yet
        self._pending_size = 0  # their bytes
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None  # a `drain` waiting for the write buffer
        self._lost: Exception | None = None  # why the connection was lost (None: closed, or not lost yet)
        self._gone: asyncio.Future[None] | None = None  # done once the connection is lost (made on demand)
        self.is_closed = False  # `close` was called

    # ----------------------------------------------------------------------------- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport; uvloop's do not derive from asyncio's classes, so no isinstance check
        self.transport = cast(asyncio.Transport, transport)
        # Held while the connection lives (the loop keeps only weak references to tasks); no done-callback
        # (one more object and a context copy per connection): `connected` handles its own ending, errors
        # included.
        self._task = self._loop.create_task(self._connected(self, self))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake()
        if not self._paused and len(self._buffer) > HIGH_WATER and self.transport is not None:
            try:
                self.transport.pause_reading()
                self._paused = True
            except NotImplementedError:  # a transport that cannot pause
                pass

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        # keep a plain TCP connection open for writing (what was written still goes); a TLS one closes
        return self.transport is not None and self.transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc
        self._wake()
        if self._gone is None:
            self._gone = self._loop.create_future()
        if not self._gone.done():
            self._gone.set_result(None)
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            if exc is None:
                drained.set_result(None)
            else:
                drained.set_exception(exc)
        self._pending = None
        self._pending_size = 0

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(True)

    # ----------------------------------------------------------------------------------- reading

    def take(self, n: int) -> bytes | None:
        """`n` bytes if they are all there, without waiting; else None."""
        buffer = self._buffer
        if len(buffer) < n:
            return None
        if len(buffer) == n:  # all of it: the buffer starts again empty (an idle client holds no capacity)
            data = bytes(buffer)
            self._buffer = bytearray()
        else:
            data = bytes(buffer[:n])
            del buffer[:n]
        if self._paused and len(self._buffer) <= HIGH_WATER // 2:
            self._resume()
        return data

    def more(self) -> asyncio.Future[bool]:
        """Done when more bytes have arrived (True), or at once with False at the end of the stream. A future,
        not a coroutine: a reader waiting for its client's next packet holds nothing else."""
        waiter: asyncio.Future[bool] = self._loop.create_future()
        if self._eof:
            waiter.set_result(False)
            return waiter
        if self._paused:
            self._resume()
        self._waiter = waiter
        return waiter

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def _resume(self) -> None:
        self._paused = False
        if self.transport is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self.transport.resume_reading()

    # ----------------------------------------------------------------------------------- writing

    def write(self, data: bytes) -> None:
        """Queue `data`: what is written in one turn of the event loop leaves in one send, in order (in
        sends of about `FLUSH_AT` bytes when a turn writes more: a reader routing a large burst of
        publishes to one subscriber neither builds one huge send nor waits for the end of the burst)."""
        if self.is_closed or self.transport is None or self.transport.is_closing():
            return
        if self._pending is None:
            self._pending = [data]
            self._flusher.add(self)
        else:
            self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        self._pending_size = 0
        if pending and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(pending) if len(pending) > 1 else pending[0])

    @property
    def pending_bytes(self) -> int:
        """Bytes written and not handed to the transport yet."""
        return self._pending_size

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        self.flush()
        if self._lost is not None:
            raise self._lost
        if not self._writing_paused or self.transport is None or self.transport.is_closing():
            return
        if self._drained is None:
            self._drained = self._loop.create_future()
        await asyncio.shield(self._drained)

    def get_peer_info(self) -> tuple[str, int] | None:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        if not peer or len(peer) < 2:
            return None
        return peer[0], peer[1]

    def get_ssl_info(self) -> ssl.SSLObject | None:
        return self.transport.get_extra_info("ssl_object") if self.transport is not None else None

    async def close(self) -> None:
        """Close gracefully: what was written is sent first, for at most `CLOSE_TIMEOUT_S` (a client that
        reads nothing cannot hold the connection open), then the connection is dropped."""
        if self.is_closed:
            return
        self.flush()
        self.is_closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if self._gone is None:
            self._gone = self._loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._gone), CLOSE_TIMEOUT_S)
        except TimeoutError:
            transport.abort()

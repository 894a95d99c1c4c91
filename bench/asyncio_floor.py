"""The floor of any asyncio MQTT broker on this machine: an asyncio `Protocol` on 127.0.0.1:PORT that answers a
CONNECT with a CONNACK and a SUBSCRIBE with a SUBACK and does nothing else (no session, no topic index, no
authentication, no task per connection). What connecting and subscribing costs it is what asyncio's
accept, transport and callbacks cost before any MQTT work; `bench/run.py connect --brokers
ota,mosquitto,asyncio_floor` puts it beside the two brokers.

    python bench/asyncio_floor.py PORT [--task]

With `--task` each connection is read the way the broker reads one: by a task of its own that waits on a
future for each read and hands each packet to a coroutine (`bench/run.py ... --brokers asyncio_floor_task`);
the difference between the two is what a task per connection costs.

Prints `ready` once listening; stops on SIGTERM or SIGINT. Only for the load generator's well-formed packets
(a CONNECT, then one SUBSCRIBE with one filter); anything else closes the connection.
"""

from __future__ import annotations

import asyncio
import signal
import sys

CONNECT, SUBSCRIBE, PINGREQ, DISCONNECT = 1, 8, 12, 14


class Floor(asyncio.Protocol):
    __slots__ = ("buffer", "transport")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while len(buffer) >= 2:
            size = buffer[1]
            if size & 0x80:  # a remaining length over 127: not a packet this load generator sends
                self.transport.abort()
                return
            if len(buffer) < 2 + size:
                break
            kind = buffer[0] >> 4
            if kind == CONNECT:
                self.transport.write(b"\x20\x02\x00\x00")
            elif kind == SUBSCRIBE:
                self.transport.write(b"\x90\x03" + buffer[2:4] + bytes((buffer[2 + size - 1] & 0x03,)))
            elif kind == PINGREQ:
                self.transport.write(b"\xd0\x00")
            elif kind == DISCONNECT:
                self.transport.close()
            buffer = buffer[2 + size :]
        self.buffer = buffer


class TaskFloor(asyncio.Protocol):
    """The same answers from a reader task per connection: `data_received` fills a buffer and wakes the task,
    which waits on a future when the buffer holds no whole packet (the broker's `MqttStream.more`)."""

    __slots__ = ("buffer", "eof", "task", "transport", "waiter")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None
        self.task = asyncio.get_running_loop().create_task(self.read())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            buffer = self.buffer
            if len(buffer) < 2 or len(buffer) < 2 + buffer[1]:
                if self.eof:
                    return
                self.waiter = loop.create_future()
                await self.waiter
                continue
            if buffer[1] & 0x80:
                self.transport.abort()
                return
            size = buffer[1]
            packet = bytes(buffer[: 2 + size])
            del buffer[: 2 + size]
            await self.handle(packet, size)

    async def handle(self, packet: bytes, size: int) -> None:
        kind = packet[0] >> 4
        if kind == CONNECT:
            self.transport.write(b"\x20\x02\x00\x00")
        elif kind == SUBSCRIBE:
            self.transport.write(b"\x90\x03" + packet[2:4] + bytes((packet[2 + size - 1] & 0x03,)))
        elif kind == PINGREQ:
            self.transport.write(b"\xd0\x00")
        elif kind == DISCONNECT:
            self.transport.close()


async def serve(port: int, task: bool = False) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(TaskFloor if task else Floor, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), task="--task" in sys.argv[2:]))

"""The floor of any asyncio MQTT broker on this machine: an asyncio `Protocol` on 127.0.0.1:PORT that answers a
CONNECT with a CONNACK and a SUBSCRIBE with a SUBACK and does nothing else (no session, no topic index, no
authentication, no task per connection). What connecting and subscribing costs it is what asyncio's
accept, transport and callbacks cost before any MQTT work; `bench/run.py connect --brokers
ota,mosquitto,asyncio_floor` puts it beside the two brokers.

    python bench/asyncio_floor.py PORT

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


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))

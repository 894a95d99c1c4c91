"""A TCP listener that takes on only as many new connections as it can set up at once.

asyncio's server accepts every connection the kernel has completed, as fast as they come, and starts each
one's TLS handshake at once. When a crowd of devices connects together (a gateway restarting, a network
coming back), thousands of handshakes then share the CPU; each takes seconds, devices give up before their
CONNACK and connect again while the broker still works on their old connections, and the retries add to the
crowd until the process runs out of CPU or file descriptors.

`GatedServer` runs its own accept loop (`loop.sock_accept`, `loop.connect_accepted_socket`) and holds at most
`max_setups` connections in set-up at once: accepted, TLS handshake not finished. The others wait in the
kernel's accept queue (`LISTEN_BACKLOG`), where waiting costs the broker neither CPU nor a file descriptor;
beyond it the kernel drops SYNs and clients retry with TCP's own back-off. Connections that do get accepted
are set up quickly, so their CONNACK comes in time. For plain TCP a set-up ends at once (nothing to do
before the CONNECT, which `connect_timeout_s` bounds).

It serves the three things amqtt reads of a listener: `sockets`, `close()` and `wait_closed()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from functools import partial

from firmware_store.tls import LISTEN_BACKLOG

log = logging.getLogger("ota.broker")

MAX_SETUPS = 64  # connections in TLS handshake at once, per listening socket
ACCEPT_RETRY_S = 1.0  # after accept() failed for want of resources (file descriptors, memory)

# A protocol factory that is told, through the callback it is given, when its connection's set-up is over.
SetupFactory = Callable[[Callable[[], None]], asyncio.BaseProtocol]


def listening_sockets(host: str | None, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for `host` (None or "": every address) and `port`; with port 0
    every address gets the port the first one was given."""
    infos = socket.getaddrinfo(
        host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            bound = address
            if port == 0 and len(sockets) > 1:
                bound = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(bound)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class GatedServer:
    """Accept loops over `sockets`, each holding at most `max_setups` connections in set-up (see the module)."""

    def __init__(
        self, sockets: list[socket.socket], factory: SetupFactory, max_setups: int = MAX_SETUPS
    ) -> None:
        self.sockets = sockets
        self._factory = factory
        self._max_setups = max_setups
        loop = asyncio.get_running_loop()
        self._serving: set[asyncio.Task[None]] = set()
        self._tasks = [loop.create_task(self._accept(sock)) for sock in sockets]

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._max_setups)
        while True:
            await slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait, as asyncio's own server does
                slots.release()
                log.error(
                    "accepting connections on %s failed: %s; trying again in %gs",
                    _name(sock),
                    e,
                    ACCEPT_RETRY_S,
                )
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            # Served in a task of its own: awaiting it here would take on one connection per turn of the event
            # loop (its transport is made in the next one), and a crowd would queue for that, not for its place.
            setup = _Setup(slots)
            task = loop.create_task(self._serve(conn, setup))
            self._serving.add(task)
            task.add_done_callback(partial(self._served, conn, setup))

    async def _serve(self, conn: socket.socket, setup: _Setup) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(partial(self._factory, setup), conn)
        except OSError:  # the connection went before it could be served
            conn.close()
            setup()

    def _served(self, conn: socket.socket, setup: _Setup, task: asyncio.Task[None]) -> None:
        self._serving.discard(task)
        if task.cancelled():  # the listener closed first, maybe before the task ran: the socket is still ours
            conn.close()
            setup()

    def close(self) -> None:
        """Stop accepting and close the listening sockets (connections already served are not touched)."""
        for task in (*self._tasks, *self._serving):
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        for task in (*self._tasks, *self._serving):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Setup:
    """Called once a connection's set-up is over: gives its place back (once, however often called)."""

    __slots__ = ("over", "slots")

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self.slots, self.over = slots, False

    def __call__(self) -> None:
        if not self.over:
            self.over = True
            self.slots.release()


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "a closed socket"
    return f"{host}:{port}"

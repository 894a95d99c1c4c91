"""A TCP listener that takes on only as many new connections as it can set up at once.

asyncio's server accepts every connection the kernel has completed, as fast as they come, and starts each
one's TLS handshake at once. When a crowd of devices connects together (a gateway restarting, a network
coming back), thousands of handshakes then share the CPU; each takes seconds, devices give up before their
CONNACK and connect again while the broker still works on their old connections, and the retries add to the
crowd until the process runs out of CPU or file descriptors.

`GatedServer` accepts by itself, from a reader callback on each listening socket (as asyncio's own server
does: no future and no task switch per accept), and holds at most `max_setups` connections in set-up at
once: accepted, TLS handshake not finished. While all places are taken it stops watching the socket; the
others wait in the kernel's accept queue (`LISTEN_BACKLOG`), where waiting costs the broker neither CPU
nor a file descriptor; beyond it the kernel drops SYNs and clients retry with TCP's own back-off.
Connections that do get accepted are set up quickly, so their CONNACK comes in time. For plain TCP a
set-up ends at once (nothing to do before the CONNECT, which `connect_timeout_s` bounds).

It serves the three things amqtt reads of a listener: `sockets`, `close()` and `wait_closed()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
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
    """Accepts on `sockets`, each holding at most `max_setups` connections in set-up (see the module)."""

    def __init__(
        self, sockets: list[socket.socket], factory: SetupFactory, max_setups: int = MAX_SETUPS
    ) -> None:
        self.sockets = sockets
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self._places = dict.fromkeys(sockets, max_setups)  # connections each socket may still take on
        self._watched: set[socket.socket] = set()  # sockets with a reader callback
        # sockets left unwatched after accept() failed for want of resources, and the timer that ends it
        self._retry: dict[socket.socket, asyncio.TimerHandle] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self._closed = False
        self._make_transport = _one_call_transport(self._loop)
        for sock in sockets:
            self._watch(sock)

    def _watch(self, sock: socket.socket) -> None:
        if not self._closed and sock not in self._watched and sock not in self._retry and self._places[sock]:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
            self._watched.add(sock)

    def _unwatch(self, sock: socket.socket) -> None:
        if sock in self._watched:
            self._watched.discard(sock)
            self._loop.remove_reader(sock.fileno())

    def _accept(self, sock: socket.socket) -> None:
        """Take on the connections the kernel holds for `sock`, as many as it has places for (a crowd is
        taken on in a few turns of the loop, not one per turn)."""
        while self._places[sock] > 0:
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return  # nothing more waiting (or a client gone before its accept)
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait, as asyncio's own server does
                log.error(
                    "accepting connections on %s failed: %s; trying again in %gs",
                    _name(sock),
                    e,
                    ACCEPT_RETRY_S,
                )
                self._unwatch(sock)
                self._retry[sock] = self._loop.call_later(ACCEPT_RETRY_S, self._retried, sock)
                return
            conn.setblocking(False)
            self._places[sock] -= 1
            setup = _Setup(self, sock)
            if self._make_transport is not None:
                try:
                    self._make_transport(conn, self._factory(setup), extra={"peername": peer})
                except Exception as e:  # the connection went, or its protocol could not be made
                    log.warning(
                        "could not serve a connection on %s: %s: %s", _name(sock), type(e).__name__, e
                    )
                    conn.close()
                    setup()
                continue
            task = self._loop.create_task(self._serve(conn, setup))
            self._serving.add(task)
            task.add_done_callback(partial(self._served, conn, setup))
        self._unwatch(sock)  # every place taken: the others wait in the kernel until one is given back

    def _retried(self, sock: socket.socket) -> None:
        del self._retry[sock]
        self._watch(sock)

    def _give_back(self, sock: socket.socket) -> None:
        self._places[sock] += 1
        self._watch(sock)

    async def _serve(self, conn: socket.socket, setup: _Setup) -> None:
        try:
            await self._loop.connect_accepted_socket(partial(self._factory, setup), conn)
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
        self._closed = True
        for sock in list(self._watched):
            self._unwatch(sock)
        for timer in self._retry.values():
            timer.cancel()
        self._retry.clear()
        for task in self._serving:
            task.cancel()
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        for task in list(self._serving):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Setup:
    """Called once a connection's set-up is over: gives its place back (once, however often called)."""

    __slots__ = ("over", "server", "sock")

    def __init__(self, server: GatedServer, sock: socket.socket) -> None:
        self.server, self.sock, self.over = server, sock, False

    def __call__(self) -> None:
        if not self.over:
            self.over = True
            self.server._give_back(self.sock)


def _one_call_transport(loop: asyncio.AbstractEventLoop) -> Callable[..., asyncio.BaseTransport] | None:
    """asyncio's selector loop makes a socket's transport in one call, which its own server's accept uses
    too: `_make_socket_transport(sock, protocol, waiter=None, *, extra=None, server=None)`, no task, future
    or wake-up per connection. None for a loop without it (uvloop), or whose signature is another: then
    each connection takes `connect_accepted_socket`, in a task."""
    make = getattr(loop, "_make_socket_transport", None)
    if make is None:
        return None
    try:
        names = list(inspect.signature(make).parameters)
    except (TypeError, ValueError):
        return None
    return make if names[:4] == ["sock", "protocol", "waiter", "extra"] else None


def _name(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "a closed socket"
    return f"{host}:{port}"

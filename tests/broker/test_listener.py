"""The gated listener: at most `max_setups` connections in set-up at once, the others left in the kernel's
accept queue until a set-up ends; real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

import pytest

from broker import listener
from broker.listener import GatedServer, listening_sockets
from tests.support import eventually


class _Held(asyncio.Protocol):
    """A connection whose set-up lasts until its client closes it (a TLS handshake that waits for a slow
    client, say)."""

    def __init__(self, over: Callable[[], None], made: list[_Held]) -> None:
        self.over = over
        made.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.over()


async def test_connections_beyond_the_set_up_limit_wait_in_the_kernel_until_one_ends() -> None:
    """With two set-ups allowed, five clients connecting at once get two connections served; the other three
    wait, accepted by the kernel only, and each set-up that ends lets exactly one more in."""
    made: list[_Held] = []
    server = GatedServer(listening_sockets("127.0.0.1", 0), lambda over: _Held(over, made), max_setups=2)
    port = server.sockets[0].getsockname()[1]
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    try:
        await eventually(lambda: len(made) == 2)
        await asyncio.sleep(0.2)
        assert len(made) == 2  # the kernel completed all five handshakes; the broker took on two
        clients[0][1].close()
        await eventually(lambda: len(made) == 3)
        await asyncio.sleep(0.2)
        assert len(made) == 3
    finally:
        for _, writer in clients:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_closed_listener_accepts_nothing_more() -> None:
    """close() stops the accept loops and closes the listening sockets: a new client is refused."""
    server = GatedServer(listening_sockets("127.0.0.1", 0), lambda over: _Held(over, []), max_setups=2)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    try:
        await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return
    raise AssertionError("the closed listener still accepted a connection")


class _Plain(asyncio.Protocol):
    """A plain connection: nothing to set up, so its place is given back as soon as it is made."""

    def __init__(self, over: Callable[[], None], made: list[_Plain]) -> None:
        over()
        made.append(self)
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


async def test_a_crowd_waiting_in_the_kernel_is_taken_on_in_a_few_turns_of_the_loop() -> None:
    """Connections the kernel already holds are accepted together, as many as there are places, not one per
    turn of the event loop: 50 waiting clients are all served within a handful of turns (one per turn made a
    crowd queue behind the loop's pace, and cost a turn of the loop per connection)."""
    made: list[_Plain] = []
    server = GatedServer(listening_sockets("127.0.0.1", 0), lambda over: _Plain(over, made), max_setups=64)
    port = server.sockets[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]  # the kernel completes them
    try:
        turns = 0
        while len(made) < 50 and turns < 1000:
            await asyncio.sleep(0)
            turns += 1
        assert len(made) == 50
        assert turns <= 10, f"50 connections took {turns} turns of the loop"
    finally:
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()


class _FailingOnce(socket.socket):
    """A listening socket whose first accept() fails as when the process is out of file descriptors."""

    failures = 0

    def accept(self) -> tuple[socket.socket, object]:
        if not _FailingOnce.failures:
            _FailingOnce.failures += 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


async def test_accept_failing_for_want_of_resources_is_logged_and_tried_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """accept() failing with EMFILE stops accepting for ACCEPT_RETRY_S with one log line (not a busy loop
    on a socket that stays readable); the waiting client is then served."""
    monkeypatch.setattr(listener, "ACCEPT_RETRY_S", 0.3)
    sock = _FailingOnce(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    made: list[_Plain] = []
    server = GatedServer([sock], lambda over: _Plain(over, made), max_setups=4)
    client = socket.create_connection(sock.getsockname()[:2])
    try:
        await eventually(lambda: "Too many open files" in caplog.text, what="the failure logged")
        await asyncio.sleep(0.1)
        assert made == []  # waiting out the retry delay, not accepting in a loop
        assert caplog.text.count("accepting connections on") == 1
        await eventually(lambda: len(made) == 1, what="the client served after the delay")
    finally:
        client.close()
        server.close()
        await server.wait_closed()


async def test_asyncios_selector_loop_still_makes_a_socket_transport_in_one_call() -> None:
    """The gated listener makes each connection's transport with the selector loop's own
    `_make_socket_transport(sock, protocol, waiter=None, *, extra=None, server=None)`, as asyncio's server
    does; a loop without it, or with another signature, sends the listener to its fallback (a task per
    connection) rather than to a call that fails."""
    assert listener._one_call_transport(asyncio.get_running_loop()) is not None

    class Renamed:
        def _make_socket_transport(self, conn: object, proto: object) -> None: ...

    assert listener._one_call_transport(Renamed()) is None  # type: ignore[arg-type]
    assert listener._one_call_transport(object()) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("direct", [True, False], ids=["one-call", "fallback-task"])
async def test_both_ways_of_making_a_transport_serve_a_crowd_and_give_places_back(direct: bool) -> None:
    """With the loop's one-call transport and with the fallback (`connect_accepted_socket` in a task, as on
    uvloop): every client of a crowd larger than the places is served, its peer address known."""
    made: list[_Plain] = []
    server = GatedServer(listening_sockets("127.0.0.1", 0), lambda over: _Plain(over, made), max_setups=4)
    if not direct:
        server._make_transport = None
    port = server.sockets[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        await eventually(
            lambda: len(made) == 20 and all(m.transport for m in made), what="every client served"
        )
        peers = {m.transport.get_extra_info("peername")[1] for m in made if m.transport is not None}
        assert peers == {client.getsockname()[1] for client in clients}
    finally:
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()

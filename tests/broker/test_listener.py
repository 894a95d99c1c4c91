"""The gated listener: at most `max_setups` connections in set-up at once, the others left in the kernel's
accept queue until a set-up ends; real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

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

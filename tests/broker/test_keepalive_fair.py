"""Keep-alive (MQTT-3.1.2-24) by the broker's keep-alive wheel, fair to the client when the broker is behind:
a client silent for 1.5 x its keep-alive is closed, never before; one that speaks is never closed; bytes it
sent that wait unread on the broker's side (its event loop busy) count as heard; a deadline looked at late
gives the client that lateness again; keep-alive 0 means no deadline at all. The broker runs on this test's
event loop, so a test holds that loop (a blocking sleep) to play a busy broker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from broker import app as broker_app
from broker import handler as handler_module
from broker.handler import GRACE, StrictHandler, unread_in_kernel
from broker.hardened import HardenedBroker
from broker.protocol import transport_of
from tests.broker import rawmqtt as mq
from tests.broker.rawmqtt import RawClient
from tests.broker.test_bare_broker import bare_config
from tests.support import eventually

PINGREQ = mq.pingreq()
PINGRESP = b"\xd0\x00"


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[HardenedBroker, int, int]]:
    """A started HardenedBroker (anonymous clients) with a TCP and a WebSocket listener on 127.0.0.1 port
    0; yields it and the two ports."""
    config = bare_config()
    config["listeners"]["ws"] = {"type": "ws", "bind": "127.0.0.1:0"}
    broker = HardenedBroker(config)
    await broker.start()
    try:
        tcp, ws = broker_app._bound(broker, "default"), broker_app._bound(broker, "ws")
        assert tcp is not None and ws is not None
        yield broker, tcp[1], ws[1]
    finally:
        await broker.shutdown()


def handler_of(broker: HardenedBroker, client_id: str) -> StrictHandler:
    handler: StrictHandler = broker._sessions[client_id][1]
    return handler


def hold_the_loop(seconds: float) -> None:
    """Block the event loop the broker runs on (this test's), as a broker busy with other work does."""
    time.sleep(seconds)


async def closed_after(client: RawClient, limit: float) -> float:
    """Seconds until the broker closes `client`'s connection (failing past `limit`)."""
    started = time.monotonic()
    assert await client.closed(limit), f"still open after {limit}s"
    return time.monotonic() - started


# -------------------------------------------------------------------------------- the plain rule


@pytest.mark.parametrize("keep_alive", [1, 2])
async def test_a_silent_client_is_closed_after_one_and_a_half_keep_alives_not_before(keep_alive: int) -> None:
    """A client that sends nothing after its CONNECT is closed once 1.5 x its keep-alive has passed, and
    not before its keep-alive: the whole period is the client's, whatever its keep-alive."""
    async with serving() as (_, port, _ws), RawClient.open(port) as client:
        assert (await client.connect("silent", keep_alive=keep_alive)).return_code == 0
        elapsed = await closed_after(client, keep_alive * GRACE + 2)
        assert keep_alive <= elapsed <= keep_alive * GRACE + 1, elapsed


async def test_a_client_that_keeps_speaking_is_never_closed() -> None:
    """Any control packet counts as heard: a client with keep-alive 1 that sends a PINGREQ or a PUBLISH
    every 0.7 s stays connected over more than three keep-alive periods and gets every answer; the timer
    ends with the connection."""
    async with serving() as (broker, port, _ws), RawClient.open(port) as client:
        assert (await client.connect("talker", keep_alive=1)).return_code == 0
        handler = handler_of(broker, "talker")
        for i in range(5):
            await asyncio.sleep(0.7)
            if i % 2:
                await client.send(mq.publish("t", b"x", qos=1, packet_id=i))
                assert (await client.expect(mq.PUBACK)).packet_id == i
            else:
                await client.send(PINGREQ)
                await client.expect(mq.PINGRESP)
        assert not client.eof
        await client.send(mq.disconnect())
        assert await client.closed()
        await eventually(lambda: handler._keep_alive_timer is None, 2, "the keep-alive timer to end")


async def test_keep_alive_zero_means_never_closed_for_silence() -> None:
    """Keep-alive 0 turns the mechanism off (MQTT-3.1.2-10): no timer is armed and a client silent for
    longer than any small keep-alive's 1.5 periods stays connected."""
    async with serving() as (broker, port, _ws), RawClient.open(port) as client:
        assert (await client.connect("forever", keep_alive=0)).return_code == 0
        assert handler_of(broker, "forever")._keep_alive_timer is None
        assert await client.silent(2.5) is None
        await client.send(PINGREQ)
        await client.expect(mq.PINGRESP)


async def test_websocket_connections_get_the_same_keep_alive() -> None:
    """Over a WebSocket (whose reader has no asyncio stream buffer) a silent client is closed after 1.5 x
    its keep-alive and a pinging one is kept."""
    async with serving() as (_, _tcp, port):
        url = f"ws://127.0.0.1:{port}/mqtt"
        mqtt = [Subprotocol("mqtt")]
        async with (
            ws_connect(url, subprotocols=mqtt, open_timeout=5) as pinger,
            ws_connect(url, subprotocols=mqtt, open_timeout=5) as silent,
        ):
            await pinger.send(mq.connect("ws-pinger", keep_alive=1))
            await silent.send(mq.connect("ws-silent", keep_alive=1))
            assert (await asyncio.wait_for(pinger.recv(), 5))[:2] == b"\x20\x02"
            assert (await asyncio.wait_for(silent.recv(), 5))[:2] == b"\x20\x02"
            started = time.monotonic()
            for _ in range(4):
                await asyncio.sleep(0.7)
                await pinger.send(PINGREQ)
                assert await asyncio.wait_for(pinger.recv(), 5) == PINGRESP
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(silent.recv(), 5)
            assert 1.0 <= time.monotonic() - started <= 3.5


async def test_a_websocket_that_sends_no_connect_is_dropped_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CONNECT deadline's sweep drops a WebSocket connection the same way as a TCP one: opened (the
    WebSocket handshake done) and then silent, it is closed after connect_timeout_s, not before."""
    async with serving() as (broker, _tcp, port):
        monkeypatch.setattr(broker, "limits", dataclasses.replace(broker.limits, connect_timeout_s=0.5))
        url = f"ws://127.0.0.1:{port}/mqtt"
        async with ws_connect(url, subprotocols=[Subprotocol("mqtt")], open_timeout=5) as silent:
            started = time.monotonic()
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(silent.recv(), 5)
            # its deadline runs from just before the WebSocket opened here
            assert 0.4 <= time.monotonic() - started <= 3


# ------------------------------------------------------------------------- fair when the broker is late


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes from a blocking socket (its timeout bounds each wait); fewer only at EOF."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def still_open(sock: socket.socket, seconds: float) -> bool:
    """True when the peer neither closes nor sends anything on `sock` for `seconds`."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)  # EOF or a packet: either way not a quiet, open connection
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5)
    return False


@pytest.mark.parametrize("held_s", [1.9, 3.0])
async def test_a_ping_sent_in_time_but_unread_by_a_busy_broker_keeps_the_client(
    held_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client with keep-alive 1 sends its PINGREQ in time while the broker's loop is held for longer
    than 1.5 x keep-alive: the PINGREQ waits unread in the connection's buffer when the keep-alive timer
    runs, so the client was heard: it is not closed and gets its PINGRESP. (The lateness rule is turned
    off here: the unread bytes alone keep the client.)"""
    monkeypatch.setattr(handler_module, "LATE_S", math.inf)
    async with serving() as (_, port, _ws):
        sock = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 5)
        try:
            await asyncio.to_thread(sock.sendall, mq.connect("fair", keep_alive=1))
            assert (await asyncio.to_thread(recv_exactly, sock, 4))[:2] == b"\x20\x02"
            ping = threading.Timer(0.5, sock.sendall, (PINGREQ,))
            ping.start()  # in time: half a keep-alive after the CONNACK, while the loop is held
            hold_the_loop(held_s)
            ping.join(5)
            assert await asyncio.to_thread(recv_exactly, sock, 2) == PINGRESP
            assert await asyncio.to_thread(still_open, sock, 0.5)
        finally:
            sock.close()


async def test_bytes_waiting_in_the_socket_receive_queue_count_as_heard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the broker does not read a connection's socket (its reading paused, as flow control pauses a
    full stream buffer), a PINGREQ the client sent waits in the kernel's receive queue: the client was
    heard and stays connected past 1.5 x its keep-alive; once reading resumes it gets its PINGRESP."""
    monkeypatch.setattr(handler_module, "LATE_S", math.inf)
    async with serving() as (broker, port, _ws), RawClient.open(port) as client:
        assert (await client.connect("queued", keep_alive=1)).return_code == 0
        transport: Any = transport_of(handler_of(broker, "queued").writer)
        transport.pause_reading()
        await client.send(PINGREQ)
        assert await client.silent(2.5) is None  # past 1.5 x keep-alive, nothing read, not closed
        transport.resume_reading()
        await client.expect(mq.PINGRESP)


async def test_a_late_timer_gives_the_client_its_lateness_again() -> None:
    """When the broker's loop was held past a silent client's due time, the timer runs late; the client
    gets that lateness again: its PINGREQ sent soon after the broker is back keeps it connected. Then,
    silent again with the loop not late, it is closed 1.5 x keep-alive after that PINGREQ."""
    async with serving() as (_, port, _ws), RawClient.open(port) as client:
        assert (await client.connect("late", keep_alive=1)).return_code == 0
        hold_the_loop(3.0)  # due 1.5 s after the CONNACK: the timer runs about 1.5 s late
        await asyncio.sleep(0.6)
        await client.send(PINGREQ)
        await client.expect(mq.PINGRESP)
        assert 1.0 <= await closed_after(client, 4) <= 1.5 + 1


def test_unread_in_kernel_counts_the_bytes_a_socket_has_not_read() -> None:
    """FIONREAD on a transport's socket: what the peer sent and nobody read yet; 0 without a socket."""
    left, right = socket.socketpair()
    transport = asyncio.BaseTransport({"socket": right})
    try:
        assert unread_in_kernel(transport) == 0
        left.sendall(PINGREQ * 3)
        assert unread_in_kernel(transport) == 6
        assert right.recv(6) == PINGREQ * 3
        assert unread_in_kernel(transport) == 0
    finally:
        left.close()
        right.close()
    assert unread_in_kernel(transport) == 0  # closed
    assert unread_in_kernel(asyncio.BaseTransport()) == 0
    assert unread_in_kernel(None) == 0

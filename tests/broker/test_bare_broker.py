"""`HardenedBroker` on its own, without the OTA service: only amqtt's anonymous auth plugin, clients over TCP
on 127.0.0.1 port 0. Two brokers in one process keep their own limits."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin

from broker import app as broker_app
from broker.hardened import HardenedBroker
from broker.limits import PLUGIN_KEY
from tests.broker import rawmqtt as mq
from tests.broker.rawmqtt import RawClient
from tests.support import eventually

ANONYMOUS = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}


def bare_config(**limits: Any) -> dict[str, Any]:
    plugins: dict[str, Any] = dict(ANONYMOUS)
    if limits:
        plugins[PLUGIN_KEY] = limits
    return {"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}, "plugins": plugins}


@contextlib.asynccontextmanager
async def bare_broker(**limits: Any) -> AsyncIterator[int]:
    """A started HardenedBroker with these `broker.limits.MqttLimits` keys; yields its MQTT port."""
    broker = HardenedBroker(bare_config(**limits))
    await broker.start()
    try:
        bound = broker_app._bound(broker, "default")
        assert bound is not None
        yield bound[1]
    finally:
        await broker.shutdown()


async def _receive(client: RawClient, qos: int) -> mq.Packet:
    """The next PUBLISH to `client`, its QoS flow completed as a client completes it."""
    got = await client.expect(mq.PUBLISH)
    assert got.qos == qos, got
    if qos == 1:
        await client.send(mq.puback(got.packet_id))
    elif qos == 2:
        await client.send(mq.pubrec(got.packet_id))
        assert (await client.expect(mq.PUBREL)).packet_id == got.packet_id
        await client.send(mq.pubcomp(got.packet_id))
    return got


async def _publish(client: RawClient, topic: str, payload: bytes, qos: int, packet_id: int) -> None:
    """Publish at `qos` and complete the flow with the broker (PUBACK, or PUBREC/PUBREL/PUBCOMP)."""
    await client.send(mq.publish(topic, payload, qos=qos, packet_id=packet_id if qos else None))
    if qos == 1:
        assert (await client.expect(mq.PUBACK)).packet_id == packet_id
    elif qos == 2:
        assert (await client.expect(mq.PUBREC)).packet_id == packet_id
        await client.send(mq.pubrel(packet_id))
        assert (await client.expect(mq.PUBCOMP)).packet_id == packet_id


@pytest.mark.parametrize("granted", [0, 1, 2])
@pytest.mark.parametrize("published", [0, 1, 2])
async def test_bare_broker_routes_every_qos_both_ways(published: int, granted: int) -> None:
    """Without the OTA plugin, a message published at each QoS reaches a subscriber at min(published,
    granted) with its flow completed, in either direction between two clients."""
    async with bare_broker() as port, RawClient.open(port) as a, RawClient.open(port) as b:
        assert (await a.connect("a")).return_code == 0
        assert (await b.connect("b")).return_code == 0
        assert await a.subscribe(1, ("to/a", granted)) == [granted]
        assert await b.subscribe(1, ("to/b/#", granted)) == [granted]
        await _publish(b, "to/a", b"b-to-a", published, 10)
        got = await _receive(a, min(published, granted))
        assert (got.topic, got.payload, got.retain) == ("to/a", b"b-to-a", False)
        await _publish(a, "to/b/x", b"a-to-b", published, 11)
        got = await _receive(b, min(published, granted))
        assert (got.topic, got.payload) == ("to/b/x", b"a-to-b")
        assert await a.silent(0.2) is None and await b.silent(0.2) is None  # one copy each
        await a.send(mq.disconnect())
        await b.send(mq.disconnect())


async def test_two_brokers_in_one_process_keep_their_own_limits() -> None:
    """Each broker applies its own config's limits: a 2 KB PUBLISH closes the connection on the broker
    limited to 1 KB packets and is routed by the other, started after it in the same process."""
    payload = b"x" * 2048
    async with bare_broker(max_packet_size_kb=1) as small, bare_broker(max_packet_size_kb=64) as large:
        async with RawClient.open(large) as sub, RawClient.open(large) as pub:
            await sub.connect("sub")
            assert await sub.subscribe(1, ("big", 1)) == [1]
            await pub.connect("pub")
            await _publish(pub, "big", payload, 1, 1)
            assert (await _receive(sub, 1)).payload == payload
        async with RawClient.open(small) as pub:
            assert (await pub.connect("pub")).return_code == 0
            await pub.send(mq.publish("big", payload, qos=1, packet_id=1))
            assert await pub.closed()
            assert all(p.type != mq.PUBACK for p in pub.skipped), pub.skipped


async def test_bare_broker_limits_come_from_its_config() -> None:
    """A broker's limits are its config's `broker.limits.MqttLimits` entry (defaults without one), or the
    `limits` it is given, never another broker's."""
    first = HardenedBroker(bare_config(max_inflight_messages=3, connect_timeout_s=2))
    second = HardenedBroker(bare_config())
    assert (first.limits.max_inflight_messages, first.limits.connect_timeout_s) == (3, 2.0)
    assert (second.limits.max_inflight_messages, second.limits.connect_timeout_s) == (20, 10.0)
    third = HardenedBroker(bare_config(), limits=first.limits)
    assert third.limits is first.limits


class Probe(BasePlugin[BrokerContext]):  # type: ignore[misc]
    """A plugin that keeps the broker it is bound to."""

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self.broker: HardenedBroker | None = None

    def bind_broker(self, broker: HardenedBroker) -> None:
        self.broker = broker


async def test_plugins_get_the_broker_and_its_public_interface() -> None:
    """A plugin with `bind_broker` gets the broker, which finds sessions, tells whether a session is
    subscribed, delivers to a session subscribed or not at the QoS asked, lists what the session holds
    unacknowledged, and closes a client."""
    config = bare_config()
    config["plugins"][f"{__name__}.Probe"] = {}
    broker = HardenedBroker(config)
    probe = broker.find_plugin(Probe)
    assert probe is not None and probe.broker is broker
    await broker.start()
    try:
        bound = broker_app._bound(broker, "default")
        assert bound is not None
        async with RawClient.open(bound[1]) as client:
            await client.connect("c1")
            assert await client.subscribe(1, ("sub/+", 0)) == [0]
            entry = broker.connection("c1")
            assert entry is not None and broker.is_connected(entry[0])
            session = entry[0]
            assert broker.is_subscribed(session, "sub/x") and not broker.is_subscribed(session, "other")
            assert broker.deliver(session, "other", b"q1", 1)  # not subscribed: delivered anyway
            got = await client.expect(mq.PUBLISH)
            assert broker.pending(session) == [("other", b"q1")]  # in flight until acknowledged
            await client.send(mq.puback(got.packet_id))
            await eventually(lambda: not broker.pending(session), what="the PUBACK to be handled")
            assert (got.topic, got.payload) == ("other", b"q1")
            assert broker.deliver(session, "other", b"q2", 2)
            assert (await _receive(client, 2)).payload == b"q2"
            assert broker.deliver(session, "other", b"q0", 0)
            assert (await _receive(client, 0)).payload == b"q0"
            assert broker.connection("nobody") is None and not broker.close_client("nobody")
            assert broker.close_client("c1")
            assert await client.closed()
        await eventually(lambda: broker.connection("c1") is None, what="the clean session to end")
        assert not broker.deliver(session, "other", b"late", 1)  # its connection has ended
    finally:
        await broker.shutdown()


async def test_a_crowd_connecting_while_the_loop_is_busy_waits_in_the_listen_queue() -> None:
    """Devices reconnecting at once (a gateway restarting) wait in the kernel's accept queue while the event
    loop is busy, and none has its SYN dropped: the listener's backlog is LISTEN_BACKLOG, not asyncio's 100
    (with that, every device past the hundredth waits a second or more for its SYN's retransmission)."""
    crowd = 400
    async with bare_broker() as port:
        socks: list[socket.socket] = []
        try:
            for _ in range(crowd):  # the loop is blocked meanwhile: only the kernel answers
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                socks.append(s)
            pending, connected = set(socks), 0
            deadline = time.monotonic() + 0.8  # under the 1 s of a dropped SYN's first retransmission
            while pending and time.monotonic() < deadline:
                _, writable, _ = select.select([], list(pending), [], 0.1)
                for s in writable:
                    pending.discard(s)
                    connected += s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            assert connected == crowd
        finally:
            for s in socks:
                s.close()

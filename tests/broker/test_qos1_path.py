"""The QoS 1 delivery path's costs: a message dropped at a full outgoing queue starts nothing (no task, no
future), and an acknowledged delivery leaves nothing for the garbage collector. A real `HardenedBroker`
on 127.0.0.1 port 0, raw MQTT clients over TCP."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from broker import app as broker_app
from broker.handler import StrictHandler
from broker.hardened import HardenedBroker
from broker.session_state import LeanSession
from tests.broker import rawmqtt as mq
from tests.broker.rawmqtt import RawClient
from tests.broker.test_bare_broker import bare_config
from tests.support import eventually


@contextlib.asynccontextmanager
async def started(**limits: Any) -> AsyncIterator[tuple[HardenedBroker, int]]:
    broker = HardenedBroker(bare_config(**limits))
    await broker.start()
    try:
        bound = broker_app._bound(broker, "default")
        assert bound is not None
        yield broker, bound[1]
    finally:
        await broker.shutdown()


@contextlib.asynccontextmanager
async def subscribed(**limits: Any) -> AsyncIterator[tuple[HardenedBroker, RawClient, RawClient]]:
    """A broker with `limits`, a client "sub" subscribed to "t" at QoS 1 and a connected publisher "pub"."""
    async with started(**limits) as (broker, port), RawClient.open(port) as sub, RawClient.open(port) as pub:
        await sub.connect("sub")
        await sub.subscribe(1, ("t", 1))
        await pub.connect("pub")
        yield broker, sub, pub


async def test_a_message_dropped_at_a_full_queue_starts_nothing() -> None:
    """A subscriber that never acknowledges fills its in-flight window, then its queue; every further QoS 1
    message to it is counted as dropped on the spot, with no delivery task created for it (the drop used to
    cost more than a delivery: a task each, which then failed)."""
    async with subscribed(max_inflight_messages=2, max_queued_messages=3) as (broker, sub, pub):
        started_flows: list[str] = []  # deliveries that needed a task: the queued ones only
        deliver = broker._deliver
        broker._deliver = lambda handler, topic, *rest, **kw: (  # type: ignore[method-assign]
            started_flows.append(topic),
            deliver(handler, topic, *rest, **kw),
        )[1]
        for i in range(40):
            await pub.send(mq.publish("t", b"x%d" % i, qos=1, packet_id=i + 1))
        await eventually(lambda: broker.dropped_count == 40 - 2 - 3)
        assert len(started_flows) == 3  # the queued ones wait for a place; nothing started for the dropped
        got = [await sub.expect(mq.PUBLISH) for _ in range(2)]  # the window's two, unacknowledged
        assert [p.payload for p in got] == [b"x0", b"x1"]


async def test_an_acknowledged_qos1_delivery_leaves_no_garbage_cycle() -> None:
    """Deliveries acknowledged by the subscriber are freed by reference counting: a garbage collection after
    hundreds of them finds far fewer unreachable objects than messages (a cycle per message used to leave
    tens of thousands per fan-out round to the collector)."""
    messages = 300
    async with subscribed() as (broker, sub, pub):
        gc.collect()
        gc.disable()
        try:
            for i in range(messages):
                await pub.send(mq.publish("t", b"m", qos=1, packet_id=i % 60000 + 1))
                await pub.expect(mq.PUBACK)
                got = await sub.expect(mq.PUBLISH)
                await sub.send(mq.puback(got.packet_id))
            await eventually(lambda: not broker._sessions["sub"][0].inflight_out)
            unreachable = gc.collect()
        finally:
            gc.enable()
        assert unreachable < messages // 3, unreachable


async def test_qos1_deliveries_in_flight_need_no_future_or_timer_each() -> None:
    """A hundred QoS 1 messages in flight to one subscriber are entries in its connection's in-flight table:
    the broker's code asks the event loop for no future and no timer per message delivered (one retry
    timer serves the connection)."""
    async with subscribed(max_inflight_messages=200) as (_broker, sub, pub):
        loop = asyncio.get_running_loop()
        asked: list[str] = []
        for name in ("create_future", "call_later", "call_at"):
            real = getattr(loop, name)
            setattr(loop, name, _counting(asked, name, real))
        try:
            # in one write: the broker's reader then waits for one read, not a hundred
            await pub.send(b"".join(mq.publish("t", b"n%d" % i, qos=1, packet_id=i + 1) for i in range(100)))
            got = [await sub.expect(mq.PUBLISH) for _ in range(100)]
        finally:
            for name in ("create_future", "call_later", "call_at"):
                delattr(loop, name)  # the instance attribute goes; the loop's own method is back
        assert [p.payload for p in got] == [b"n%d" % i for i in range(100)]
        assert len(asked) < 20, sorted(set(asked))


async def test_only_the_unacknowledged_messages_are_resent_in_their_order() -> None:
    """Of three QoS 1 messages in flight, the acknowledged middle one is not sent again; the other two are,
    with DUP, their packet ids and in the order they were sent, until acknowledged."""
    async with subscribed(retry_interval_s=0.3) as (broker, sub, pub):
        for i in range(3):
            await pub.send(mq.publish("t", b"r%d" % i, qos=1, packet_id=i + 1))
        first = [await sub.expect(mq.PUBLISH) for _ in range(3)]
        assert not any(p.dup for p in first)
        await sub.send(mq.puback(first[1].packet_id))
        again = [await sub.expect(mq.PUBLISH, timeout=1.5) for _ in range(2)]
        assert [(p.dup, p.packet_id, p.payload) for p in again] == [
            (True, first[0].packet_id, b"r0"),
            (True, first[2].packet_id, b"r2"),
        ]
        await sub.send(*(mq.puback(p.packet_id) for p in again))
        await eventually(lambda: not broker._sessions["sub"][0].inflight_out)
        late = await sub.silent(0.7)
        assert late is None or late.packet_id != first[1].packet_id, late


def _counting(asked: list[str], name: str, real: Any) -> Any:
    """`real`, noting each call made from the broker's own code (the test's clients share the loop)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        caller = sys._getframe(1).f_code.co_filename
        if f"{os.sep}broker{os.sep}" in caller:
            asked.append(f"{name} from {os.path.basename(caller)}")
        return real(*args, **kwargs)

    return call


async def test_a_connected_clients_handler_adds_nothing_to_amqtts_instance_dict() -> None:
    """The handler of a connected client keeps its own state in slots: its instance dict holds amqtt's
    attributes only, so CPython still shares its keys among all connections (with thirty keys it became an
    unshared table, 1.3 KiB more per connected client)."""
    async with started() as (broker, port), RawClient.open(port) as sub:
        await sub.connect("sub")
        await sub.subscribe(1, ("t", 1))
        handler = broker._sessions["sub"][1]
        plain = BrokerProtocolHandler(broker.plugins_manager)
        assert not set(vars(handler)) & set(StrictHandler.__slots__)
        # amqtt sets one more attribute once connected (keepalive_timeout); the keys stay shared
        assert sys.getsizeof(vars(handler)) <= 2 * sys.getsizeof(vars(plain)), sys.getsizeof(vars(handler))


async def test_a_connected_clients_session_adds_nothing_to_amqtts_instance_dict() -> None:
    """The session keeps the broker's own fields in slots, so its instance dict is amqtt's and its keys stay
    shared among all sessions (with 32 keys it was an unshared table, 1.3 KiB more per session)."""
    async with started() as (broker, port), RawClient.open(port) as sub:
        await sub.connect("sub")
        await sub.subscribe(1, ("t", 1))
        session = broker._sessions["sub"][0]
        assert not set(vars(session)) & set(LeanSession.__slots__)
        assert sys.getsizeof(vars(session)) <= 2 * sys.getsizeof(vars(Session())), sys.getsizeof(
            vars(session)
        )

"""The QoS 1 delivery path's costs: a message dropped at a full outgoing queue starts nothing (no task, no
future), and an acknowledged delivery leaves nothing for the garbage collector. A real `HardenedBroker`
on 127.0.0.1 port 0, raw MQTT clients over TCP."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

from broker import app as broker_app
from broker.hardened import HardenedBroker
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


async def test_a_message_dropped_at_a_full_queue_starts_nothing() -> None:
    """A subscriber that never acknowledges fills its in-flight window, then its queue; every further QoS 1
    message to it is counted as dropped on the spot, with no delivery task created for it (the drop used to
    cost more than a delivery: a task each, which then failed)."""
    async with (
        started(max_inflight_messages=2, max_queued_messages=3) as (broker, port),
        RawClient.open(port) as sub,
        RawClient.open(port) as pub,
    ):
        await sub.connect("sub")
        await sub.subscribe(1, ("t", 1))
        await pub.connect("pub")
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
    async with started() as (broker, port), RawClient.open(port) as sub, RawClient.open(port) as pub:
        await sub.connect("sub")
        await sub.subscribe(1, ("t", 1))
        await pub.connect("pub")
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

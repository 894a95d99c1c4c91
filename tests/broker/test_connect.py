"""MQTT 3.1.1 CONNECT handling, driven with raw packets over a real socket: clean sessions end with their
connection, the CONNECT is decoded whole and checked field by field before anything else happens, the
first packet must be a CONNECT, other protocol levels are refused with return code 1, and sockets that
never send a CONNECT cannot starve a listener.

Each test names the statement of the standard it pins down (MQTT-x.y.z-n).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.broker import rawmqtt as mq
from tests.broker.rawmqtt import RawClient
from tests.broker.test_conformance import (
    CLOSE_S,
    QUIET_S,
    _fresh,
    publish_qos1,
)
from tests.support import Env

# ------------------------------------------------------------------------------------- clean sessions


async def _no_delivery(port: int, client: RawClient, topic: str) -> None:
    """A QoS 1 message published to `topic` does not reach `client`."""
    async with RawClient.open(port) as pub:
        assert (await pub.connect(_fresh("clean-pub"))).return_code == 0
        await publish_qos1(pub, topic, b"for the old session", 5)
        assert await client.silent(QUIET_S) is None
        await pub.send(mq.disconnect())


@pytest.mark.parametrize("ending", ["disconnect", "reset"])
async def test_persistent_connect_after_a_clean_session_starts_empty(env: Env, ending: str) -> None:
    """MQTT-3.1.2-6 / MQTT-3.2.2-2: a clean session is discarded when its connection ends (DISCONNECT or
    not), so a clean-session-0 CONNECT of the same client id gets session-present 0 and none of its
    subscriptions."""
    client_id, topic = _fresh("was-clean"), _fresh("clean/t")
    async with RawClient.open(env.mqtt_port) as first:
        assert (await first.connect(client_id, clean=True)).return_code == 0
        assert await first.subscribe(1, (topic, 1)) == [1]
        if ending == "disconnect":
            await first.send(mq.disconnect())
            assert await first.closed(CLOSE_S)
        else:
            await first.abort()
    await asyncio.sleep(0.1)
    async with RawClient.open(env.mqtt_port) as second:
        ack = await second.connect(client_id, clean=False)
        assert (ack.return_code, ack.session_present) == (0, False)
        await _no_delivery(env.mqtt_port, second, topic)
        await second.send(mq.disconnect())
    async with RawClient.open(env.mqtt_port) as third:  # the persistent session now exists
        ack = await third.connect(client_id, clean=False)
        assert (ack.return_code, ack.session_present) == (0, True)
        await third.send(mq.disconnect())


async def test_persistent_connect_taking_over_a_clean_session_starts_empty(env: Env) -> None:
    """MQTT-3.1.2-6 / MQTT-3.2.2-2 / MQTT-3.1.4-2: a clean-session-0 CONNECT that takes over a live
    clean-session-1 connection closes it and starts an empty session: session-present 0, and the old
    session's subscription is not delivered to the new connection."""
    client_id, topic = _fresh("live-clean"), _fresh("clean/live")
    async with RawClient.open(env.mqtt_port) as first:
        assert (await first.connect(client_id, clean=True)).return_code == 0
        assert await first.subscribe(1, (topic, 1)) == [1]
        async with RawClient.open(env.mqtt_port) as second:
            ack = await second.connect(client_id, clean=False)
            assert (ack.return_code, ack.session_present) == (0, False)
            assert await first.closed(CLOSE_S)
            await _no_delivery(env.mqtt_port, second, topic)
            await second.send(mq.disconnect())

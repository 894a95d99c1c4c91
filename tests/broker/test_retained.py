"""Retained messages reach only the sessions that subscribed to them (amqtt 0.12.1 replays every client's
filters to each new connection)."""

from __future__ import annotations

import asyncio

from tests.support import Env


async def test_new_client_gets_no_retained_messages_of_other_clients_filters(env: Env) -> None:
    """A client that subscribed to nothing receives no retained message, even one matching another
    client's subscription; once it subscribes itself it gets the retained message exactly once."""
    holder = await env.device("ops", "holder", client_id="holder").connect()
    await holder.subscribe("/apps/x/#")
    publisher = await env.device("ops", "pub", client_id="publisher").connect()
    info = publisher.client.publish("/apps/x/1", b"retained-value", qos=1, retain=True)
    await asyncio.to_thread(info.wait_for_publish, 5)
    await holder.wait_messages("/apps/x/1")

    newcomer = await env.device("ops", "new", client_id="newcomer").connect()
    await asyncio.sleep(0.5)
    assert newcomer.received == []
    await newcomer.subscribe("/apps/x/#")
    [message] = await newcomer.wait_messages("/apps/x/1")
    assert message == {"raw": b"retained-value"}
    await asyncio.sleep(0.3)
    assert len(newcomer.messages("/apps/x/1")) == 1

"""`HardenedBroker`: amqtt's `Broker` with fixes for what amqtt 0.12.1 leaves open, each small enough to
offer upstream.

- Retained messages on CONNECT: amqtt replays retained messages for *every* client's subscription
  filters to each new session, with no receive check, so a client that subscribed to nothing receives
  other devices' retained messages. Here a session gets retained messages only for filters it holds
  itself, and only those its topic ACL lets it receive (MQTT-3.3.1-6 is about the subscriber's own
  subscriptions).
- The Will: amqtt accepts any Will topic and later publishes it without the publish check. Here a
  CONNECT whose Will topic is empty, has wildcards, starts with `$` or is not valid UTF-8 is refused
  (MQTT-3.1.2-9/-14, MQTT-4.7.1-1), and a Will on a topic the client may not publish to is dropped at
  CONNECT with a log line, so it is never sent.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action

log = logging.getLogger("ota.broker")


class HardenedBroker(Broker):  # type: ignore[misc]
    async def _authenticate(self, session: Any, listener: Any) -> bool:
        if not await super()._authenticate(session, listener):
            return False
        if not session.will_flag:
            return True
        topic = session.will_topic
        if isinstance(topic, bytes):
            try:
                topic = topic.decode("utf-8")
            except UnicodeDecodeError:
                topic = None
        if not topic or "+" in topic or "#" in topic or topic.startswith("$") or "\x00" in topic:
            log.warning("refused CONNECT of %r: invalid Will topic %r", str(session.client_id)[:96], topic)
            return False
        if not await self._topic_filtering(session, topic=topic, action=Action.PUBLISH):
            log.warning(
                "dropped the Will of %r: it may not publish to %r", str(session.client_id)[:96], topic[:128]
            )
            session.will_flag = False
        return True

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s is session for s, _ in holders):
            return  # another client's filter: not this session's to receive
        handler = self._get_handler(session)
        if handler is None:
            return
        sends = []
        for topic, retained in list(self._retained_messages.items()):
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=Action.RECEIVE):
                continue
            sends.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
                )
            )
        if sends:
            await asyncio.wait(sends)

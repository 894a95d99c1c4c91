"""Which topics a device or an application account may use. Pure functions over topic strings.

A device lives in its own namespaces: the OTA topics that name it, `/sys/{pk}/{dn}/...` and
`/{pk}/{dn}/user/...`. It may publish there (but not on the topics the server sends it: upgrade notices
and pull replies), subscribe to filters that stay inside the topics the server sends it (not its own OTA
uplink topics), and receive only what is inside its namespaces.
An application account has MQTT filter patterns per action; a subscription is allowed only when a
pattern covers every topic the requested filter could match (`x/+` does not admit `x/#`).
The topics are spelled in plugins.ota.core.topics, the filter rules in plugins.mqtt_topics.
"""

from __future__ import annotations

from collections.abc import Iterable

from plugins.mqtt_topics import filter_covers, filter_matches
from plugins.ota.core.topics import (
    SERVER_TO_DEVICE,
    DeviceRef,
    device_namespaces,
    device_subscribable,
    topic_name,
)


def _server_to_device(device: DeviceRef) -> tuple[str, ...]:
    return tuple(topic_name(kind, device) for kind in SERVER_TO_DEVICE)


def device_may_publish(device: DeviceRef, topic: str) -> bool:
    if topic in _server_to_device(device):
        return False
    return any(filter_matches(ns, topic) for ns in device_namespaces(device))


def device_may_subscribe(device: DeviceRef, topic_filter: str) -> bool:
    return any(filter_covers(ns, topic_filter) for ns in device_subscribable(device))


def device_may_receive(device: DeviceRef, topic: str) -> bool:
    return any(filter_matches(ns, topic) for ns in device_namespaces(device))


def any_covers(patterns: Iterable[str], topic_filter: str) -> bool:
    return any(filter_covers(p, topic_filter) for p in patterns)


def any_matches(patterns: Iterable[str], topic: str) -> bool:
    return any(filter_matches(p, topic) for p in patterns)

"""Which topics a device or an application account may use. Pure functions over topic strings.

A device lives in its own namespaces: the OTA topics that name it, `/sys/{pk}/{dn}/...` and
`/{pk}/{dn}/user/...`. It may publish there (but not on the topics the server sends it: upgrade notices
and pull replies), subscribe to filters that stay inside the topics the server sends it (not its own OTA
uplink topics), and receive only what is inside its namespaces.
An application account has MQTT filter patterns per action; a subscription is allowed only when a
pattern covers every topic the requested filter could match (`x/+` does not admit `x/#`).
"""

from __future__ import annotations

from collections.abc import Iterable

from plugins.ota.core.topics import SERVER_TO_DEVICE, DeviceRef, filter_matches, topic_name


def _namespaces(device: DeviceRef) -> tuple[str, ...]:
    pk, dn = device.product_key, device.device_name
    return (
        f"/ota/device/inform/{pk}/{dn}",
        f"/ota/device/progress/{pk}/{dn}",
        f"/ota/device/request/{pk}/{dn}",
        f"/ota/device/upgrade/{pk}/{dn}",
        f"/sys/{pk}/{dn}/#",
        f"/{pk}/{dn}/user/#",
    )


def _server_to_device(device: DeviceRef) -> tuple[str, ...]:
    return tuple(topic_name(kind, device) for kind in SERVER_TO_DEVICE)


def device_may_publish(device: DeviceRef, topic: str) -> bool:
    if topic in _server_to_device(device):
        return False
    return any(filter_matches(ns, topic) for ns in _namespaces(device))


def _subscribable(device: DeviceRef) -> tuple[str, ...]:
    """Where a device may subscribe: the topics the server sends it (its OTA notices, the legacy request
    topic it is answered on, its `/sys` and user namespaces), not its own OTA uplink topics."""
    pk, dn = device.product_key, device.device_name
    return (
        f"/ota/device/upgrade/{pk}/{dn}",
        f"/ota/device/request/{pk}/{dn}",
        f"/sys/{pk}/{dn}/#",
        f"/{pk}/{dn}/user/#",
    )


def device_may_subscribe(device: DeviceRef, topic_filter: str) -> bool:
    return any(filter_covers(ns, topic_filter) for ns in _subscribable(device))


def device_may_receive(device: DeviceRef, topic: str) -> bool:
    return any(filter_matches(ns, topic) for ns in _namespaces(device))


def filter_covers(pattern: str, topic_filter: str) -> bool:
    """True when every topic `topic_filter` can match is also matched by `pattern` (MQTT 3.1.1 §4.7)."""
    p_levels, f_levels = pattern.split("/"), topic_filter.split("/")
    if topic_filter.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    for i, p in enumerate(p_levels):
        if p == "#":
            return True
        if i >= len(f_levels):
            return False
        f = f_levels[i]
        if f == "#":
            return False
        if p == "+":
            continue
        if f == "+" or p != f:
            return False
    return len(p_levels) == len(f_levels)


def any_covers(patterns: Iterable[str], topic_filter: str) -> bool:
    return any(filter_covers(p, topic_filter) for p in patterns)


def any_matches(patterns: Iterable[str], topic: str) -> bool:
    return any(filter_matches(p, topic) for p in patterns)

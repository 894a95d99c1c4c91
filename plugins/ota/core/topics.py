"""The Aliyun OTA topic names: parsed at the boundary into `(DeviceRef, TopicKind)`.

Nothing past this module handles a raw topic string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

# Aliyun allows letters, digits and `-_@.:` in device names (4-32 chars) and product keys; we accept
# up to 64 characters of that alphabet so that nothing else (no `/`, wildcards, NUL) can reach a topic.
_NAME = re.compile(r"^[A-Za-z0-9_.:@\-]{1,64}$")


class InvalidDeviceRef(ValueError):
    """A product key or device name outside the allowed alphabet or length."""


@dataclass(frozen=True, order=True, slots=True)
class DeviceRef:
    """One device: `(product_key, device_name)`."""

    product_key: str
    device_name: str
    # Its hash, computed once: a device reference keys the service's maps and sets, about twenty look-ups
    # per device connecting (the dataclass's own `__hash__` builds a tuple each time).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, value in (("product_key", self.product_key), ("device_name", self.device_name)):
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise InvalidDeviceRef(f"{name} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . : @ -")
        object.__setattr__(self, "_hash", hash((self.product_key, self.device_name)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def parse(cls, text: str) -> DeviceRef:
        """Parse the `pk/dn` form used by the API and the CLI."""
        pk, sep, dn = text.partition("/")
        if not sep:
            raise InvalidDeviceRef(f"{text!r} is not of the form product_key/device_name")
        return cls(pk, dn)

    @classmethod
    def from_username(cls, username: str | None) -> DeviceRef | None:
        """The Aliyun MQTT username `deviceName&productKey`, or None when it is not of that form."""
        if not username or username.count("&") != 1:
            return None
        dn, pk = username.split("&")
        try:
            return cls(pk, dn)
        except InvalidDeviceRef:
            return None

    def __str__(self) -> str:
        return f"{self.product_key}/{self.device_name}"


class TopicKind(StrEnum):
    """What a topic is for; device→server kinds first, then server→device."""

    INFORM = "inform"
    PROGRESS = "progress"
    FIRMWARE_GET = "firmware_get"
    LEGACY_REQUEST = "legacy_request"
    FILE_DOWNLOAD = "file_download"  # a block of a firmware file over MQTT
    UPGRADE = "upgrade"
    FIRMWARE_GET_REPLY = "firmware_get_reply"
    FILE_DOWNLOAD_REPLY = "file_download_reply"

    @property
    def device_to_server(self) -> bool:
        return self in _UPLINK


_UPLINK = frozenset(
    {
        TopicKind.INFORM,
        TopicKind.PROGRESS,
        TopicKind.FIRMWARE_GET,
        TopicKind.LEGACY_REQUEST,
        TopicKind.FILE_DOWNLOAD,
    }
)
# What the server sends a device on its own topics: delivered to the device's session whether or not it
# subscribed (Aliyun's auto-subscription; LinkSDK subscribes to none of these, or loses it on reconnect).
SERVER_TO_DEVICE = frozenset({TopicKind.UPGRADE, TopicKind.FIRMWARE_GET_REPLY, TopicKind.FILE_DOWNLOAD_REPLY})


@dataclass(frozen=True, slots=True)
class OtaTopic:
    """A parsed OTA topic."""

    kind: TopicKind
    device: DeviceRef

    @classmethod
    def parse(cls, topic: str) -> OtaTopic | None:
        """The OTA topic named by `topic`, None for any other topic; raises InvalidDeviceRef for an OTA
        topic whose product key or device name is not acceptable."""
        parts = topic.split("/")
        # /ota/device/<verb>/<pk>/<dn>  ->  ["", "ota", "device", verb, pk, dn]
        if len(parts) == 6 and parts[0] == "" and parts[1] == "ota" and parts[2] == "device":
            kind = _OTA_VERBS.get(parts[3])
            if kind is None:
                return None
            return cls(kind, DeviceRef(parts[4], parts[5]))
        # /sys/<pk>/<dn>/thing/ota/firmware/get[_reply]
        if (
            len(parts) == 8
            and parts[0] == ""
            and parts[1] == "sys"
            and parts[4:7] == ["thing", "ota", "firmware"]
            and parts[7] in ("get", "get_reply")
        ):
            kind = TopicKind.FIRMWARE_GET if parts[7] == "get" else TopicKind.FIRMWARE_GET_REPLY
            return cls(kind, DeviceRef(parts[2], parts[3]))
        # /sys/<pk>/<dn>/thing/file/download[_reply]
        if (
            len(parts) == 7
            and parts[0] == ""
            and parts[1] == "sys"
            and parts[4:6] == ["thing", "file"]
            and parts[6] in ("download", "download_reply")
        ):
            kind = TopicKind.FILE_DOWNLOAD if parts[6] == "download" else TopicKind.FILE_DOWNLOAD_REPLY
            return cls(kind, DeviceRef(parts[2], parts[3]))
        return None

    @property
    def name(self) -> str:
        return topic_name(self.kind, self.device)


_OTA_VERBS = {
    "inform": TopicKind.INFORM,
    "progress": TopicKind.PROGRESS,
    "request": TopicKind.LEGACY_REQUEST,
    "upgrade": TopicKind.UPGRADE,
}


def topic_name(kind: TopicKind, device: DeviceRef) -> str:
    """The topic string of `kind` for `device`."""
    return _spell(kind, device.product_key, device.device_name)


def uplink_filters() -> tuple[str, ...]:
    """Topic filters matching what every device sends to the server, one per device-to-server kind."""
    return tuple(_spell(kind, "+", "+") for kind in TopicKind if kind.device_to_server)


def _spell(kind: TopicKind, pk: str, dn: str) -> str:
    match kind:
        case TopicKind.INFORM:
            return f"/ota/device/inform/{pk}/{dn}"
        case TopicKind.PROGRESS:
            return f"/ota/device/progress/{pk}/{dn}"
        case TopicKind.LEGACY_REQUEST:
            return f"/ota/device/request/{pk}/{dn}"
        case TopicKind.UPGRADE:
            return f"/ota/device/upgrade/{pk}/{dn}"
        case TopicKind.FIRMWARE_GET:
            return f"/sys/{pk}/{dn}/thing/ota/firmware/get"
        case TopicKind.FIRMWARE_GET_REPLY:
            return f"/sys/{pk}/{dn}/thing/ota/firmware/get_reply"
        case TopicKind.FILE_DOWNLOAD:
            return f"/sys/{pk}/{dn}/thing/file/download"
        case TopicKind.FILE_DOWNLOAD_REPLY:
            return f"/sys/{pk}/{dn}/thing/file/download_reply"


def device_namespaces(device: DeviceRef) -> tuple[str, ...]:
    """The topic filters a device lives in: its own OTA topics, `/sys/{pk}/{dn}/#` and its user topics
    `/{pk}/{dn}/user/#` (the device ACL lets it publish and receive there)."""
    pk, dn = device.product_key, device.device_name
    ota = (TopicKind.INFORM, TopicKind.PROGRESS, TopicKind.LEGACY_REQUEST, TopicKind.UPGRADE)
    return (*(topic_name(kind, device) for kind in ota), f"/sys/{pk}/{dn}/#", f"/{pk}/{dn}/user/#")


def device_subscribable(device: DeviceRef) -> tuple[str, ...]:
    """Where a device may subscribe: the topics the server sends it (its OTA notices, the legacy request
    topic it is answered on, its `/sys` and user namespaces), not its own OTA uplink topics."""
    pk, dn = device.product_key, device.device_name
    ota = (TopicKind.UPGRADE, TopicKind.LEGACY_REQUEST)
    return (*(topic_name(kind, device) for kind in ota), f"/sys/{pk}/{dn}/#", f"/{pk}/{dn}/user/#")

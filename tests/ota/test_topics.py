"""Aliyun OTA topic names (`plugins.ota.core.topics`): DeviceRef, parsing topics into (kind, device) at the
boundary, building topic names, and MQTT 3.1.1 topic filter matching."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.mqtt_topics import filter_matches
from plugins.ota.core.topics import (
    DeviceRef,
    InvalidDeviceRef,
    OtaTopic,
    TopicKind,
    topic_name,
    uplink_filters,
)

DEV = DeviceRef("a1B2c3D4e5", "dev-01")


def ref(pk: str = "pk1", dn: str = "dev1") -> DeviceRef:
    """A DeviceRef with simple defaults."""
    return DeviceRef(pk, dn)


# ---------------------------------------------------------------------------------------- DeviceRef


@pytest.mark.parametrize(
    ("pk", "dn"),
    [("pk", "dn"), ("a1B2c3D4e5", "dev_01.x:y@z-w"), ("p" * 64, "d" * 64), ("0", "1")],
)
def test_device_ref_accepts_allowed_names(pk: str, dn: str) -> None:
    """Product keys and device names of 1-64 characters of A-Z a-z 0-9 _ . : @ - are accepted."""
    device = DeviceRef(pk, dn)
    assert (device.product_key, device.device_name) == (pk, dn)


BAD_NAMES = [
    "",
    "+",
    "#",
    "a+b",
    "dev#",
    "a/b",
    "x" * 65,
    "nul\x00",
    "sp ace",
    "tab\t",
    "dévice",
    "dn\n",
    "\n",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_device_ref_rejects_bad_device_name(name: str) -> None:
    """Wildcards, slashes, empty, over-64-character, NUL, whitespace and non-ASCII device names are refused."""
    with pytest.raises(InvalidDeviceRef, match="device_name"):
        DeviceRef("pk", name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_device_ref_rejects_bad_product_key(name: str) -> None:
    """The same rules apply to the product key."""
    with pytest.raises(InvalidDeviceRef, match="product_key"):
        DeviceRef(name, "dn")


@pytest.mark.parametrize("value", [None, 5, b"pk"])
def test_device_ref_rejects_non_strings(value: Any) -> None:
    """A product key that is not a string is refused with InvalidDeviceRef, not a TypeError."""
    with pytest.raises(InvalidDeviceRef):
        DeviceRef(value, "dn")


def test_device_ref_is_a_frozen_ordered_value() -> None:
    """DeviceRefs compare and hash by value, sort by (product_key, device_name) and cannot be changed."""
    assert ref() == ref()
    assert len({ref(), ref()}) == 1
    assert sorted([ref("b", "a"), ref("a", "b"), ref("a", "a")]) == [
        ref("a", "a"),
        ref("a", "b"),
        ref("b", "a"),
    ]
    with pytest.raises(AttributeError):
        ref().device_name = "other"  # type: ignore[misc]


def test_device_ref_parse_and_str_round_trip() -> None:
    """DeviceRef.parse reads `pk/dn`; str() writes it back."""
    device = DeviceRef.parse("pk1/dev1")
    assert device == DeviceRef("pk1", "dev1")
    assert str(device) == "pk1/dev1"
    assert DeviceRef.parse(str(DEV)) == DEV


@pytest.mark.parametrize("text", ["pk1dev1", "", "/", "pk1/", "/dev1", "pk1/dev1/x", "pk+/dev1", "pk1/dev#"])
def test_device_ref_parse_rejects_bad_text(text: str) -> None:
    """Text without exactly one `/` between two valid names is refused."""
    with pytest.raises(InvalidDeviceRef):
        DeviceRef.parse(text)


def test_device_ref_from_username() -> None:
    """The Aliyun username `deviceName&productKey` gives DeviceRef(productKey, deviceName)."""
    assert DeviceRef.from_username("dev1&pk1") == DeviceRef("pk1", "dev1")


@pytest.mark.parametrize(
    "username", [None, "", "dev1", "dev1&pk1&x", "&pk1", "dev1&", "&", "de v&pk1", "dev1&p+"]
)
def test_device_ref_from_username_rejects_other_forms(username: str | None) -> None:
    """A username not of the form `dn&pk` with valid names gives None (it is not a device)."""
    assert DeviceRef.from_username(username) is None


# ------------------------------------------------------------------------------------------- parsing

TOPICS = [
    ("/ota/device/inform/pk1/dev1", TopicKind.INFORM),
    ("/ota/device/progress/pk1/dev1", TopicKind.PROGRESS),
    ("/ota/device/request/pk1/dev1", TopicKind.LEGACY_REQUEST),
    ("/ota/device/upgrade/pk1/dev1", TopicKind.UPGRADE),
    ("/sys/pk1/dev1/thing/ota/firmware/get", TopicKind.FIRMWARE_GET),
    ("/sys/pk1/dev1/thing/ota/firmware/get_reply", TopicKind.FIRMWARE_GET_REPLY),
    ("/sys/pk1/dev1/thing/file/download", TopicKind.FILE_DOWNLOAD),
    ("/sys/pk1/dev1/thing/file/download_reply", TopicKind.FILE_DOWNLOAD_REPLY),
]


def test_topics_cover_every_kind() -> None:
    """The table of example topics names every TopicKind."""
    assert {kind for _, kind in TOPICS} == set(TopicKind)


@pytest.mark.parametrize(("topic", "kind"), TOPICS)
def test_parse_every_ota_topic(topic: str, kind: TopicKind) -> None:
    """Each OTA topic parses into its kind and the device pk1/dev1; `.name` gives the topic back."""
    parsed = OtaTopic.parse(topic)
    assert parsed == OtaTopic(kind, DeviceRef("pk1", "dev1"))
    assert parsed.name == topic


@pytest.mark.parametrize(
    "kind", [TopicKind.INFORM, TopicKind.PROGRESS, TopicKind.FIRMWARE_GET, TopicKind.LEGACY_REQUEST]
)
def test_uplink_kinds_are_device_to_server(kind: TopicKind) -> None:
    """inform, progress, firmware/get and the legacy request are device→server."""
    assert kind.device_to_server


@pytest.mark.parametrize("kind", [TopicKind.UPGRADE, TopicKind.FIRMWARE_GET_REPLY])
def test_downlink_kinds_are_server_to_device(kind: TopicKind) -> None:
    """The upgrade notice and firmware/get_reply are server→device."""
    assert not kind.device_to_server


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "/",
        "/ota/device/inform/pk1",
        "/ota/device/inform/pk1/dev1/extra",
        "/ota/device/inform/pk1/dev1/",
        "ota/device/inform/pk1/dev1",
        "//ota/device/inform/pk1/dev1",
        "/ota/device/unknown/pk1/dev1",
        "/ota/device/Inform/pk1/dev1",
        "/ota/devices/inform/pk1/dev1",
        "/OTA/device/inform/pk1/dev1",
        "/sys/pk1/dev1/thing/ota/firmware/put",
        "/sys/pk1/dev1/thing/ota/firmware/get/extra",
        "/sys/pk1/dev1/thing/ota/firmware",
        "/sys/pk1/dev1/thing/event/property/post",
        "/sys/pk1/dev1/thing/ota/module/get",
        "sys/pk1/dev1/thing/ota/firmware/get",
        "/ext/pk1/dev1/thing/ota/firmware/get",
        "$SYS/broker/uptime",
        "/pk1/dev1/user/update",
    ],
)
def test_parse_returns_none_for_other_topics(topic: str) -> None:
    """Topics that are not exactly one of the OTA shapes are not OTA topics: None."""
    assert OtaTopic.parse(topic) is None


@pytest.mark.parametrize(
    "topic",
    [
        "/ota/device/inform/+/dev1",
        "/ota/device/inform/pk1/+",
        "/ota/device/progress/pk1/#",
        "/ota/device/inform//dev1",
        "/ota/device/inform/pk1/",
        "/ota/device/request/pk1/dev\x00",
        "/ota/device/inform/pk1/" + "d" * 65,
        "/ota/device/inform/pk1/dev1\n",
        "/sys/+/dev1/thing/ota/firmware/get",
        "/sys/pk1//thing/ota/firmware/get_reply",
        "/sys/pk1/" + "d" * 65 + "/thing/ota/firmware/get",
    ],
)
def test_parse_raises_for_ota_topic_with_bad_names(topic: str) -> None:
    """An OTA-shaped topic with a wildcard, empty, over-long, NUL or newline name raises InvalidDeviceRef."""
    with pytest.raises(InvalidDeviceRef):
        OtaTopic.parse(topic)


@pytest.mark.parametrize("kind", list(TopicKind))
def test_topic_name_round_trips(kind: TopicKind) -> None:
    """topic_name builds the topic that OtaTopic.parse reads back as the same kind and device."""
    topic = topic_name(kind, DEV)
    assert OtaTopic.parse(topic) == OtaTopic(kind, DEV)
    assert OtaTopic(kind, DEV).name == topic


def test_topic_names_match_spec() -> None:
    """The topic strings are exactly Aliyun's (the MQTT block download's included)."""
    device = DeviceRef("pk", "dn")
    assert {kind: topic_name(kind, device) for kind in TopicKind} == {
        TopicKind.INFORM: "/ota/device/inform/pk/dn",
        TopicKind.PROGRESS: "/ota/device/progress/pk/dn",
        TopicKind.LEGACY_REQUEST: "/ota/device/request/pk/dn",
        TopicKind.UPGRADE: "/ota/device/upgrade/pk/dn",
        TopicKind.FIRMWARE_GET: "/sys/pk/dn/thing/ota/firmware/get",
        TopicKind.FIRMWARE_GET_REPLY: "/sys/pk/dn/thing/ota/firmware/get_reply",
        TopicKind.FILE_DOWNLOAD: "/sys/pk/dn/thing/file/download",
        TopicKind.FILE_DOWNLOAD_REPLY: "/sys/pk/dn/thing/file/download_reply",
    }


names = st.from_regex(r"[A-Za-z0-9_.:@\-]{1,64}", fullmatch=True)


@settings(max_examples=200, deadline=None, database=None)
@given(pk=names, dn=names, kind=st.sampled_from(list(TopicKind)))
def test_topic_name_round_trips_for_any_valid_names(pk: str, dn: str, kind: TopicKind) -> None:
    """For any valid product key and device name, parse(topic_name(kind, device)) gives them back."""
    device = DeviceRef(pk, dn)
    assert OtaTopic.parse(topic_name(kind, device)) == OtaTopic(kind, device)
    assert DeviceRef.parse(str(device)) == device
    assert DeviceRef.from_username(f"{dn}&{pk}") == device


# ------------------------------------------------------------------------------------ filter matching


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        # exact
        ("/ota/device/upgrade/pk/dn", "/ota/device/upgrade/pk/dn", True),
        ("/ota/device/upgrade/pk/dn", "/ota/device/upgrade/pk/dn2", False),
        ("/ota/device/upgrade/pk/dn", "/ota/device/upgrade/pk", False),
        ("/ota/device/upgrade/pk", "/ota/device/upgrade/pk/dn", False),
        ("a/b", "A/B", False),
        ("a/b", "a/b/", False),
        # single level +
        ("/ota/device/upgrade/+/dn", "/ota/device/upgrade/pk/dn", True),
        ("/ota/device/upgrade/pk/+", "/ota/device/upgrade/pk/dn", True),
        ("/ota/device/+/pk/dn", "/ota/device/inform/pk/dn", True),
        ("/ota/device/upgrade/+", "/ota/device/upgrade/pk/dn", False),
        ("+", "a", True),
        ("+", "a/b", False),
        ("+", "/a", False),
        ("+/+", "/a", True),
        ("/+", "/a", True),
        ("a/+", "a/", True),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        # multi level #
        ("#", "a", True),
        ("#", "/ota/device/upgrade/pk/dn", True),
        ("/ota/#", "/ota/device/upgrade/pk/dn", True),
        ("/sys/pk/dn/#", "/sys/pk/dn/thing/ota/firmware/get_reply", True),
        ("/sys/pk/dn/#", "/sys/pk/other/thing/ota/firmware/get_reply", False),
        ("sport/#", "sport", True),
        ("sport/tennis/#", "sport/tennis/player1/ranking", True),
        ("sport/#", "sports", False),
        ("a/+/#", "a/b", True),
        ("a/+/#", "a", False),
        # $ topics are not matched by filters starting with a wildcard
        ("#", "$SYS/broker/uptime", False),
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("+", "$SYS", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$SYS/+/uptime", "$SYS/broker/uptime", True),
        ("$SYS/broker/uptime", "$SYS/broker/uptime", True),
        ("a/#", "a/$b", True),
    ],
)
def test_filter_matches(topic_filter: str, topic: str, matches: bool) -> None:
    """MQTT 3.1.1 §4.7 matching: exact levels, `+` for one level, `#` for the rest, `$` topics protected."""
    assert filter_matches(topic_filter, topic) is matches


@pytest.mark.parametrize(("topic", "_kind"), TOPICS)
def test_device_wildcard_subscriptions_match_ota_topics(topic: str, _kind: TopicKind) -> None:
    """Typical device and operator subscriptions match the OTA topics they are meant to."""
    assert filter_matches("#", topic)
    prefix = "/ota/device/+/pk1/dev1" if topic.startswith("/ota/") else "/sys/pk1/dev1/#"
    assert filter_matches(prefix, topic)


@given(names, names)
@settings(max_examples=100, deadline=None)
def test_uplink_filters_match_what_devices_send_and_nothing_the_server_sends(pk: str, dn: str) -> None:
    """Every device-to-server topic of any device matches one of the filters; no server-to-device topic
    matches any (the attached service would receive its own notices)."""
    device = DeviceRef(pk, dn)
    filters = uplink_filters()
    for kind in TopicKind:
        matched = [f for f in filters if filter_matches(f, topic_name(kind, device))]
        assert len(matched) == (1 if kind.device_to_server else 0), (kind, matched)


def test_a_device_reference_hashes_as_its_two_names_and_survives_pickling() -> None:
    """The hash is computed once, from the product key and device name only: equal references are one key,
    a copy through pickle too, and the cached hash takes no part in equality, order or repr."""
    import pickle

    first, same, other = DeviceRef("pk", "d1"), DeviceRef("pk", "d1"), DeviceRef("pk", "d2")
    assert first == same and hash(first) == hash(same) == hash(("pk", "d1"))
    assert len({first, same, other}) == 2 and first < other
    copied = pickle.loads(pickle.dumps(first))
    assert copied == first and hash(copied) == hash(first) and {first: 1}[copied] == 1
    assert repr(first) == "DeviceRef(product_key='pk', device_name='d1')"

"""MQTT 3.1.1 topic filters (§4.7), pure: whether a filter is valid, whether it matches a topic name, and
whether one filter covers another. The broker's subscription index (broker.topic_index), its SUBSCRIBE
handling, the device ACL (plugins.device_auth.acl) and the OTA topics all use these; nothing else spells
the rules.

- MQTT-4.7.1-2: `#` is a whole level and the last one; it matches its parent level and everything below.
- MQTT-4.7.1-3: `+` is a whole level; it matches exactly one level (an empty one too).
- MQTT-4.7.2-1: a filter whose first level is `+` or `#` does not match a topic starting with `$`.
- MQTT-4.7.3-1, MQTT-4.7.3-2: a filter is not empty and holds no U+0000.
"""

from __future__ import annotations


class InvalidTopicFilter(ValueError):
    """A topic filter that MQTT 3.1.1 forbids; `reason` cites the statement it breaks."""

    def __init__(self, topic_filter: str, reason: str) -> None:
        super().__init__(f"invalid topic filter {topic_filter!r}: {reason}")
        self.topic_filter = topic_filter
        self.reason = reason


def filter_problem(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid MQTT 3.1.1 topic filter, or None when it is."""
    if not topic_filter:
        return "a topic filter is at least one character long [MQTT-4.7.3-1]"
    if "\0" in topic_filter:
        return "a topic filter holds no U+0000 [MQTT-4.7.3-2]"
    if "+" not in topic_filter and "#" not in topic_filter:
        return None  # no wildcard: any non-empty text without U+0000 (a device's own topics)
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != last):
            return "'#' must be a whole level and the last one [MQTT-4.7.1-2]"
        if "+" in level and level != "+":
            return "'+' must be a whole level [MQTT-4.7.1-3]"
    return None


def is_valid_filter(topic_filter: str) -> bool:
    """Whether `topic_filter` may be subscribed to (MQTT-4.7.1-2, MQTT-4.7.1-3, MQTT-4.7.3-1, -2)."""
    return filter_problem(topic_filter) is None


def has_wildcard(topic_filter: str) -> bool:
    """Whether the filter holds `+` or `#`, i.e. can match more than the topic spelled like it."""
    return "+" in topic_filter or "#" in topic_filter


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Whether the valid `topic_filter` matches the topic name `topic`."""
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False  # MQTT-4.7.2-1
    if not has_wildcard(topic_filter):
        return topic_filter == topic
    topic_levels = topic.split("/")
    filter_levels = topic_filter.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # everything below, and the parent level itself
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def filter_covers(pattern: str, topic_filter: str) -> bool:
    """Whether every topic `topic_filter` can match is also matched by `pattern` (both valid filters)."""
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

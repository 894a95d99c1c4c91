"""The subscription index: MQTT 3.1.1 section 4.7 matching, bookkeeping, and agreement with amqtt's scan."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from amqtt.broker import Broker
from amqtt.session import Session
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.topic_index import Subscription, TopicIndex, matching_retained
from plugins.device_auth.gate import AccountConfig, DeviceAuthConfig, config_problem
from plugins.mqtt_topics import InvalidTopicFilter, filter_matches, is_valid_filter

_AMQTT = SimpleNamespace(logger=logging.getLogger(__name__))  # Broker._matches only reads self.logger


def amqtt_matches(topic_filter: str, topic: str) -> bool:
    """amqtt 0.12.1's own matcher, the one its broker calls once per filter per PUBLISH."""
    return bool(Broker._matches(_AMQTT, topic, topic_filter))


def granted(subscriptions: list[Subscription[str]]) -> dict[str, int]:
    """A match result as subscriber -> QoS, checking that no subscriber appears twice."""
    result = {subscription.subscriber: subscription.qos for subscription in subscriptions}
    assert len(result) == len(subscriptions), f"a subscriber appears twice in {subscriptions}"
    return result


def matches_via_index(topic_filter: str, topic: str) -> bool:
    """Whether an index holding only ``topic_filter`` delivers a message published on ``topic``."""
    index = TopicIndex[str]()
    index.add(topic_filter, "client", 0)
    return bool(index.match(topic))


# MQTT 3.1.1 section 4.7, the examples as written in the spec (non-normative text), plus the
# empty-level and leading-slash cases of section 4.7.3.
SPEC_EXAMPLES = [
    # 4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis/player1", True),
    ("#", "/", True),
    ("sport/tennis/#", "sport/tennis", True),
    ("sport/tennis/#", "sport/tennisplayer", False),
    # 4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("/finance", "/finance", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    # 4.7.3 topic semantics: exact strings, empty levels count
    ("ACCOUNTS", "Accounts", False),
    ("Accounts payable", "Accounts payable", True),
    ("/finance", "finance", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/+/b", "a/b", False),
    ("+/a", "/a", True),
    ("a/+", "a/", True),
    ("a/#", "a/", True),
    ("a/", "a", False),
]

# MQTT 3.1.1 section 4.7.2, topics beginning with "$".
DOLLAR_EXAMPLES = [
    ("#", "$SYS/monitor/Clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("+", "$SYS", False),
    ("+/#", "$SYS", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("a/+", "a/$SYS", True),  # the rule is about the first level only
    ("a/#", "a/$SYS", True),
    ("/#", "/$SYS", True),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), SPEC_EXAMPLES)
def test_spec_wildcard_examples(topic_filter: str, topic: str, expected: bool) -> None:
    """MQTT-4.7.1-2, MQTT-4.7.1-3: the section 4.7 examples hold for the index, filter_matches and amqtt."""
    assert matches_via_index(topic_filter, topic) is expected
    assert filter_matches(topic_filter, topic) is expected
    assert amqtt_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), DOLLAR_EXAMPLES)
def test_dollar_topics_are_hidden_from_leading_wildcards(
    topic_filter: str, topic: str, expected: bool
) -> None:
    """MQTT-4.7.2-1: a filter starting with + or # does not match a topic starting with $."""
    assert matches_via_index(topic_filter, topic) is expected
    assert filter_matches(topic_filter, topic) is expected
    assert amqtt_matches(topic_filter, topic) is expected


def test_both_hash_and_dollar_sys_hash_are_needed_for_everything() -> None:
    """MQTT-4.7.2-1: "#" and "$SYS/#" together receive both ordinary and $SYS messages."""
    index = TopicIndex[str]()
    index.add("#", "all", 0)
    index.add("$SYS/#", "all", 1)
    assert granted(index.match("$SYS/broker/uptime")) == {"all": 1}
    assert granted(index.match("sensors/1")) == {"all": 0}


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "sport/tennis/#", "+", "+/tennis/#", "sport/+/player1", "/", "//", "$SYS/#", "a/+/+/#"],
)
def test_spec_valid_filters_are_accepted(topic_filter: str) -> None:
    """MQTT-4.7.1-2, MQTT-4.7.1-3: the filters the spec calls valid can be subscribed to."""
    index = TopicIndex[str]()
    assert is_valid_filter(topic_filter)
    assert index.add(topic_filter, "client", 1)
    assert topic_filter in index


@pytest.mark.parametrize(
    ("topic_filter", "statement"),
    [
        ("sport/tennis#", "MQTT-4.7.1-2"),
        ("sport/tennis/#/ranking", "MQTT-4.7.1-2"),
        ("##", "MQTT-4.7.1-2"),
        ("#/", "MQTT-4.7.1-2"),
        ("sport+", "MQTT-4.7.1-3"),
        ("+/++", "MQTT-4.7.1-3"),
        ("", "MQTT-4.7.3-1"),
        ("a/\0", "MQTT-4.7.3-2"),
    ],
)
def test_invalid_filters_are_refused_and_change_nothing(topic_filter: str, statement: str) -> None:
    """MQTT-4.7.1-2, MQTT-4.7.1-3, MQTT-4.7.3-1/-2: a forbidden filter raises, citing the statement."""
    index = TopicIndex[str]()
    assert not is_valid_filter(topic_filter)
    with pytest.raises(InvalidTopicFilter, match=statement) as raised:
        index.add(topic_filter, "client", 0)
    assert raised.value.topic_filter == topic_filter
    assert len(index) == 0 and index.node_count == 0 and index.filters_of("client") == frozenset()


def test_a_qos_outside_zero_to_two_is_refused() -> None:
    """A granted QoS is 0, 1 or 2; anything else (such as amqtt's 0x80 failure code) raises."""
    index = TopicIndex[str]()
    with pytest.raises(ValueError, match="QoS"):
        index.add("a", "client", 0x80)
    assert len(index) == 0


def test_overlapping_filters_deliver_once_at_the_highest_qos() -> None:
    """MQTT-3.3.5-1: a subscriber matched by several filters appears once, with the maximum granted QoS."""
    index = TopicIndex[str]()
    index.add("a/b", "one", 0)
    index.add("a/+", "one", 2)
    index.add("#", "one", 1)
    index.add("a/#", "two", 1)
    index.add("+/b", "two", 0)
    assert granted(index.match("a/b")) == {"one": 2, "two": 1}
    assert granted(index.match("a/c")) == {"one": 2, "two": 1}
    assert granted(index.match("x/b")) == {"one": 1, "two": 0}
    assert granted(index.match("$SYS/b")) == {}


def test_resubscribing_replaces_the_qos() -> None:
    """MQTT-3.8.4-3: subscribing again to the same filter replaces the QoS, up or down, without a duplicate."""
    index = TopicIndex[str]()
    assert index.add("a/+", "client", 0) is True
    assert index.add("a/+", "client", 2) is False
    assert index["a/+"] == [("client", 2)]
    assert granted(index.match("a/b")) == {"client": 2}
    assert index.add("a/+", "client", 1) is False
    assert granted(index.match("a/b")) == {"client": 1}
    assert len(index) == 1


def test_remove_takes_one_subscription_and_reports_whether_it_existed() -> None:
    """Unsubscribing drops exactly that filter for that subscriber; unknown pairs answer False."""
    index = TopicIndex[str]()
    index.add("a/+", "one", 1)
    index.add("a/+", "two", 1)
    index.add("a/b", "one", 1)
    assert index.remove("a/+", "one") is True
    assert index.remove("a/+", "one") is False
    assert index.remove("a/#", "two") is False
    assert index.remove("never", "nobody") is False
    assert granted(index.match("a/b")) == {"one": 1, "two": 1}
    assert granted(index.match("a/c")) == {"two": 1}
    assert index.filters_of("one") == {"a/b"}


def test_remove_all_drops_only_that_subscribers_filters() -> None:
    """Clearing a session removes its filters (returned sorted) and leaves other subscribers' alone."""
    index = TopicIndex[str]()
    for topic_filter in ("a/b", "a/+", "#", "$SYS/#"):
        index.add(topic_filter, "leaving", 1)
    index.add("a/+", "staying", 0)
    assert index.remove_all("leaving") == ["#", "$SYS/#", "a/+", "a/b"]
    assert index.remove_all("leaving") == []
    assert index.filters_of("leaving") == frozenset()
    assert list(index) == ["a/+"]
    assert granted(index.match("a/b")) == {"staying": 0}


def test_removing_everything_prunes_the_trie_to_nothing() -> None:
    """Empty trie nodes are pruned on removal, so churn does not grow memory; shared prefixes survive."""
    index = TopicIndex[str]()
    wildcard_filters = ["a/+/c/#", "a/+/d", "a/b/+", "+/+/+", "#", "/+//#", "$SYS/+/x"]
    for number, topic_filter in enumerate(wildcard_filters):
        index.add(topic_filter, f"client{number}", 1)
    index.add("a/b/c", "exact", 1)
    grown = index.node_count
    assert grown > 0
    index.remove("a/b/+", "client2")  # leaves "a" with only its "+" child
    index.remove("a/+/d", "client1")
    assert 0 < index.node_count < grown
    assert granted(index.match("a/x/c")) == {"client0": 1, "client3": 1, "client4": 1}
    for number, topic_filter in enumerate(wildcard_filters):
        index.remove(topic_filter, f"client{number}")
    assert index.node_count == 0
    assert list(index) == ["a/b/c"]


def test_exact_filters_stay_out_of_the_trie() -> None:
    """Filters without wildcards are dict entries: the trie a PUBLISH walks holds none of them."""
    index = TopicIndex[str]()
    for number in range(1000):
        index.add(f"devices/{number}/ota", f"device{number}", 1)
    assert index.node_count == 0
    assert granted(index.match("devices/7/ota")) == {"device7": 1}
    assert index.match("devices/7") == []


def test_reads_like_amqtts_subscriptions_dict() -> None:
    """The index is a read-only Mapping filter -> [(subscriber, qos)], the shape amqtt's code reads."""
    index = TopicIndex[str]()
    index.add("a/b", "one", 1)
    index.add("a/+", "one", 0)
    index.add("a/+", "two", 2)
    assert len(index) == 2
    assert set(index) == {"a/b", "a/+"}
    assert dict(index.items()) == {"a/b": [("one", 1)], "a/+": [("one", 0), ("two", 2)]}
    assert index.get("x", []) == []
    assert "a/+" in index and "x" not in index
    for session, qos in index["a/+"]:
        assert (session, qos) in {("one", 0), ("two", 2)}
    with pytest.raises(KeyError):
        index["a/#"]


def test_repr_does_not_list_the_filters() -> None:
    """amqtt logs repr(subscriptions) on every SUBSCRIBE, so the repr is a count, not a dump."""
    index = TopicIndex[str]()
    for number in range(100):
        index.add(f"t/{number}", "client", 0)
    assert repr(index) == "<TopicIndex 100 filters>"


def test_amqtt_sessions_are_indexed_by_client_id() -> None:
    """amqtt's Session is unhashable (``__eq__`` by client_id, no ``__hash__``); key=client_id indexes it."""
    with pytest.raises(TypeError, match="unhashable"):
        hash(Session())
    first, again = Session(), Session()
    first.client_id = again.client_id = "device-1"
    index = TopicIndex[Session](key=lambda session: session.client_id)
    assert index.add("a/+", first, 1) is True
    assert index.add("a/+", again, 2) is False
    [(subscriber, qos)] = index.match("a/b")
    assert subscriber is again and qos == 2
    assert index.remove_all(first) == ["a/+"]
    assert len(index) == 0


class _NoScanning(dict[str, str]):
    """A retained-message table that fails the test if anything iterates it."""

    def items(self) -> Iterator[tuple[str, str]]:  # type: ignore[override]  # a trap, not a view
        raise AssertionError("the retained messages were scanned")

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the retained messages were scanned")


def test_retained_lookup_for_an_exact_filter_is_one_dict_lookup() -> None:
    """A subscription without wildcards finds its retained message by key, without scanning the table."""
    retained = _NoScanning({"a/b": "payload", "a/c": "other"})
    assert matching_retained("a/b", retained) == [("a/b", "payload")]
    assert matching_retained("a/x", retained) == []


def test_retained_lookup_for_a_wildcard_filter_follows_the_matching_rules() -> None:
    """A wildcard subscription receives every retained message its filter matches, $ rule included."""
    retained = {"a": "1", "a/b": "2", "a/b/c": "3", "$SYS/a": "4", "b": "5"}
    assert matching_retained("a/#", retained) == [("a", "1"), ("a/b", "2"), ("a/b/c", "3")]
    assert matching_retained("+/a", retained) == []
    assert matching_retained("#", retained) == [("a", "1"), ("a/b", "2"), ("a/b/c", "3"), ("b", "5")]


async def test_amqtt_keeps_the_first_qos_on_resubscribe_and_accepts_an_empty_filter() -> None:
    """Why add() differs from amqtt 0.12.1: its add_subscription breaks MQTT-3.8.4-3 and MQTT-4.7.3-1."""

    async def allow(*_: object) -> bool:
        return True

    broker = SimpleNamespace(logger=_AMQTT.logger, config={}, _subscriptions={}, _topic_filtering=allow)
    session = Session()
    session.client_id = "device-1"
    assert await Broker.add_subscription(broker, ("a/b", 0), session) == 0
    assert await Broker.add_subscription(broker, ("a/b", 2), session) == 2  # SUBACK grants 2...
    assert broker._subscriptions["a/b"] == [(session, 0)]  # ...but QoS 0 is what it keeps
    assert await Broker.add_subscription(broker, ("", 1), session) == 1


# Property tests over a small alphabet of levels, so that topics and filters collide often.

LEVELS = ["", "$SYS", "$", "a", "b"]
SUBSCRIBERS = ["s1", "s2", "s3"]
QOS = st.sampled_from([0, 1, 2])

topics = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
filters = st.builds(
    lambda levels, multi: "/".join([*levels, "#"] if multi else levels),
    st.lists(st.sampled_from([*LEVELS, "+"]), max_size=4),
    st.booleans(),
).filter(bool)


def expected_match(subscriptions: dict[tuple[str, str], int], topic: str) -> dict[str, int]:
    """The naive model: scan every (filter, subscriber) with amqtt's matcher, keep the highest QoS."""
    result: dict[str, int] = {}
    for (topic_filter, subscriber), qos in subscriptions.items():
        if amqtt_matches(topic_filter, topic):
            result[subscriber] = max(qos, result.get(subscriber, 0))
    return result


@settings(max_examples=300, deadline=None)
@given(topic_filter=filters, topic=topics)
def test_filter_matches_agrees_with_amqtt(topic_filter: str, topic: str) -> None:
    """For valid filters and topic names, filter_matches and amqtt's _matches give the same answer."""
    assert is_valid_filter(topic_filter)
    assert filter_matches(topic_filter, topic) is amqtt_matches(topic_filter, topic)


@settings(max_examples=300, deadline=None)
@given(
    subscribed=st.lists(st.tuples(filters, st.sampled_from(SUBSCRIBERS), QOS), max_size=12),
    published=st.lists(topics, min_size=1, max_size=6),
)
def test_match_agrees_with_amqtts_linear_scan(
    subscribed: list[tuple[str, str, int]], published: list[str]
) -> None:
    """match(topic) gives the subscribers amqtt's scan over every filter finds, once each, at the max QoS."""
    index = TopicIndex[str]()
    model: dict[tuple[str, str], int] = {}
    for topic_filter, subscriber, qos in subscribed:
        index.add(topic_filter, subscriber, qos)
        model[(topic_filter, subscriber)] = qos
    for topic in published:
        assert granted(index.match(topic)) == expected_match(model, topic)


@dataclass(frozen=True)
class Add:
    topic_filter: str
    subscriber: str
    qos: int


@dataclass(frozen=True)
class Remove:
    topic_filter: str
    subscriber: str


@dataclass(frozen=True)
class RemoveAll:
    subscriber: str


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_add_and_remove_sequences_agree_with_a_naive_model(data: st.DataObject) -> None:
    """After any add/remove/remove_all sequence, answers and bookkeeping equal a dict of (filter, subscriber)."""
    pool = data.draw(st.lists(filters, min_size=1, max_size=6, unique=True), label="filters")
    probes = data.draw(st.lists(topics, min_size=1, max_size=5), label="topics")
    chosen_filter, chosen_subscriber = st.sampled_from(pool), st.sampled_from(SUBSCRIBERS)
    operations = st.one_of(
        st.builds(Add, chosen_filter, chosen_subscriber, QOS),
        st.builds(Remove, chosen_filter, chosen_subscriber),
        st.builds(RemoveAll, chosen_subscriber),
    )
    index = TopicIndex[str]()
    model: dict[tuple[str, str], int] = {}
    for operation in data.draw(st.lists(operations, max_size=30), label="operations"):
        match operation:
            case Add(topic_filter, subscriber, qos):
                assert index.add(topic_filter, subscriber, qos) is ((topic_filter, subscriber) not in model)
                model[(topic_filter, subscriber)] = qos
            case Remove(topic_filter, subscriber):
                assert index.remove(topic_filter, subscriber) is ((topic_filter, subscriber) in model)
                model.pop((topic_filter, subscriber), None)
            case RemoveAll(subscriber):
                mine = sorted(topic_filter for topic_filter, owner in model if owner == subscriber)
                assert index.remove_all(subscriber) == mine
                for topic_filter in mine:
                    del model[(topic_filter, subscriber)]
        assert set(index) == {topic_filter for topic_filter, _ in model}
        assert len(index) == len(set(index))
        for subscriber in SUBSCRIBERS:
            assert index.filters_of(subscriber) == {f for f, owner in model if owner == subscriber}
        for topic in probes:
            assert granted(index.match(topic)) == expected_match(model, topic)
        rebuilt = TopicIndex[str]()
        for topic_filter, subscriber in model:
            rebuilt.add(topic_filter, subscriber, 0)
        assert index.node_count == rebuilt.node_count, "a removal left nodes that lead nowhere"
    for subscriber in SUBSCRIBERS:
        index.remove_all(subscriber)
    assert len(index) == 0 and index.node_count == 0


@settings(max_examples=300, deadline=None)
@given(topic_filter=st.text(alphabet=["a", "/", "+", "#", "$", "\0"], max_size=8))
def test_every_filter_check_is_the_same_rule(topic_filter: str) -> None:
    """The index and an account's configured patterns accept exactly the filters is_valid_filter accepts
    (one rule, plugins.mqtt_topics, for SUBSCRIBE, the index and the configuration)."""
    valid = is_valid_filter(topic_filter)
    index: TopicIndex[str] = TopicIndex()
    try:
        index.add(topic_filter, "client", 0)
        indexed = True
    except InvalidTopicFilter:
        indexed = False
    account = AccountConfig("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", subscribe=[topic_filter])
    configured = config_problem(DeviceAuthConfig(accounts={"app": account})) is None
    assert indexed is valid and configured is valid

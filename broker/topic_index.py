"""Who receives a PUBLISH: an MQTT 3.1.1 subscription index that does not scan every filter.

amqtt 0.12.1 keeps ``dict[filter, list[(session, qos)]]`` and tests every filter against every published
topic (``Broker._run_broadcast`` calling ``Broker._matches``). ``TopicIndex`` answers the same question
from two structures:

- filters without wildcards in a dict keyed by the filter: one lookup per published topic;
- filters with ``+`` or ``#`` in a trie of levels (the filter split on ``/``). A node has a dict of
  literal children, one ``+`` child, the subscribers of the filter that ends at the node, and the
  subscribers of the filter that ends with ``#`` just below it (``#`` is always the last level, so its
  node would be a leaf: it is kept on its parent as the dict ``multi``).

``match(topic)`` looks the topic up in the dict and walks the trie level by level, following only the
literal child named like the level and the ``+`` child. Its cost depends on the topic's length and on the
wildcard filters that share a prefix with the topic, not on how many filters the broker holds. A reverse
map from subscriber to filters makes ``remove_all`` cost the subscriber's own filters; trie nodes left
empty by a removal are pruned, so memory follows the live subscriptions, not the churn.

Subscribers are told apart by ``key(subscriber)``, the subscriber itself by default. amqtt's ``Session``
defines ``__eq__`` by ``client_id`` and no ``__hash__``, so it is unhashable: index sessions with
``TopicIndex(key=lambda session: session.client_id)``, the identity amqtt itself uses.

The index is also a read-only ``Mapping[str, list[Subscription]]`` (filter to its subscribers), the shape
of amqtt's ``Broker._subscriptions``, so code reading ``.items()`` or ``.get(filter, [])`` keeps working;
its ``repr`` is O(1) because amqtt formats it on every SUBSCRIBE.

MQTT 3.1.1 statements the index implements (the filter rules themselves, valid and matches, are
plugins.mqtt_topics, shared with the broker's SUBSCRIBE handling and the device ACL):

- MQTT-4.7.1-2: ``#`` is a whole level and the last one; it matches its parent level too (``a/#``
  matches ``a``).
- MQTT-4.7.1-3: ``+`` is a whole level and matches exactly one level, empty ones included (``a/+``
  matches ``a/``).
- MQTT-4.7.2-1: a filter whose first level is ``+`` or ``#`` does not match a topic starting with ``$``.
- MQTT-4.7.3-1, MQTT-4.7.3-2: a filter is not empty and holds no U+0000.
- MQTT-4.7.3-4: no normalisation: levels compare as exact strings; empty levels are levels (``a//b``
  has three, ``/a`` starts with an empty one).
- MQTT-3.8.4-3: subscribing again to the same filter replaces the subscription and its QoS.
- MQTT-3.3.5-1: overlapping matching filters give one delivery per subscriber, at the maximum QoS
  granted among them (the broker then sends at the minimum of that and the PUBLISH's QoS).

``plugins.mqtt_topics.filter_matches`` is the one-pair form of the same rules, and ``matching_retained``
finds the retained messages a new subscription must receive: a dict lookup for a filter without
wildcards, a scan only for a wildcard filter (once per SUBSCRIBE, never per PUBLISH).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from itertools import chain
from typing import Generic, NamedTuple, TypeVar

from plugins.mqtt_topics import InvalidTopicFilter, filter_matches, filter_problem, has_wildcard

S = TypeVar("S")
V = TypeVar("V")

QOS_LEVELS = (0, 1, 2)


class Subscription(NamedTuple, Generic[S]):
    """One subscriber of a filter and the QoS granted to it; unpacks as ``(subscriber, qos)`` like amqtt's."""

    subscriber: S
    qos: int


def matching_retained(topic_filter: str, retained: Mapping[str, V]) -> list[tuple[str, V]]:
    """The ``(topic, message)`` pairs of ``retained`` (keyed by topic name) that a new subscription receives.

    A filter without wildcards is one dict lookup; a wildcard filter scans the retained topics.
    """
    if not has_wildcard(topic_filter):
        return [(topic_filter, retained[topic_filter])] if topic_filter in retained else []
    return [(topic, message) for topic, message in retained.items() if filter_matches(topic_filter, topic)]


class _Node(Generic[S]):
    """A trie level: where the wildcard filters sharing this prefix go next, and who ends here."""

    __slots__ = ("children", "multi", "plus", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = {}
        self.plus: _Node[S] | None = None
        self.subscribers: dict[Hashable, Subscription[S]] = {}  # of the filter ending at this node
        self.multi: dict[Hashable, Subscription[S]] = {}  # of this node's filter followed by "/#"

    def is_empty(self) -> bool:
        return not (self.children or self.plus is not None or self.subscribers or self.multi)

    def child(self, level: str) -> _Node[S] | None:
        return self.plus if level == "+" else self.children.get(level)


def _identity(subscriber: S) -> Hashable:
    return subscriber


def _as_set(filters: str | set[str] | None) -> set[str] | frozenset[str]:
    """A subscriber's filters as a set, however they are kept."""
    if filters is None:
        return frozenset()
    return {filters} if isinstance(filters, str) else filters


def _merge(found: dict[Hashable, Subscription[S]], subscribers: dict[Hashable, Subscription[S]]) -> None:
    """Add ``subscribers`` to ``found``, keeping each subscriber's highest QoS (MQTT-3.3.5-1)."""
    for key, subscription in subscribers.items():
        previous = found.get(key)
        if previous is None or subscription.qos > previous.qos:
            found[key] = subscription


class TopicIndex(Mapping[str, list[Subscription[S]]]):
    """Subscriptions by filter, answering ``match(topic)`` without looking at filters that cannot match.

    As a ``Mapping`` it is read-only: filter to a fresh list of its ``Subscription``s. Change it only
    through ``add``, ``remove`` and ``remove_all``.
    """

    def __init__(self, key: Callable[[S], Hashable] = _identity) -> None:
        self._key = key
        self._exact: dict[str, dict[Hashable, Subscription[S]]] = {}
        # A wildcard filter to the dict of its subscribers held by its trie node (``subscribers`` or
        # ``multi``), so re-subscribing and reading the mapping need no walk.
        self._wildcard: dict[str, dict[Hashable, Subscription[S]]] = {}
        self._root: _Node[S] = _Node()
        # A subscriber's filters: one filter as itself (nearly every device has one: a set is 216 bytes),
        # more as a set.
        self._filters_by_key: dict[Hashable, str | set[str]] = {}

    def add(self, topic_filter: str, subscriber: S, qos: int) -> bool:
        """Subscribe; True if new, False if it replaced the subscriber's QoS on that filter (MQTT-3.8.4-3).

        Raises ``InvalidTopicFilter`` for a filter MQTT forbids and ``ValueError`` for a QoS not 0, 1 or 2.
        """
        problem = filter_problem(topic_filter)
        if problem is not None:
            raise InvalidTopicFilter(topic_filter, problem)
        if qos not in QOS_LEVELS:
            raise ValueError(f"a granted QoS is 0, 1 or 2, not {qos!r}")
        key = self._key(subscriber)
        subscribers = self._subscribers(topic_filter)
        if subscribers is None:
            subscribers = self._create(topic_filter)
        is_new = key not in subscribers
        subscribers[key] = Subscription(subscriber, qos)
        filters = self._filters_by_key.get(key)
        if filters is None:
            self._filters_by_key[key] = topic_filter
        elif isinstance(filters, str):
            if filters != topic_filter:
                self._filters_by_key[key] = {filters, topic_filter}
        else:
            filters.add(topic_filter)
        return is_new

    def remove(self, topic_filter: str, subscriber: S) -> bool:
        """Unsubscribe; False if the subscriber was not subscribed to exactly that filter."""
        key = self._key(subscriber)
        filters = self._filters_by_key.get(key)
        if isinstance(filters, str):
            if filters != topic_filter:
                return False
            del self._filters_by_key[key]
        else:
            if filters is None or topic_filter not in filters:
                return False
            filters.remove(topic_filter)
            if not filters:
                del self._filters_by_key[key]
        self._discard(topic_filter, key)
        return True

    def remove_all(self, subscriber: S) -> list[str]:
        """Unsubscribe from every filter; return those filters, sorted. Costs the subscriber's filters only."""
        key = self._key(subscriber)
        filters = _as_set(self._filters_by_key.pop(key, None))
        for topic_filter in filters:
            self._discard(topic_filter, key)
        return sorted(filters)

    def clear(self) -> None:
        """Forget every subscription (amqtt clears its table when the broker starts and stops)."""
        self._exact.clear()
        self._wildcard.clear()
        self._root = _Node()
        self._filters_by_key.clear()

    def filters_of(self, subscriber: S) -> frozenset[str]:
        """The filters the subscriber is subscribed to."""
        return frozenset(_as_set(self._filters_by_key.get(self._key(subscriber))))

    def match(self, topic: str) -> list[Subscription[S]]:
        """The subscribers to deliver a message published on ``topic`` to: each once, at its highest granted QoS."""
        found: dict[Hashable, Subscription[S]] = {}
        exact = self._exact.get(topic)
        if exact is not None:
            found.update(exact)
        if self._wildcard:
            self._match_wildcards(topic, found)
        return list(found.values())

    @property
    def node_count(self) -> int:
        """Trie nodes below the root: zero when no wildcard filter is left. Walks the trie; for tests and metrics."""
        count = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            below = [*node.children.values(), *([node.plus] if node.plus is not None else [])]
            count += len(below)
            stack.extend(below)
        return count

    def __getitem__(self, topic_filter: str) -> list[Subscription[S]]:
        subscribers = self._subscribers(topic_filter)
        if subscribers is None:
            raise KeyError(topic_filter)
        return list(subscribers.values())

    def __contains__(self, topic_filter: object) -> bool:
        return topic_filter in self._exact or topic_filter in self._wildcard

    def __iter__(self) -> Iterator[str]:
        return chain(self._exact, self._wildcard)

    def __len__(self) -> int:
        return len(self._exact) + len(self._wildcard)

    def __repr__(self) -> str:
        return f"<TopicIndex {len(self)} filters>"

    def _subscribers(self, topic_filter: str) -> dict[Hashable, Subscription[S]] | None:
        table = self._wildcard if has_wildcard(topic_filter) else self._exact
        return table.get(topic_filter)

    def _create(self, topic_filter: str) -> dict[Hashable, Subscription[S]]:
        """Make the empty subscriber dict of a new filter, growing the trie for a wildcard filter."""
        subscribers: dict[Hashable, Subscription[S]]
        if not has_wildcard(topic_filter):
            subscribers = self._exact[topic_filter] = {}
            return subscribers
        levels = topic_filter.split("/")
        multi = levels[-1] == "#"
        if multi:
            levels.pop()
        node = self._root
        for level in levels:
            child = node.child(level)
            if child is None:
                child = _Node()
                if level == "+":
                    node.plus = child
                else:
                    node.children[level] = child
            node = child
        subscribers = self._wildcard[topic_filter] = node.multi if multi else node.subscribers
        return subscribers

    def _discard(self, topic_filter: str, key: Hashable) -> None:
        """Drop ``key`` from a filter known to hold it; drop the filter and prune the trie when it empties."""
        if not has_wildcard(topic_filter):
            subscribers = self._exact[topic_filter]
            del subscribers[key]
            if not subscribers:
                del self._exact[topic_filter]
            return
        subscribers = self._wildcard[topic_filter]
        del subscribers[key]
        if not subscribers:
            del self._wildcard[topic_filter]
            self._prune(topic_filter)

    def _prune(self, topic_filter: str) -> None:
        """Remove the nodes on the filter's path that no longer lead to any subscriber, deepest first."""
        levels = topic_filter.split("/")
        if levels[-1] == "#":
            levels.pop()
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for level in levels:
            child = node.child(level)
            assert child is not None, f"trie path of {topic_filter!r} is broken at {level!r}"
            path.append((node, level))
            node = child
        for parent, level in reversed(path):
            if not node.is_empty():
                return
            if level == "+":
                parent.plus = None
            else:
                del parent.children[level]
            node = parent

    def _match_wildcards(self, topic: str, found: dict[Hashable, Subscription[S]]) -> None:
        levels = topic.split("/")
        system = topic.startswith("$")
        nodes = [self._root]
        for depth, level in enumerate(levels):
            wildcards_apply = depth > 0 or not system  # MQTT-4.7.2-1
            following: list[_Node[S]] = []
            for node in nodes:
                if wildcards_apply:
                    if node.multi:
                        _merge(found, node.multi)
                    if node.plus is not None:
                        following.append(node.plus)
                child = node.children.get(level)
                if child is not None:
                    following.append(child)
            if not following:
                return
            nodes = following
        for node in nodes:
            _merge(found, node.subscribers)
            _merge(found, node.multi)  # "a/#" matches "a" [MQTT-4.7.1-2]

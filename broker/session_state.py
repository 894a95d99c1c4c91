"""`LeanSession`: amqtt's `Session` subclassed, with a lighter state and the broker's own per-session state
(the broker builds every session as one; amqtt's own class is left as it is).

amqtt gives every session its own `transitions.Machine` (three states, five transitions), built anew per
connection: about 40 % of the broker's CPU in a connect storm and several KB per connected client.
`SessionState` offers what amqtt and ota-broker use of it, `state`, `connect()`, `disconnect()` and
`is_connected()`, with the same rules (connecting a connected session raises `MachineError`) and the same
callbacks (`_on_enter_connected`, `_on_enter_disconnected`).

amqtt also gives every connection four `asyncio.Queue`s (about 3 KB each: three deques and an Event). The
broker's reader routes packets itself and never uses three of them (`NoQueue` stands in), and a session's
offline queue is a `LightQueue`, one deque made on first use; none of them is made and thrown away.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from amqtt.session import Session
from transitions import MachineError

if TYPE_CHECKING:
    from broker.protocol import Window


class SessionState:
    __slots__ = ("_session", "state")

    def __init__(self, session: Any) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> None:
        if self.state == "connected":
            raise MachineError(f"can't connect a session in state {self.state!r}")
        self.state = "connected"
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_new(self) -> bool:
        return self.state == "new"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


class LightQueue:
    """The part of `asyncio.Queue` amqtt and ota-broker use for a session's offline messages."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: deque[Any] | None = None

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def __iter__(self) -> Iterator[Any]:
        """The queued items, oldest first (without taking them)."""
        return iter(self._items or ())

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self) -> Any:
        return self.get_nowait()


class NoQueue:
    """Stands in for a queue the fast path never uses: always empty, refuses items."""

    __slots__ = ()

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def get_nowait(self) -> Any:
        raise asyncio.QueueEmpty

    def put_nowait(self, item: Any) -> None:
        raise RuntimeError("this connection's packets are routed by its reader, not queued")


NO_QUEUE = NoQueue()


class LeanSession(Session):  # type: ignore[misc]
    """A session of `HardenedBroker`: amqtt's fields, the light state and queues, and the broker's own."""

    # The broker's own fields in slots: amqtt's Session keeps 29 attributes in its __dict__, and past thirty
    # keys CPython stops sharing an instance dict's keys among instances (296 bytes a session became 1,584).
    __slots__ = ("authenticated_since", "waiting", "window")

    def __init__(self) -> None:
        # amqtt's attributes, set here rather than by amqtt's __init__ (it made two Queues per connection,
        # replaced at once): the same names and starting values, but plain dicts for the in-flight tables
        # (ordered too, half the size of an OrderedDict) and the light queues. tests/broker/
        # test_amqtt_internals.py checks that every attribute amqtt's Session has, this one has too.
        # (mypy sees only the slots of this class.)
        self._init_states()
        self.remote_address: Any = None  # type: ignore[misc]
        self.remote_port: Any = None  # type: ignore[misc]
        self.client_id: Any = None  # type: ignore[misc]
        self.clean_session: Any = None  # type: ignore[misc]
        self.will_flag: Any = False  # type: ignore[misc]
        self.will_message: Any = None  # type: ignore[misc]
        self.will_qos: Any = None  # type: ignore[misc]
        self.will_retain: Any = None  # type: ignore[misc]
        self.will_topic: Any = None  # type: ignore[misc]
        self.keep_alive: Any = 0  # type: ignore[misc]
        self.publish_retry_delay: Any = 0  # type: ignore[misc]
        self.broker_uri: Any = None  # type: ignore[misc]
        self.username: Any = None  # type: ignore[misc]
        self.password: Any = None  # type: ignore[misc]
        self.cafile: Any = None  # type: ignore[misc]
        self.capath: Any = None  # type: ignore[misc]
        self.cadata: Any = None  # type: ignore[misc]
        self._packet_id: Any = 0  # type: ignore[misc]
        self.parent: Any = 0  # type: ignore[misc]
        self.last_connect_time: Any = None  # type: ignore[misc]
        self.ssl_object: Any = None  # type: ignore[misc]
        self.last_disconnect_time: Any = None  # type: ignore[misc]
        self.attributes: dict[str, Any] = {}  # type: ignore[misc]  # plugins' own, namespaced keys
        self.inflight_out: dict[int, Any] = {}  # type: ignore[misc]  # packet id -> outgoing message, oldest first
        self.inflight_in: dict[int, Any] = {}  # type: ignore[misc]  # packet id -> incoming QoS 2 message not released yet
        self.retained_messages: Any = LightQueue()  # type: ignore[misc]  # messages queued while offline
        self.delivered_message_queue: Any = NO_QUEUE  # type: ignore[misc]  # the reader routes what is published
        self.is_anonymous: Any = False  # type: ignore[misc]
        # Loop time from which this login's credentials were read (for plugins: credentials changed while
        # the client logged in); None until it authenticated.
        self.authenticated_since: float | None = None
        self.window: Window | None = None  # outgoing QoS 1/2 in flight, made on first use
        self.waiting = 0  # outgoing QoS 1/2 messages waiting for a place in the window

    def _init_states(self) -> None:
        self.transitions: Any = SessionState(self)  # type: ignore[misc]  # amqtt's attribute

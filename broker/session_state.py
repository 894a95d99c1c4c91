"""Lighter per-connection state for amqtt's `Session` and protocol handler.

amqtt gives every session its own `transitions.Machine` (three states, five transitions), built anew per
connection: about 40 % of the broker's CPU in a connect storm and several KB per connected client. This
class offers what amqtt and ota-broker use of it, `state`, `connect()`, `disconnect()` and
`is_connected()`, with the same rules (connecting a connected session raises `MachineError`) and the same
callbacks (`_on_enter_connected`, `_on_enter_disconnected`).

amqtt also gives every connection four `asyncio.Queue`s (about 3 KB each: three deques and an Event). The
broker's fast path routes in the reader and never uses three of them (`NoQueue` stands in), and a session's
offline queue is a `LightQueue`, one deque made on first use.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from amqtt.session import Session
from transitions import MachineError


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


def lighten(session: Any, handler: Any) -> None:
    """Drop the queues a fast-path connection never uses (amqtt's queue path is off for it)."""
    session.delivered_message_queue = NO_QUEUE
    handler._pending_subscriptions = NO_QUEUE
    handler._pending_unsubscriptions = NO_QUEUE


_original_init = Session.__init__


def _session_init(self: Any) -> None:
    _original_init(self)
    self.retained_messages = LightQueue()


def _init_states(self: Any) -> None:
    self.transitions = SessionState(self)


def install() -> None:
    """Give every `Session` created from now on the light state machine and offline queue (idempotent)."""
    Session._init_states = _init_states
    Session.__init__ = _session_init

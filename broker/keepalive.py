"""`KeepAliveWheel`: the keep-alive deadlines of every connection of a broker, under one timer.

Each connection has a keep-alive deadline that moves every time its client is heard (MQTT-3.1.2-24). One
asyncio timer per connection costs a `TimerHandle` (about 250 bytes with the copy of the context it holds)
and a push onto the event loop's heap, whose order asyncio keeps with a Python comparison per step. Here a
deadline is an entry in a slot of `RESOLUTION_S` seconds: arming, moving and dropping one are dict
operations, and one timer, at the earliest slot, serves them all. A connection is looked at no earlier
than its deadline and at most `RESOLUTION_S` after it (what it then decides is `StrictHandler`'s:
`_keep_alive_due`).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Protocol

RESOLUTION_S = 0.25  # a slot's width: how late after its deadline a connection may be looked at


class Watched(Protocol):
    def _keep_alive_due(self, due: float) -> None: ...  # its slot's time came; it may arm again


class KeepAliveWheel:
    __slots__ = ("_loop", "_order", "_slots", "_timer", "_timer_slot")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, dict[Watched, None]] = {}  # slot number -> connections due in it
        self._order: list[int] = []  # the slot numbers, a heap (a slot emptied early stays until its turn)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = 0

    def __len__(self) -> int:
        """Connections armed."""
        return sum(len(due) for due in self._slots.values())

    def arm(self, connection: Watched, due: float) -> int:
        """Look at `connection` once `due` (loop time) has passed; the slot to give `disarm`."""
        slot = math.ceil(due / RESOLUTION_S)
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._slots[slot] = {}
            heapq.heappush(self._order, slot)
            if self._timer is None or slot < self._timer_slot:
                self._schedule(slot)
        entries[connection] = None
        return slot

    def disarm(self, connection: Watched, slot: int) -> None:
        entries = self._slots.get(slot)
        if entries is not None:
            entries.pop(connection, None)
            if not entries:
                del self._slots[slot]

    def close(self) -> None:
        """Forget every deadline (the broker stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._slots.clear()
        self._order.clear()

    def _schedule(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._loop.call_at(slot * RESOLUTION_S, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._loop.time()
        order = self._order
        while order and order[0] * RESOLUTION_S <= now:
            slot = heapq.heappop(order)
            entries = self._slots.pop(slot, None)
            for connection in entries or ():
                # the slot's time, not the deadline: lateness past it is the loop's (busy), not the wheel's
                connection._keep_alive_due(slot * RESOLUTION_S)
        while order and order[0] not in self._slots:
            heapq.heappop(order)  # emptied before its turn
        if order:
            self._schedule(order[0])

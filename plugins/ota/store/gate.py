"""Shared and exclusive turns on one database connection.

The SQLite repository works through one aiosqlite connection: one thread runs its statements in the order
they are queued. A single statement (a query fetched whole, an autocommit write) cannot be torn by another,
so many may be queued at once and the thread runs them back to back; a transaction (BEGIN ... COMMIT over
several awaits) must have the connection alone, or another coroutine's statement would land inside it.

A plain lock around every statement made each one wait for the event loop to take the previous one's
result: under load (thousands of devices connecting, a busy loop) the database then served a few hundred
statements a second and queries waited seconds. `Gate` lets single statements share the connection and
gives a transaction its turn alone: a transaction waits for the statements under way to finish, and
statements that arrive while a transaction waits go after it (no transaction waits forever); when the
transaction ends, every statement waiting goes at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class Gate:
    """Shared turns (`shared()`) for single statements, exclusive turns (`exclusive()`) for transactions."""

    def __init__(self) -> None:
        self._shared = 0  # shared turns under way
        self._exclusive = False  # an exclusive turn under way
        self._shared_waiting: list[asyncio.Future[None]] = []
        self._exclusive_waiting: deque[asyncio.Future[None]] = deque()

    @property
    def busy(self) -> bool:
        return self._exclusive or self._shared > 0

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        if self._exclusive or self._exclusive_waiting:
            await self._wait(self._shared_waiting, self._release_shared)
        else:
            self._shared += 1
        try:
            yield
        finally:
            self._release_shared()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        if self.busy or self._exclusive_waiting:
            await self._wait(self._exclusive_waiting, self._release_exclusive)
        else:
            self._exclusive = True
        try:
            yield
        finally:
            self._release_exclusive()

    async def _wait(
        self, queue: list[asyncio.Future[None]] | deque[asyncio.Future[None]], release: Callable[[], None]
    ) -> None:
        """Wait in `queue` until granted (the granter counts the turn); a waiter cancelled after its grant
        gives the turn back, one cancelled before leaves the queue (and lets those it held back go)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                release()  # granted, then cancelled before it could use the turn
            else:
                if future in queue:
                    queue.remove(future)
                self._wake()
            raise

    def _release_shared(self) -> None:
        self._shared -= 1
        self._wake()

    def _wake(self) -> None:
        """Grant what may go now: a waiting transaction once no statement is under way, else the waiting
        statements when no transaction is under way or waiting."""
        if self._exclusive or (self._shared == 0 and self._grant_next_exclusive()):
            return
        if not self._exclusive_waiting:
            self._grant_shared()

    def _release_exclusive(self) -> None:
        self._exclusive = False
        self._grant_shared() or self._grant_next_exclusive()

    def _grant_shared(self) -> bool:
        """Every statement waiting goes at once; False when none was waiting."""
        waiting, self._shared_waiting = self._shared_waiting, []
        granted = False
        for future in waiting:
            if not future.done():
                self._shared += 1
                future.set_result(None)
                granted = True
        return granted

    def _grant_next_exclusive(self) -> bool:
        while self._exclusive_waiting:
            future = self._exclusive_waiting.popleft()
            if not future.done():
                self._exclusive = True
                future.set_result(None)
                return True
        return False

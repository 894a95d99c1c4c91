"""Group commit for the database work of many devices at once.

Ten thousand devices connecting within seconds each need the same two or three statements (is it
registered, record it online, its unfinished tasks). Asked one by one, each costs a round trip to the
database (a thread hop with SQLite, a network one with PostgreSQL) and most of the broker's CPU for a
connection. A `Batcher` runs the work of everything asked while its previous run was in flight as one
call: one device alone waits for one run, a burst shares a few.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


class Batcher(Generic[I, R]):
    """`await submit(item)` answers `run([..., item, ...])[its index]`, `run` taking the items submitted
    while its previous call ran (at most `most` at a time), in the order they came. A failing `run` fails
    every submitter of its batch with the same exception; a submitter cancelled before its batch ran is left
    out of it."""

    def __init__(self, run: Callable[[list[I]], Awaitable[Sequence[R]]], *, most: int = 500) -> None:
        self._run = run
        self._most = most
        self._waiting: list[tuple[I, asyncio.Future[R]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: I) -> R:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, done))
        if self._worker is None:
            self._worker = loop.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        batch: list[tuple[I, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch = [(item, done) for item, done in self._waiting[: self._most] if not done.done()]
                del self._waiting[: self._most]
                if not batch:
                    continue
                try:
                    results = await self._run([item for item, _ in batch])
                    if len(results) != len(batch):
                        raise RuntimeError(f"a batch of {len(batch)} answered {len(results)} results")
                except Exception as e:
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(e)
                    continue
                for (_, done), result in zip(batch, results, strict=True):
                    if not done.done():
                        done.set_result(result)
        finally:
            self._worker = None
            # cancelled (the service stopping): nobody is left waiting for ever
            for _, done in (*batch, *self._waiting):
                done.cancel()
            self._waiting.clear()

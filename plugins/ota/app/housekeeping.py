"""What every part of the app layer shares: per-device locks, background work and rejection counts."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from plugins.ota.core.topics import DeviceRef

log = logging.getLogger("ota.service")


def about(device: DeviceRef | str) -> dict[str, str]:
    """The `extra` of a log record about a device: structured logs carry it as the `device` field."""
    return {"device": str(device)} if isinstance(device, DeviceRef) else {}


class DeviceLocks:
    """Handlers for one device run one at a time (amqtt runs plugin events as tasks nobody awaits, so
    they would otherwise interleave); a lock lives only while someone holds or waits for it.

    `async with locks.hold(device):` runs on every device's connection and disconnection, so `hold` is a
    plain object rather than a generator-based context manager."""

    def __init__(self) -> None:
        self._locks: dict[DeviceRef, _DeviceLock] = {}

    def hold(self, device: DeviceRef) -> _Holding:
        return _Holding(self._locks, device)


class _DeviceLock(asyncio.Lock):
    __slots__ = ("users",)

    def __init__(self) -> None:
        super().__init__()
        self.users = 0  # holding it or waiting for it


class _Holding:
    __slots__ = ("_device", "_lock", "_locks")

    def __init__(self, locks: dict[DeviceRef, _DeviceLock], device: DeviceRef) -> None:
        self._locks, self._device = locks, device

    async def __aenter__(self) -> None:
        lock = self._locks.get(self._device)
        if lock is None:
            lock = self._locks[self._device] = _DeviceLock()
        lock.users += 1
        self._lock = lock
        try:
            await self._lock.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *_: object) -> None:
        self._lock.release()
        self._leave()

    def _leave(self) -> None:
        lock = self._lock
        lock.users -= 1
        if not lock.users and self._locks.get(self._device) is lock:
            del self._locks[self._device]


class Background:
    """Work run in the background (a job's first step, notices being dispatched); failures are logged."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        """Run `coro` in the background; its failure is logged, and `drain()` waits for it."""

        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("%s failed", what)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for background work (notices being dispatched, handlers in flight)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Rejections:
    """Inputs refused, counted by kind (for metrics) and logged with the device and the reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def reject(self, device: DeviceRef | str, kind: str, reason: str) -> None:
        """Count and log one rejected input; `device` is a client id when no device could be named."""
        self.counts[kind] += 1
        log.warning("rejected from %s: %s: %s", device, kind, reason, extra=about(device))

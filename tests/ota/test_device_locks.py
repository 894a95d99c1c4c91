"""`DeviceLocks`: one handler per device at a time, other devices not held up, and no lock left behind
once nobody holds or waits for it, cancelled waiters included."""

from __future__ import annotations

import asyncio

import pytest

from plugins.ota.app.housekeeping import DeviceLocks
from plugins.ota.core.topics import DeviceRef

A, B = DeviceRef("pk", "a"), DeviceRef("pk", "b")


async def test_handlers_of_one_device_run_one_at_a_time_and_others_do_not_wait() -> None:
    locks = DeviceLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def first() -> None:
        async with locks.hold(A):
            order.append("first in")
            await release.wait()
            order.append("first out")

    async def second() -> None:
        async with locks.hold(A):
            order.append("second in")

    one = asyncio.create_task(first())
    await asyncio.sleep(0)
    two = asyncio.create_task(second())
    await asyncio.sleep(0)
    async with locks.hold(B):  # another device: not behind A's holder
        order.append("other device")
    release.set()
    await asyncio.wait_for(asyncio.gather(one, two), 5)
    assert order == ["first in", "other device", "first out", "second in"]
    assert locks._locks == {}


async def test_a_cancelled_waiter_and_a_failing_holder_leave_no_lock() -> None:
    locks = DeviceLocks()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold(A):
            entered.set()
            await release.wait()

    held = asyncio.create_task(holder())
    await entered.wait()

    async def waiter() -> None:
        async with locks.hold(A):
            pytest.fail("entered while another held the lock")

    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await asyncio.wait_for(held, 5)
    assert locks._locks == {}

    with pytest.raises(RuntimeError):
        async with locks.hold(A):
            raise RuntimeError("handler failed")
    assert locks._locks == {}
    async with locks.hold(A):  # usable again
        pass

"""The database connection's gate: single statements share it, a transaction has it alone, nobody waits
forever, and a cancelled waiter leaves nothing held."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from plugins.ota.core.topics import DeviceRef
from plugins.ota.store.gate import Gate
from plugins.ota.store.sqlite import SqliteRepository


async def _hold(gate: Gate, kind: str, log: list[str], name: str, release: asyncio.Event) -> None:
    async with gate.shared() if kind == "s" else gate.exclusive():
        log.append(f"+{name}")
        await release.wait()
        log.append(f"-{name}")


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_statements_share_the_gate_and_a_transaction_waits_for_them() -> None:
    """Shared turns run together; an exclusive turn starts only once they have ended."""
    gate, log, go = Gate(), [], asyncio.Event()
    tasks = [asyncio.create_task(_hold(gate, "s", log, f"s{i}", go)) for i in range(3)]
    await _settle()
    tx = asyncio.create_task(_hold(gate, "x", log, "x", asyncio.Event()))
    await _settle()
    assert log == ["+s0", "+s1", "+s2"]
    go.set()
    await asyncio.gather(*tasks)
    await _settle()
    assert log[-1] == "+x"
    tx.cancel()
    await asyncio.gather(tx, return_exceptions=True)
    assert not gate.busy


async def test_statements_arriving_while_a_transaction_waits_go_after_it_all_at_once() -> None:
    """A waiting transaction is not overtaken by later statements (it never starves), and when it ends every
    statement that waited for it runs at once."""
    gate, log = Gate(), []
    first, tx_go, later_go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(_hold(gate, "s", log, "s0", first))
    await _settle()
    tx = asyncio.create_task(_hold(gate, "x", log, "x", tx_go))
    await _settle()
    later = [asyncio.create_task(_hold(gate, "s", log, f"t{i}", later_go)) for i in range(3)]
    await _settle()
    assert log == ["+s0"]
    first.set()
    await _settle()
    assert log == ["+s0", "-s0", "+x"]
    tx_go.set()
    await _settle()
    assert log[3:] == ["-x", "+t0", "+t1", "+t2"]
    later_go.set()
    await asyncio.gather(running, tx, *later)
    assert not gate.busy


@pytest.mark.parametrize("granted", [False, True])
async def test_a_cancelled_waiter_holds_nothing_and_blocks_nobody(granted: bool) -> None:
    """A transaction cancelled while it waits (or just after its turn was granted, before it ran) leaves the
    gate free, and the statements queued behind it go."""
    gate, log = Gate(), []
    held = gate.shared()
    await held.__aenter__()  # a statement under way, held by this test
    tx = asyncio.create_task(_hold(gate, "x", log, "x", asyncio.Event()))
    await _settle()
    behind = asyncio.create_task(_hold(gate, "s", log, "t", asyncio.Event()))
    await _settle()
    assert log == []
    if granted:
        await held.__aexit__(None, None, None)  # grants the transaction its turn...
        tx.cancel()  # ...and the cancellation lands before it runs
    else:
        tx.cancel()
    await asyncio.gather(tx, return_exceptions=True)
    await _settle()
    assert log == ["+t"]  # no transaction waits any more: the statement behind it shares the turn
    if not granted:
        await held.__aexit__(None, None, None)
    behind.cancel()
    await asyncio.gather(behind, return_exceptions=True)
    assert not gate.busy


async def test_concurrent_statements_are_not_serialized_through_the_event_loop(tmp_path: Path) -> None:
    """Many single statements issued at once (devices connecting) are queued to the database thread together
    and all complete, while transactions interleave with them without tearing: every write lands."""
    repo = SqliteRepository(tmp_path / "ota.db")
    await repo.open()
    try:
        devices = [DeviceRef("pk", f"d{i}") for i in range(300)]
        for d in devices:
            await repo.ensure_device(d, 1.0)
        started = time.monotonic()
        await asyncio.gather(
            *(repo.set_online(d, True, 2.0) for d in devices),
            *(repo.record_version(d, "default", "1.0.0", 2.0) for d in devices),
            *(repo.unfinished_tasks_of_device(d) for d in devices),
            *(repo.mark_all_offline() for _ in range(3)),
        )
        assert time.monotonic() - started < 30
        page = await repo.list_devices(limit=1000)
        assert len(page) == 300
        assert all(d.modules.get("default") == "1.0.0" for d in page)
    finally:
        await repo.close()

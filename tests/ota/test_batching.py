"""The group commit of database work: what is asked while a run is in flight goes in the next run, each
asker gets its own answer, a failure reaches exactly the askers of its batch."""

from __future__ import annotations

import asyncio

import pytest

from plugins.ota.app.batching import Batcher


class Recorder:
    """A `run` that records its batches and can be held open or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on: set[int] = set()

    async def run(self, items: list[int]) -> list[str]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail_on & set(items):
            raise ValueError(f"bad item in {items}")
        return [f"r{i}" for i in items]


async def test_what_is_asked_together_runs_together_and_each_gets_its_own_answer() -> None:
    rec = Recorder()
    batcher = Batcher(rec.run)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [f"r{i}" for i in range(5)]
    assert rec.batches == [[0, 1, 2, 3, 4]]


async def test_what_is_asked_during_a_run_waits_for_the_next_one() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher = Batcher(rec.run)
    first = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert rec.batches == [[1, 2]]
    later = [asyncio.create_task(batcher.submit(i)) for i in (3, 4, 5)]
    await asyncio.sleep(0)
    rec.gate.set()
    assert await asyncio.gather(*first, *later) == ["r1", "r2", "r3", "r4", "r5"]
    assert rec.batches == [[1, 2], [3, 4, 5]]
    assert await batcher.submit(6) == "r6"  # and it starts again when asked after going idle
    assert rec.batches[-1] == [6]


async def test_batches_are_bounded_in_size() -> None:
    rec = Recorder()
    batcher = Batcher(rec.run, most=3)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(8))) == [f"r{i}" for i in range(8)]
    assert rec.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]


async def test_a_failed_run_fails_its_own_askers_only() -> None:
    rec = Recorder()
    rec.gate.clear()
    rec.fail_on = {2}
    batcher = Batcher(rec.run)
    first = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    second = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    rec.gate.set()
    for task in first:
        with pytest.raises(ValueError, match="bad item"):
            await task
    assert await second == "r3"


async def test_an_answer_of_the_wrong_length_is_an_error_for_its_askers() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[1:]

    batcher = Batcher(short)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_an_asker_gone_before_its_batch_ran_is_left_out() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher = Batcher(rec.run)
    running = asyncio.create_task(batcher.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    gone = asyncio.create_task(batcher.submit(2))
    kept = asyncio.create_task(batcher.submit(3))
    await asyncio.sleep(0)
    gone.cancel()
    rec.gate.set()
    assert await running == "r1"
    assert await kept == "r3"
    assert gone.cancelled()
    assert rec.batches == [[1], [3]]


async def test_stopping_the_worker_releases_every_asker() -> None:
    rec = Recorder()
    rec.gate.clear()
    batcher = Batcher(rec.run)
    askers = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    askers.append(asyncio.create_task(batcher.submit(9)))
    await asyncio.sleep(0)
    assert batcher._worker is not None
    batcher._worker.cancel()
    done, pending = await asyncio.wait(askers, timeout=5)
    assert not pending
    assert all(t.cancelled() for t in done)

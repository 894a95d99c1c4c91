"""Admission control's rules, pure: the transfer window (what counts as a transfer, slow start, additive
increase, multiplicative decrease on slow transfers and on event-loop lag, its bounds), the download slots
shared by HTTPS and MQTT streams, the MQTT block server's use of them, and the `max_downloads` setting."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_store.slots import LEASE_S, DownloadSlots
from plugins.ota.app.admission import NOTICE_HOLD_S
from plugins.ota.app.downloads import BlockServer
from plugins.ota.core import blocks
from plugins.ota.core.admission import DECREASE, FAST_FACTOR, SAMPLES, TransferWindow, in_transfer
from plugins.ota.core.model import Task, TaskState
from plugins.ota.core.topics import DeviceRef
from plugins.ota.settings import ConfigError, OtaConfig, auto_max_downloads, resolve
from tests.ota.test_campaigns import OLD, World

A, B = DeviceRef("pk", "a"), DeviceRef("pk", "b")


def task(state: TaskState, progress: int = 0) -> Task:
    return Task(
        id=1, job_id=1, firmware_id=1, device=A, module="default", target_version="2", state=state,
        progress=progress, desc="", attempts=1, timeout_s=None, notified_at=0.0, noticed_at=0.0,
        started_at=None, updated_at=0.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("state", "progress", "holds"),
    [
        (TaskState.QUEUED, 0, False),
        (TaskState.NOTIFIED, 0, True),
        (TaskState.IN_PROGRESS, 0, True),
        (TaskState.IN_PROGRESS, 99, True),
        (TaskState.IN_PROGRESS, 100, False),  # downloaded: flashing costs the broker nothing
        (TaskState.SUCCEEDED, 100, False),
        (TaskState.FAILED, 40, False),
        (TaskState.CANCELLED, 0, False),
        (TaskState.TIMED_OUT, 10, False),
    ],
)
def test_a_transfer_is_a_notice_until_the_download_is_done(
    state: TaskState, progress: int, holds: bool
) -> None:
    """Notified and in progress below 100 % hold a transfer; nothing else does."""
    assert in_transfer(task(state, progress)) is holds


def test_the_window_starts_small_and_doubles_per_round_in_slow_start() -> None:
    """Slow start: each transfer completed in good time adds one, so a round of `size` completions doubles it."""
    w = TransferWindow(maximum=1000, initial=16)
    assert w.room() == 16
    w.admitted(16)
    assert w.room() == 0
    for _ in range(16):
        w.ended(1.0, now=10.0)
    assert w.limit == 32 and w.in_flight == 0 and w.room() == 32


def test_the_window_never_exceeds_its_maximum_nor_falls_below_its_minimum() -> None:
    """Growth stops at `maximum` (the endpoint's capacity); decreases stop at `minimum`."""
    w = TransferWindow(maximum=20, initial=16, minimum=4)
    for _ in range(100):
        w.admitted()
        w.ended(1.0, now=0.0)
    assert w.limit == 20
    for i in range(100):
        w.lagged(5.0, now=float(i) * 10)
    assert w.limit == 4


def test_lag_over_the_target_shrinks_the_window_once_per_hold() -> None:
    """The control plane first: a lag sample over `lag_target_s` multiplies the window by DECREASE, at most once
    per `hold_s`; lag under the target changes nothing."""
    w = TransferWindow(maximum=1000, initial=100, lag_target_s=0.25, hold_s=1.0)
    w.lagged(0.2, now=0.0)
    assert w.limit == 100
    w.lagged(0.3, now=0.0)
    assert w.limit == int(100 * DECREASE)
    w.lagged(0.3, now=0.5)  # within the hold: no second decrease for the same congestion
    assert w.limit == int(100 * DECREASE)
    w.lagged(0.3, now=1.5)
    assert w.limit == int(100 * DECREASE * DECREASE)


def test_after_a_decrease_growth_is_fast_while_transfers_keep_their_best_time_else_additive() -> None:
    """After its first decrease the window grows by one per completion while the recent completion times stay
    within FAST_FACTOR of the best seen (nothing queues behind the transfers), and by about one per window of
    completions while they are slower than that but not SLOW_FACTOR slower (congestion avoidance)."""
    w = TransferWindow(maximum=1000, initial=100)
    w.lagged(1.0, now=0.0)
    assert not w.slow_start
    size = w.size
    for _ in range(SAMPLES):  # the best time seen: 1 s
        w.admitted()
        w.ended(1.0, now=100.0)
    assert w.size > size + SAMPLES // 2  # one per completion once there are enough to judge
    for _ in range(SAMPLES):  # slower than the best, not congested: the recent median moves there
        w.admitted()
        w.ended(FAST_FACTOR * 1.2, now=101.0)
    size = w.size
    for _ in range(SAMPLES):
        w.admitted()
        w.ended(FAST_FACTOR * 1.2, now=102.0)
    additive = w.size - size
    assert 0 < additive < SAMPLES / 4
    assert w.decreases == 1


def test_transfers_slowing_down_shrink_the_window_not_one_slow_device() -> None:
    """The median of recent completion times twice the best median seen shrinks the window; one slow transfer
    among fast ones does not (it is a device, not the machine)."""
    w = TransferWindow(maximum=1000, initial=64)
    for _ in range(SAMPLES):
        w.admitted()
        w.ended(1.0, now=0.0)
    grown = w.limit
    w.admitted()
    w.ended(60.0, now=1.0)  # one device on a slow link
    assert w.limit >= grown
    before = w.limit
    for i in range(SAMPLES):
        w.admitted()
        w.ended(5.0, now=2.0 + i * 0.01)  # the machine got slower
    assert w.limit < before
    assert w.decreases == 1  # once per round of transfers, not once per slow one


def test_transfers_that_end_without_their_firmware_only_free_their_room() -> None:
    """A transfer abandoned (failed, cancelled, back to the queue) frees its room and does not grow the window."""
    w = TransferWindow(maximum=1000, initial=8)
    w.admitted(8)
    for _ in range(8):
        w.ended(None, now=0.0)
    assert w.in_flight == 0 and w.limit == 8


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("admit"), st.integers(1, 50)),
            st.tuples(st.just("done"), st.floats(0, 1000)),
            st.tuples(st.just("abandon"), st.just(0.0)),
            st.tuples(st.just("lag"), st.floats(0, 10)),
            st.tuples(st.just("reconcile"), st.integers(0, 500)),
        ),
        max_size=200,
    ),
    st.integers(1, 300),
)
def test_the_window_stays_within_its_bounds_whatever_happens(
    ops: list[tuple[str, float]], maximum: int
) -> None:
    """Whatever the sequence of admissions, completions, lag and reconciliations: minimum <= limit <= maximum,
    in flight >= 0, room >= 0."""
    w = TransferWindow(maximum=maximum)
    for i, (op, arg) in enumerate(ops):
        now = float(i)
        if op == "admit":
            w.admitted(int(arg))
        elif op == "done":
            w.ended(arg, now)
        elif op == "abandon":
            w.ended(None, now)
        elif op == "lag":
            w.lagged(arg, now)
        else:
            w.reconcile(int(arg))
        assert w.minimum <= w.limit <= w.maximum
        assert w.in_flight >= 0 and w.room() >= 0


# --------------------------------------------------------------------------------------------- slots


def test_slots_bound_https_downloads_and_mqtt_streams_together() -> None:
    """HTTPS downloads and MQTT stream leases share one capacity; a refusal is counted; a release or an
    expired lease frees room; a stream renews its own lease even when the slots are full."""
    slots = DownloadSlots(2)
    assert slots.acquire(0.0)
    assert slots.lease("stream-a", 0.0)
    assert not slots.acquire(0.0) and not slots.lease("stream-b", 0.0)
    assert slots.refused == 2
    assert slots.lease("stream-a", 1.0)  # its own lease renews
    slots.release()
    assert slots.lease("stream-b", 1.0)
    assert not slots.acquire(1.0 + LEASE_S - 0.5)
    assert slots.acquire(1.0 + LEASE_S + 0.1)  # both leases ran out
    slots.end_lease("stream-b")
    assert slots.used() == 1


class _NoGate:
    pass


def _block(offset: int, size: int, length: int) -> blocks.Block:
    return blocks.Block("1", "default", length, offset, size)


def test_an_mqtt_stream_holds_a_slot_from_its_first_block_to_its_last() -> None:
    """With one slot, device A's stream takes it at its first block; device B's block request is answered 503
    until A's last block, which gives the slot back."""
    slots = DownloadSlots(1)
    server = BlockServer(_NoGate(), None, None, None, lambda: 0.0, 1e6, slots)  # type: ignore[arg-type]
    assert isinstance(server._admit(A, _block(0, 1024, 4096)), blocks.Block)
    refused = server._admit(B, _block(0, 1024, 4096))
    assert isinstance(refused, blocks.Rejection) and refused.code is blocks.ReplyCode.UNAVAILABLE
    assert isinstance(server._admit(A, _block(1024, 1024, 4096)), blocks.Block)
    assert isinstance(server._admit(A, _block(3072, 1024, 4096)), blocks.Block)  # the last block
    assert isinstance(server._admit(B, _block(0, 1024, 4096)), blocks.Block)


# ------------------------------------------------------------------------------------------ settings


def test_max_downloads_is_sized_from_the_machine_unless_set() -> None:
    """0 (the default) means 128 per CPU core within 64..1024; a number sets it; OTA_MAX_DOWNLOADS overrides;
    anything but a whole number >= 0 is refused naming the key."""
    assert [auto_max_downloads(c) for c in (1, 2, 4, 64)] == [128, 256, 512, 1024]
    assert resolve(OtaConfig(), {}).max_downloads == auto_max_downloads()
    assert resolve(OtaConfig(max_downloads=10), {}).max_downloads == 10
    assert resolve(OtaConfig(), {"OTA_MAX_DOWNLOADS": "7"}).max_downloads == 7
    for bad in (-1, 2.5, "many", True):
        with pytest.raises(ConfigError, match="max_downloads"):
            resolve(dataclasses.replace(OtaConfig(), max_downloads=bad), {})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_downloads"):
        resolve(OtaConfig(), {"OTA_MAX_DOWNLOADS": "-3"})
    assert resolve(OtaConfig(control_lag_target_ms=100), {}).control_lag_target_s == 0.1
    with pytest.raises(ConfigError, match="control_lag_target_ms"):
        resolve(OtaConfig(control_lag_target_ms=0), {})


# ------------------------------------------------------------------------------ the service's window


@pytest.fixture
async def narrow(tmp_path: Path) -> AsyncIterator[World]:
    """The OTA service over SQLite with room for two transfers."""
    w = World(tmp_path, window=TransferWindow(maximum=2, initial=2, minimum=1))
    await w.start()
    yield w
    await w.stop()


async def test_devices_that_do_not_download_give_their_room_back(narrow: World) -> None:
    """A notified device that goes offline stops holding room at the next step, and so does one that reported
    no progress NOTICE_HOLD_S after its notice (it waits for its user, or ignores the notice): the next queued
    devices are notified. One that reports progress holds room again."""
    w = narrow
    devices = [DeviceRef("pk", f"d{i}") for i in range(4)]
    await w.online(*devices)
    job_id = await w.job(devices)
    await w.tick(0.5)
    first = w.channel.notified()
    assert len(first) == 2
    assert w.service.admission.waiting == {job_id: 2}

    await w.channel.disconnect(first[0])  # gone: not downloading
    await w.tick(1.0)
    assert len(w.channel.notified()) == 3

    await w.tick(NOTICE_HOLD_S + 1)  # the others never started
    assert len(w.channel.notified()) == 4
    assert w.service.admission.waiting == {}
    await w.progress(devices[3], "10")
    await w.tick(0.5)
    assert w.service.admission.window.in_flight >= 1


async def test_devices_arriving_at_once_never_overfill_the_window(narrow: World) -> None:
    """Connects, informs and pulls handled concurrently each take their room before the awaits that notify
    them, so a crowd arriving at the same moment gets no more notices than the window holds; room that a
    device did not take (its notice refused) is given back."""
    w = narrow
    devices = [DeviceRef("pk", f"d{i}") for i in range(24)]
    await w.offline(*devices)
    job_id = await w.job(devices)
    for d in devices:
        w.channel.connect(d)
    await asyncio.gather(
        *(w.service.events.device_connected(d) for d in devices[:8]),
        *(w.inform(d, OLD) for d in devices[8:16]),
        *(
            w.publish(f"/sys/pk/{d.device_name}/thing/ota/firmware/get", {"id": "q", "params": {}})
            for d in devices[16:]
        ),
    )
    await w.service.drain()
    states = await w.states(job_id)
    notified = [d for d, s in states.items() if s is TaskState.NOTIFIED]
    assert len(notified) == 2
    assert w.service.admission.window.in_flight == 2  # nothing reserved and left behind

    for d in notified:
        await w.progress(d, "100")  # both downloads done: room for two more
    await w.tick(0.5)
    states = await w.states(job_id)
    assert sum(s is TaskState.NOTIFIED for s in states.values()) == 2

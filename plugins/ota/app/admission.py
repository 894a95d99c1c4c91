"""Admission control in the app layer: the transfer window (`core.admission.TransferWindow`) fed with the
tasks' changes, the event loop's lag and, every step, the database's count of transfers in flight; and
what waits for it, per job, for the API, the console and the metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from plugins.ota.app.channel import DeviceChannel
from plugins.ota.core.admission import TransferWindow, in_transfer
from plugins.ota.core.model import Task, TaskState
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")

LAG_PROBE_S = 0.1  # how often the event loop's lag is sampled
# A notified device that has not reported progress this long after its notice is not downloading (it waits
# for its user, or ignores the notice): it stops holding room in the window until it reports progress.
NOTICE_HOLD_S = 60.0


class Admission:
    """Whether a notice may go out now (`room`), kept up to date by `task_changed`, `step` and `lagged`."""

    def __init__(
        self,
        repo: Repository,
        channel: DeviceChannel,
        window: TransferWindow,
        clock: Callable[[], float],
    ) -> None:
        self.repo = repo
        self.channel = channel
        self.window = window
        self.clock = clock
        self.waiting: dict[int, int] = {}  # job id -> its online queued tasks the last step had no room for
        self._lag_max = 0.0  # the largest lag sampled since the last step
        self._reserved: set[int] = set()  # tasks given room that have not entered their transfer yet

    def room(self) -> int:
        return self.window.room()

    def reserve(self, task: Task) -> bool:
        """Take room in the window for `task`'s transfer, now, before the awaits that notify it: many
        connects, informs and pulls are handled at once, and each must see the room the others took. The
        caller `release`s the task once its notice is decided (a task that entered its transfer keeps the
        room). A task already in transfer needs no more room."""
        if in_transfer(task) or task.id in self._reserved:
            return True
        if self.window.room() <= 0:
            return False
        self._reserved.add(task.id)
        self.window.admitted()
        return True

    def release(self, task_id: int) -> None:
        """Give back the room `reserve` took for a task that did not enter its transfer."""
        if task_id in self._reserved:
            self._reserved.discard(task_id)
            self.window.ended(None, self.clock())

    def task_changed(self, before: Task, after: Task) -> None:
        """Count a task's entry into or exit from a transfer; a completed download's time feeds the window."""
        was, now_in = in_transfer(before), in_transfer(after)
        if now_in and not was:
            if after.id in self._reserved:
                self._reserved.discard(after.id)  # its room was taken by `reserve`
            else:
                self.window.admitted()
        elif was and not now_in:
            done = after.state is TaskState.SUCCEEDED or (
                after.state is TaskState.IN_PROGRESS and after.progress >= 100
            )
            since = after.noticed_at or after.notified_at
            self.window.ended(self.clock() - since if done and since is not None else None, self.clock())

    def lagged(self, lag_s: float) -> None:
        """One sample of the event loop's lag."""
        self._lag_max = max(self._lag_max, lag_s)

    async def step(self) -> None:
        """Once per dispatcher step: the window sees the step's worst lag, and counts the transfers in
        flight as the database has them. Devices offline do not download, nor do devices notified more than
        `NOTICE_HOLD_S` ago that reported no progress: they do not count."""
        now = self.clock()
        self.window.lagged(self._lag_max, now)
        self._lag_max = 0.0
        devices = await self.repo.devices_in_transfer(now - NOTICE_HOLD_S)
        online = sum(1 for device in devices if self.channel.is_online(device))
        self.window.reconcile(online + len(self._reserved))

    def set_waiting(self, job_id: int, count: int) -> None:
        if count:
            self.waiting[job_id] = count
        else:
            self.waiting.pop(job_id, None)

    @property
    def waiting_total(self) -> int:
        return sum(self.waiting.values())


async def probe_loop_lag(sample: Callable[[float], None], interval_s: float = LAG_PROBE_S) -> None:
    """Forever: sleep `interval_s` and hand `sample` how much later than asked the loop woke up."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + interval_s
        await asyncio.sleep(interval_s)
        sample(max(0.0, loop.time() - asked))

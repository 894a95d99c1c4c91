"""Admission control for transfers (pure: time is an argument): how many devices may be downloading at
once, adapted to what the machine is measured to sustain.

A transfer is a task from its notice until the device has its firmware: `notified`, or `in_progress`
below 100 % (at 100 % the download is done; flashing and rebooting cost the broker nothing). Notices go
out only while the transfers in flight fit in the window; the window adapts the way TCP's congestion
control does (additive increase, multiplicative decrease):

- it starts small and grows by one per transfer that completes in good time (slow start: doubling per
  round of transfers); after its first decrease it grows by one per completion while the recent
  completion times stay within `FAST_FACTOR` of the best seen (the machine keeps up: nothing queues
  behind the transfers, as delay-based congestion control reads it), else by one per window's worth of
  completions (additive increase);
- it shrinks by `DECREASE` when the transfers slow down - the median of the recent completion times
  exceeds `SLOW_FACTOR` times the best median seen (the machine, not a device, got slower), at most once
  per round of transfers (the best median), as TCP decreases once per round trip - or when the broker's
  own control plane lags (the event loop's lag over `lag_target_s`: acknowledgements, pings and logins
  must keep a bounded latency, so downloads yield first), at most once per `hold_s`;
- it stays within [`minimum`, `maximum`]; `maximum` is the download endpoint's hard capacity.

Completion times are relative: a fleet on slow links has long transfers from the start, and only their
growth means congestion.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from plugins.ota.core.model import Task, TaskState

SLOW_FACTOR = 2.0  # recent median completion time over the best median seen that counts as congestion
FAST_FACTOR = 1.25  # within this of the best median, transfers are not queueing: the window grows fast
DECREASE = 0.7  # the window's factor on congestion
SAMPLES = 16  # completion times in the recent median
BEST_DECAY = (
    1.002  # the best median ages 0.2 % per sample: a lasting change of fleet is learnt in ~350 transfers
)


def in_transfer(task: Task | None) -> bool:
    """Whether `task` holds a transfer: notified, or downloading (in progress below 100 %)."""
    if task is None:
        return False
    return task.state is TaskState.NOTIFIED or (task.state is TaskState.IN_PROGRESS and task.progress < 100)


@dataclass
class TransferWindow:
    """The window of transfers in flight (see the module's docstring). `in_flight` is kept by the caller's
    `admitted`/`ended` calls and set from the database's truth by `reconcile`."""

    maximum: int
    minimum: int = 4
    initial: int = 16
    lag_target_s: float = 0.25
    hold_s: float = 1.0
    size: float = field(init=False)
    in_flight: int = field(init=False, default=0)
    slow_start: bool = field(init=False, default=True)
    decreases: int = field(init=False, default=0)
    _recent: deque[float] = field(init=False, default_factory=lambda: deque(maxlen=SAMPLES))
    _best: float = field(init=False, default=math.inf)
    _held_until: float = field(init=False, default=-math.inf)

    def __post_init__(self) -> None:
        if self.maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.minimum = max(1, min(self.minimum, self.maximum))
        self.size = float(max(self.minimum, min(self.initial, self.maximum)))

    @property
    def limit(self) -> int:
        return int(self.size)

    def room(self) -> int:
        """How many more transfers may start now."""
        return max(0, self.limit - self.in_flight)

    def admitted(self, n: int = 1) -> None:
        self.in_flight += n

    def ended(self, duration_s: float | None, now: float) -> None:
        """A transfer ended: the download completed after `duration_s` (from its latest notice), or it was
        abandoned (failed, cancelled, timed out, back to the queue) when `duration_s` is None."""
        self.in_flight = max(0, self.in_flight - 1)
        if duration_s is None or duration_s < 0:
            return
        self._recent.append(duration_s)
        if len(self._recent) >= SAMPLES // 2:
            median = statistics.median(self._recent)
            self._best = min(self._best * BEST_DECAY, median)
            if median > SLOW_FACTOR * self._best:
                self._congestion(now, max(self.hold_s, self._best))  # once per round of transfers
                return
            if median <= FAST_FACTOR * self._best:
                self._grow(fast=True)
                return
        self._grow(fast=self.slow_start)

    def lagged(self, lag_s: float, now: float) -> None:
        """The event loop's lag measured over the last interval: over the target, the window shrinks."""
        if lag_s > self.lag_target_s:
            self._congestion(now, self.hold_s)

    def reconcile(self, in_flight: int) -> None:
        """The transfers in flight as the database counts them (catches what no event reported)."""
        self.in_flight = max(0, in_flight)

    def _grow(self, *, fast: bool) -> None:
        step = 1.0 if fast else 1.0 / max(1.0, self.size)
        self.size = min(float(self.maximum), self.size + step)

    def _congestion(self, now: float, hold_s: float) -> None:
        if now < self._held_until:
            return
        self._held_until = now + hold_s
        self.slow_start = False
        self.decreases += 1
        self.size = max(float(self.minimum), self.size * DECREASE)
        self._recent.clear()  # judge the smaller window by its own transfers

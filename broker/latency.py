"""How long the broker takes to answer on its control plane, as plain histograms (no dependency): from a
CONNECT read to its CONNACK (authentication and session set-up included) and from a QoS 1 PUBLISH read to
its PUBACK (routing and the plugins' handling of the message included). The OTA plugin exposes them on
/metrics; the event loop's lag, what a packet waits before it is read, is measured apart."""

from __future__ import annotations

from bisect import bisect_left

BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Latency:
    """Counts per upper bound in `BOUNDS` (the last count is above them all) and the sum, in seconds."""

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.total_s += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or under it) for each bound, then (inf, all of them)."""
        out, running = [], 0
        for bound, count in zip((*BOUNDS, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out

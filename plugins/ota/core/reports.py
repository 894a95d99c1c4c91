"""Versions over time: how many devices of a product's module ran each version, at instants of the past,
worked back from the versions they run now and the upgrades that succeeded since. Pure."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence

OTHERS = "others"  # the versions no upgrade of the window went to, together


def versions_over_time(
    now_counts: Mapping[str, int],
    upgrades: Sequence[tuple[float, str]],
    start: float,
    end: float,
    points: int = 60,
) -> list[tuple[float, dict[str, int]]]:
    """For one product's module: `now_counts` (version -> devices now), `upgrades` (when, to which version,
    each success since `start`). At `points` instants from `start` to `end`, the devices on each version an
    upgrade went to, and on the others together: a version's count at t is its count now less the upgrades
    to it after t (the devices that reached it since), and the others are what the fleet has besides."""
    times: dict[str, list[float]] = {}
    for at, version in upgrades:
        times.setdefault(version, []).append(at)
    for listed in times.values():
        listed.sort()
    total = sum(now_counts.values())
    series: list[tuple[float, dict[str, int]]] = []
    steps = max(1, points - 1)
    for k in range(steps + 1):
        at = start + (end - start) * k / steps
        counts = {
            v: max(0, now_counts.get(v, 0) - (len(ts) - bisect.bisect_right(ts, at)))
            for v, ts in sorted(times.items())
        }
        counts[OTHERS] = max(0, total - sum(counts.values()))
        series.append((at, counts))
    return series

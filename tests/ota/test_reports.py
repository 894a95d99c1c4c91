"""Versions over time, worked back from now and the upgrades since (pure)."""

from __future__ import annotations

from plugins.ota.core.reports import OTHERS, versions_over_time


def test_a_version_grows_by_its_upgrades_and_the_others_shrink_by_them() -> None:
    # 10 devices now: 6 on 2.0.0 (5 upgraded at t=10..50, one was on it before), 4 still on 1.0.0
    now = {"2.0.0": 6, "1.0.0": 4}
    upgrades = [(10.0 * i, "2.0.0") for i in range(1, 6)]
    series = versions_over_time(now, upgrades, start=0.0, end=100.0, points=11)
    assert [at for at, _ in series] == [10.0 * k for k in range(11)]
    assert series[0][1] == {"2.0.0": 1, OTHERS: 9}
    assert series[3][1] == {"2.0.0": 4, OTHERS: 6}  # at t=30: the upgrades at 10, 20, 30 are done
    assert series[-1][1] == {"2.0.0": 6, OTHERS: 4}
    assert all(sum(c.values()) == 10 for _, c in series)


def test_no_upgrade_in_the_window_is_one_flat_series_and_counts_never_go_below_zero() -> None:
    assert versions_over_time({"1.0.0": 3}, [], 0.0, 60.0, points=3) == [
        (0.0, {OTHERS: 3}),
        (30.0, {OTHERS: 3}),
        (60.0, {OTHERS: 3}),
    ]
    # more upgrades to a version than devices on it now (some moved on again): clamped at zero
    series = versions_over_time(
        {"2.0.0": 1, "3.0.0": 2}, [(5.0, "2.0.0"), (6.0, "2.0.0")], 0.0, 10.0, points=2
    )
    assert series[0][1]["2.0.0"] == 0 and series[-1][1] == {"2.0.0": 1, OTHERS: 2}

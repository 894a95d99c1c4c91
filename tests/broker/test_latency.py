"""The broker's latency histograms: each observation counted once, in the first bucket whose bound holds it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.latency import BOUNDS, Latency


def test_observations_land_in_the_first_bucket_that_holds_them() -> None:
    """A value equal to a bound belongs to that bound's bucket (Prometheus' `le`); above all bounds, to +Inf."""
    h = Latency()
    for seconds in (0.0, 0.001, 0.0011, 10.0, 11.0):
        h.observe(seconds)
    cumulative = dict(h.cumulative())
    assert cumulative[0.001] == 2
    assert cumulative[0.0025] == 3
    assert cumulative[10.0] == 4
    assert cumulative[float("inf")] == 5
    assert abs(h.total_s - 21.0021) < 1e-9


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=100))
def test_the_cumulative_counts_never_decrease_and_end_at_the_total(values: list[float]) -> None:
    """Whatever is observed: the counts are cumulative over the bounds, in order, and the last is every one."""
    h = Latency()
    for v in values:
        h.observe(v)
    rows = h.cumulative()
    assert [b for b, _ in rows] == [*BOUNDS, float("inf")]
    counts = [c for _, c in rows]
    assert counts == sorted(counts) and counts[-1] == len(values)

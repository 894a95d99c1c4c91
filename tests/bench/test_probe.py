"""The campaign benchmark's measurements (bench.probe, simulator.fleet.LoopLag): the control-plane probe
against a real broker and against one that does not answer, the Prometheus histogram arithmetic, and the
event-loop lag probe."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time

import psutil
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from bench import mqttlib
from bench.probe import (
    LAG,
    BrokerSampler,
    ControlProbe,
    Sample,
    histogram_quantile,
    parse_metrics,
    quantile,
    summarize,
    timeline,
)
from simulator.fleet import LoopLag
from tests.support import TOKEN, Env

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


async def run_for(seconds: float, *runs: object) -> None:
    """Run the measuring coroutines' `run(stop)` for `seconds`, then stop them (each ends within bounds)."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in runs]  # type: ignore[attr-defined]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 15)


async def test_probe_times_every_puback_and_connack_of_a_real_broker(env: Env) -> None:
    """Against a broker that answers, every QoS 1 publish gets a PUBACK latency and every fresh connection a
    CONNACK latency: nothing is counted as a timeout, a failure or unanswered."""
    probe = ControlProbe("127.0.0.1", env.mqtt_port, started=time.monotonic())
    await run_for(2.5, probe)
    pub, con = probe.puback.summary(), probe.connack.summary()
    assert pub["count"] >= 15, pub  # one every 100 ms, less start-up
    assert con["count"] == 2, con  # at 0 s and 2 s
    for s in (pub, con):
        assert s["timeouts"] == s["failures"] == s["unanswered"] == 0, s
        assert 0 <= s["p50_ms"] <= s["p99_ms"] <= s["max_ms"] < 1000, s


async def test_probe_counts_unanswered_requests_as_timeouts_not_latencies() -> None:
    """A broker that accepts CONNECT but never acknowledges a publish, and one connection that never gets a
    CONNACK: each answer not given within the timeout is a timeout, none becomes a latency sample."""
    connacks = True

    async def half_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        splitter = mqttlib.Splitter()
        with contextlib.suppress(OSError):
            while data := await reader.read(4096):
                for kind, _flags, _body in splitter.feed(data):
                    if kind == mqttlib.CONNECT and connacks:
                        writer.write(b"\x20\x02\x00\x00")
        writer.close()

    server = await asyncio.start_server(half_broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        probe = ControlProbe("127.0.0.1", port, started=time.monotonic(), timeout=0.5)
        await run_for(1.5, probe)
        assert probe.puback.samples == []
        sent = len(probe.puback.timeouts) + probe.puback.unanswered
        assert sent >= 10, probe.puback  # every publish was given up on, at its timeout or at the end
        assert len(probe.puback.timeouts) >= 5, probe.puback
        assert len(probe.connack.samples) == 1, probe.connack  # the connection at 0 s is answered

        connacks = False
        silent = ControlProbe("127.0.0.1", port, started=time.monotonic(), timeout=0.5)
        await run_for(0.2, silent)
        assert silent.connack.samples == silent.puback.samples == []
        assert len(silent.connack.timeouts) == 1, silent.connack
        assert silent.puback.failures == 1, silent.puback  # its session never got a CONNACK
    finally:
        server.close()
        await server.wait_closed()


async def test_sampler_reads_the_broker_each_second(env: Env) -> None:
    """The sampler takes one sample a second with the broker's RSS, CPU and its /metrics figures (task states
    are always exported); a figure the broker does not export stays absent rather than zero."""
    host, port = env.running.admin_address
    sampler = BrokerSampler(
        env.http,
        f"http://{host}:{port}/metrics",
        {"Authorization": f"Bearer {TOKEN}"},
        psutil.Process(os.getpid()),
        started=time.monotonic(),
    )
    await run_for(2.2, sampler)
    assert 2 <= len(sampler.samples) <= 4
    for s in sampler.samples:
        assert s.scrape_ms is not None and s.rss_mb and s.cpu_s is not None
        assert "queued" in s.tasks
    figures = summarize(sampler.samples)
    assert figures["scrapes_failed"] == 0
    assert figures["peak_rss_mb"] == max(s.rss_mb for s in sampler.samples if s.rss_mb)
    rows = timeline(sampler.samples)
    assert [r["t_s"] for r in rows] == [s.t for s in sampler.samples]

    absent = Sample(0.0)
    parse_metrics("# HELP other x\n# TYPE other gauge\nother 1.0\n", absent)
    assert absent.gauges == {} and absent.lag_buckets == {}
    assert "loop_lag_ms" not in summarize([absent])


def histogram_text(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


@settings(max_examples=60, deadline=None)
@given(
    before=st.lists(st.floats(0, 12), max_size=50),
    during=st.lists(st.floats(0, 12), min_size=1, max_size=200),
)
def test_loop_lag_over_the_campaign_comes_from_bucket_deltas(
    before: list[float], during: list[float]
) -> None:
    """Only what the broker observed between the first and the last scrape counts, and each quantile lies
    in the bucket that holds the true nearest-rank quantile of those observations (the highest finite
    bound when that is beyond it); the max is the upper bound of the highest bucket observed."""
    registry = CollectorRegistry()
    lag = Histogram(LAG, "lag", buckets=BUCKETS, registry=registry)
    for v in before:
        lag.observe(v)
    first = Sample(0.0, scrape_ms=1.0)
    parse_metrics(histogram_text(registry), first)
    for v in during:
        lag.observe(v)
    last = Sample(1.0, scrape_ms=1.0)
    parse_metrics(histogram_text(registry), last)

    figures = summarize([first, last])["loop_lag_ms"]
    assert figures["observations"] == len(during)
    bounds = (0.0, *BUCKETS, math.inf)
    for q, key in ((0.5, "p50"), (0.99, "p99")):
        true = quantile(during, q)
        assert true is not None
        upper = next(i for i, b in enumerate(bounds) if i and true <= b)
        if math.isinf(bounds[upper]):
            assert figures[key] == round(BUCKETS[-1] * 1000, 1)
        else:
            assert round(bounds[upper - 1] * 1000, 1) <= figures[key] <= round(bounds[upper] * 1000, 1)
    top = max(during)
    expected = next((b for b in BUCKETS if top <= b), None)
    assert figures["max_le"] == ("inf" if expected is None else round(expected * 1000, 1))
    assert histogram_quantile(0.5, {}) is None


async def test_loop_lag_records_how_long_the_loop_was_held() -> None:
    """A callback that holds the loop for 300 ms shows up as a lag sample of about that much; a free loop
    shows lags far below it."""
    lag = LoopLag(0.05)
    lag.start()
    try:
        await asyncio.sleep(0.3)
        assert lag.samples and max(lag.samples) < 0.1
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # holds the loop, as a saturated one would
        await asyncio.sleep(0.1)
    finally:
        lag.stop()
    assert max(lag.samples) >= 0.25
    count = len(lag.samples)
    await asyncio.sleep(0.15)
    assert len(lag.samples) == count  # stopped means stopped

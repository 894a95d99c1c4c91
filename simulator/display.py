"""The simulation on a terminal: a live table or status lines while it runs, and the summary."""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
from collections import Counter
from collections.abc import Iterator

from rich.live import Live
from rich.table import Table

from simulator.fleet import run_simulation
from simulator.model import DeviceState, SimulationOptions, SimulationResult, Snapshot, lag_spread, spread

# ----------------------------------------------------------------------------------------- presentation


COLUMNS = (
    "connected",
    "informed",
    "notified",
    "downloading",
    "upgraded",
    "failed",
    "offline",
    "bytes",
    "elapsed",
)


def snapshot_row(snapshot: Snapshot, elapsed: float) -> dict[str, str]:
    return {
        "connected": str(snapshot.connected),
        "informed": str(snapshot.informed),
        "notified": str(snapshot.notified),
        "downloading": str(snapshot.count(DeviceState.DOWNLOADING)),
        "upgraded": str(snapshot.count(DeviceState.UPGRADED)),
        "failed": str(snapshot.count(DeviceState.FAILED)),
        "offline": str(snapshot.count(DeviceState.OFFLINE)),
        "bytes": _human_bytes(snapshot.bytes),
        "elapsed": f"{elapsed:.1f}s",
    }


def live_table(snapshot: Snapshot, elapsed: float, title: str) -> Table:
    """The live view: one row per counter (fits a narrow terminal)."""
    table = Table(title=title, show_header=False, min_width=40)
    table.add_column("counter")
    table.add_column("value", justify="right")
    for name, value in snapshot_row(snapshot, elapsed).items():
        table.add_row(name, value)
    return table


def status_line(snapshot: Snapshot, elapsed: float) -> str:
    return " ".join(f"{k}={v}" for k, v in snapshot_row(snapshot, elapsed).items())


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def summary_lines(result: SimulationResult) -> Iterator[str]:
    """The end-of-run summary, for people."""
    elapsed = result.ended_at - result.started_at
    yield f"simulation ended ({result.end_reason.value}) after {elapsed:.1f}s: {len(result.devices)} devices"
    yield "  " + ", ".join(f"{state} {n}" for state, n in result.counts.items())
    informed = result.informed_seconds
    if informed:
        yield f"  informed: {len(informed)} devices, the last {max(informed):.2f}s after the start"
    upgrades = spread(result.upgrade_seconds)
    if upgrades["count"]:
        yield (
            f"  first notice -> upgraded: p50 {upgrades['p50']:.2f}s, p95 {upgrades['p95']:.2f}s, "
            f"max {upgrades['max']:.2f}s"
        )
    last = result.notice_to_last_success
    if last is not None:
        yield f"  first notice -> last success: {last:.2f}s"
    yield f"  downloaded {_human_bytes(result.total_bytes)}"
    lag = lag_spread([v for p in result.loop_lag for v in p])
    if lag["samples"]:
        yield f"  simulator's event loop lag: p50 {lag['p50']} ms, p99 {lag['p99']} ms, max {lag['max']} ms"
    steps = Counter(d.failed_step for d in result.devices if d.failed_step)
    if steps:
        yield "  reported failures: " + ", ".join(f"step {s}: {n}" for s, n in sorted(steps.items()))
        reasons = Counter((d.failed_step, d.reason) for d in result.devices if d.failed_step and d.reason)
        for (step, reason), n in reasons.most_common(3):  # the devices' own words, whole
            yield f"    {n} device(s), step {step}: {reason}"
        if any(
            "CERTIFICATE_VERIFY_FAILED" in r.upper() or "certificate verify failed" in r for _, r in reasons
        ):
            yield "    (the download's certificate is not trusted: --ca-file the broker's data/tls/ca.crt)"
    others = Counter(d.reason for d in result.devices if d.reason and not d.failed_step)
    for reason, n in others.most_common(3):
        yield f"  {n} device(s): {reason}"


async def run_with_display(options: SimulationOptions, *, live: bool, every: float = 5.0) -> SimulationResult:
    """`run_simulation` with a live table (`live`, for a terminal) or a status line every `every` seconds."""
    title = f"simulating {options.devices if options.devices is not None else 'all'} devices of {options.product_key}"
    interrupt = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows' loop
        loop.add_signal_handler(signal.SIGINT, interrupt.set)
    try:
        if live:
            with Live(live_table(Snapshot(), 0.0, title), refresh_per_second=4) as screen:

                def show(snapshot: Snapshot, elapsed: float) -> None:
                    screen.update(live_table(snapshot, elapsed, title))

                return await run_simulation(options, show, interrupt)
        last = -math.inf

        def line(snapshot: Snapshot, elapsed: float) -> None:
            nonlocal last
            if elapsed - last >= every:
                last = elapsed
                print(status_line(snapshot, elapsed), flush=True)

        return await run_simulation(options, line, interrupt)
    finally:
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGINT)

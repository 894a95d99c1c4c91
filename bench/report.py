"""Turn a results file into markdown tables, the verdict on the targets, and the fan-in chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

TIMES = "\N{MULTIPLICATION SIGN}"
DASH = "\N{EN DASH}"

LABELS = {
    "amqtt": "amqtt",
    "asyncio_floor": "asyncio floor",
    "asyncio_floor_task": "asyncio floor, task per connection",
    "ota": "ota-broker",
    "ota_nolimit": "ota-broker (no limits)",
    "ota_uvloop": "ota-broker on uvloop",
    "ota_nolimit_uvloop": "ota-broker on uvloop (no limits)",
    "mosquitto": "mosquitto",
    "mosquitto_nolimit": "mosquitto (no limits)",
    "nginx": "nginx",
}


def label(name: str) -> str:
    return LABELS.get(name, name)


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return DASH
    if isinstance(value, float | int):
        if digits == 0:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def pairwise(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> float | None:
    """Median of the per-repetition ratios a/b."""
    ratios = [x[key] / y[key] for x, y in zip(a, b, strict=False) if x.get(key) and y.get(key)]
    return statistics.median(ratios) if ratios else None


def ratio_text(value: float | None) -> str:
    if value is None:
        return DASH
    if value >= 10:
        return f"{value:,.0f}{TIMES}"
    if value >= 1:
        return f"{value:.1f}{TIMES}"
    return f"{value:.3f}"


# --------------------------------------------------------------------------------------------- tables


def fanin_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    names = list(rows[0]["brokers"])
    head = ["idle subscriptions", "QoS"]
    for n in names:
        head += [f"{label(n)} msg/s", f"{label(n)} CPU µs/msg"]
    ratio_cols = []
    if "ota" in names and "mosquitto" in names:
        ratio_cols.append(("ota", "mosquitto", "cpu_us_per_msg", "ota/mosquitto CPU per msg"))
    if "ota" in names and "mosquitto_nolimit" in names:
        ratio_cols.append(("ota", "mosquitto_nolimit", "cpu_us_per_msg", "ota/mosq. no-limit CPU per msg"))
    if "ota_nolimit" in names and "mosquitto_nolimit" in names:
        ratio_cols.append(
            ("ota_nolimit", "mosquitto_nolimit", "cpu_us_per_msg", "no limits: ota/mosquitto CPU per msg")
        )
    if "ota" in names and "amqtt" in names:
        ratio_cols.append(("ota", "amqtt", "rate", "ota/amqtt rate"))
    if "amqtt" in names and "mosquitto" in names:
        ratio_cols.append(("amqtt", "mosquitto", "cpu_us_per_msg", "amqtt/mosquitto CPU per msg"))
    head += [c[3] for c in ratio_cols]
    lines = [table_head(head)]
    for row in rows:
        cells = [fmt(row["subs"]), str(row["qos"])]
        for n in names:
            b = row["brokers"][n]
            m = b["median"]
            rate = fmt(m["rate"])
            sent, received = m.get("sent") or 0, m.get("received") or 0
            if sent and received < sent * 0.999:
                rate += f" ({100 * (sent - received) / sent:.0f} % dropped)"
            if any(r["timed_out"] for r in b["runs"]):
                rate += " (cut at time limit)"
            cells += [rate, fmt(m["cpu_us_per_msg"], 1)]
        for a, bname, key, _ in ratio_cols:
            cells.append(ratio_text(pairwise(row["brokers"][a]["runs"], row["brokers"][bname]["runs"], key)))
        lines.append(table_row(cells))
    return "\n".join(lines)


def fanin_detail(rows: list[dict[str, Any]]) -> str:
    """Per run: messages, broker CPU utilisation (saturation check), load average."""
    lines = [
        table_head(
            [
                "idle subs",
                "QoS",
                "broker",
                "messages per run",
                "delivered (median)",
                "broker CPU util",
                "load avg",
            ]
        )
    ]
    for row in rows:
        for n, b in row["brokers"].items():
            m = b["median"]
            lines.append(
                table_row(
                    [
                        fmt(row["subs"]),
                        str(row["qos"]),
                        label(n),
                        fmt(b["calibration"]["messages"]),
                        fmt(m["received"]),
                        fmt(m["cpu_util"], 2),
                        f"{row['loadavg_start'][0]:.2f} → {row['loadavg_end'][0]:.2f}",
                    ]
                )
            )
    return "\n".join(lines)


def fleet_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    names = list(rows[0]["brokers"])
    fanout = any("fanout_s" in r for row in rows for b in row["brokers"].values() for r in b["runs"])
    head = ["devices", "broker", "connect + subscribe all (s)", "broker CPU for it (s)"]
    if fanout:
        head += ["one message to each: all received after (s)", "effective msg/s", "broker CPU (s)"]
    head += ["RSS per client (KiB)", "RSS idle → with clients (MiB)", "load avg"]
    lines = [table_head(head)]
    for row in rows:
        for n in names:
            b = row["brokers"][n]
            m = b["median"]
            runs = b["runs"]
            connect = fmt(m["connect_s"], 2)
            if any(r["connect_s"] is None for r in runs):
                worst = min(runs, key=lambda r: r["connected"])
                connect = (
                    f"{connect} (not all connected: {worst['connected']:,} of {worst['devices']:,} "
                    f"in {fmt(worst['connect_partial_s'], 1)} s)"
                )
            cells = [fmt(row["devices"]), label(n), connect, fmt(m["connect_cpu_s"], 2)]
            if fanout:
                fan = fmt(m["fanout_s"], 3)
                incomplete = [r for r in runs if not r.get("fanout_complete", False)]
                if incomplete:
                    worst = min(incomplete, key=lambda r: r.get("fanout_received", 0))
                    fan = (
                        f"{fan} (incomplete: {worst.get('fanout_received', 0):,} of {worst['devices']:,} "
                        f"after {fmt(worst.get('fanout_partial_s'), 1)} s)"
                    )
                cells += [fan, fmt(m["fanout_rate"]), fmt(m["fanout_cpu_s"], 2)]
            cells += [
                fmt(m["rss_per_client_kib"], 1),
                f"{fmt(m['rss_idle_mib'], 0)} → {fmt(m['rss_mib'], 0)}",
                f"{row['loadavg_start'][0]:.2f} → {row['loadavg_end'][0]:.2f}",
            ]
            lines.append(table_row(cells))
    return "\n".join(lines) + rounds_table(rows)


def rounds_table(rows: list[dict[str, Any]]) -> str:
    """With `--fanout-rounds`: each round's broker CPU and time, medians over the repetitions (range)."""
    lines = []
    for row in rows:
        for name, b in row["brokers"].items():
            per_run = [r["fanout_rounds"] for r in b["runs"] if r.get("fanout_rounds")]
            if not per_run:
                continue
            if not lines:
                lines = [
                    "",
                    "",
                    table_head(["devices", "broker", "round", "broker CPU (s)", "all received after (s)"]),
                ]
            for k in range(min(map(len, per_run))):
                cells = []
                for key in ("fanout_cpu_s", "fanout_s"):
                    values = [run[k][key] for run in per_run if run[k][key] is not None]
                    cells.append(
                        f"{fmt(statistics.median(values), 3)} ({fmt(min(values), 3)}{DASH}{fmt(max(values), 3)})"
                        if values
                        else DASH
                    )
                lines.append(table_row([fmt(row["devices"]), label(name), str(k + 1), *cells]))
    return "\n".join(lines)


def https_table(row: dict[str, Any] | None) -> str:
    if not row:
        return ""
    servers = row["servers"]
    head = ["file", "clients", "server", "TLS", "MB/s", "server CPU s/GB", "failed runs"]
    lines = [table_head(head)]
    for name, s in servers.items():
        m = s["median"]
        lines.append(
            table_row(
                [
                    f"{row['size_mb']} MB",
                    str(row["clients"]),
                    label(name),
                    row.get("tls", {}).get(name, "?"),
                    fmt(m["mb_per_s"], 0),
                    fmt(m["cpu_s_per_gb"], 2),
                    str(s["failed_runs"]),
                ]
            )
        )
    if "ota" in servers and "nginx" in servers:
        r = pairwise(servers["ota"]["runs"], servers["nginx"]["runs"], "mb_per_s")
        lines.append("")
        lines.append(f"ota-broker / nginx throughput (median of pairwise ratios): **{ratio_text(r)}**")
    return "\n".join(lines)


def table_head(cells: list[str]) -> str:
    return table_row(cells) + "\n" + table_row(["---"] * len(cells))


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# -------------------------------------------------------------------------------------------- targets


Target = tuple[str, str, str, str]


def check(what: str, measured: str, ok: bool, shortfall: str) -> Target:
    return (what, measured, "**met**" if ok else "**missed**", "" if ok else shortfall)


def _median(row: dict[str, Any] | None, broker: str, key: str) -> float | None:
    if row is None or broker not in row["brokers"]:
        return None
    value = row["brokers"][broker]["median"].get(key)
    return float(value) if value is not None else None


def fanin_targets(fanin: list[dict[str, Any]]) -> list[Target]:
    out: list[Target] = []
    by = {(r["subs"], r["qos"]): r for r in fanin}
    top = max((r["subs"] for r in fanin), default=0)
    for qos in sorted({r["qos"] for r in fanin}):
        a, b = _median(by.get((0, qos)), "ota", "rate"), _median(by.get((top, qos)), "ota", "rate")
        if top and a and b is not None:
            share = b / a
            out.append(
                check(
                    f"fan-in QoS {qos} at {top:,} subscribed devices "
                    "\N{GREATER-THAN OR EQUAL TO} 90 % of the rate at 0",
                    f"{b:,.0f} vs {a:,.0f} msg/s = {share:.1%}",
                    share >= 0.9,
                    f"{0.9 / share:,.1f}{TIMES} short of 90 %" if share else "nothing delivered",
                )
            )
    for subs in sorted({0, top}):
        for qos in (0, 1):
            row = by.get((subs, qos))
            if row is None or "ota" not in row["brokers"]:
                continue
            ota = row["brokers"]["ota"]["median"]
            ota_lossy = bool(ota.get("sent")) and (ota.get("received") or 0) < 0.99 * ota["sent"]
            # Lossless ota-broker against lossless Mosquitto; one that drops (its default QoS 1 queue
            # limits) against Mosquitto's defaults, which drop the same way.
            nolimit = qos == 1 and not ota_lossy and "mosquitto_nolimit" in row["brokers"]
            yard = "mosquitto_nolimit" if nolimit else "mosquitto"
            if yard not in row["brokers"]:
                continue
            r = pairwise(row["brokers"]["ota"]["runs"], row["brokers"][yard]["runs"], "cpu_us_per_msg")
            ota_cpu, mosq_cpu = _median(row, "ota", "cpu_us_per_msg"), _median(row, yard, "cpu_us_per_msg")
            if r is None or ota_cpu is None or mosq_cpu is None:
                continue
            measured = f"{ota_cpu:.1f} vs {mosq_cpu:.1f} \N{MICRO SIGN}s ({label(yard)}) = {r:,.1f}{TIMES}"
            note = ""
            if ota_lossy:
                dropped = 1 - (ota.get("received") or 0) / ota["sent"]
                note = f"ota-broker dropped {dropped:.0%} of the messages"
                if "mosquitto_nolimit" in row["brokers"]:
                    strict = pairwise(
                        row["brokers"]["ota"]["runs"],
                        row["brokers"]["mosquitto_nolimit"]["runs"],
                        "cpu_us_per_msg",
                    )
                    if strict is not None:
                        note += f"; against lossless Mosquitto {strict:,.1f}{TIMES}"
            ok = r <= 12
            out.append(
                (
                    f"broker CPU per routed message \N{LESS-THAN OR EQUAL TO} 12{TIMES} Mosquitto's, "
                    f"QoS {qos}, {subs:,} subscriptions",
                    measured,
                    ("**met**" if ok else "**missed**") + (" (see note)" if note else ""),
                    "; ".join(x for x in ("" if ok else f"{r / 12:,.1f}{TIMES} over", note) if x),
                )
            )
    return out


def fleet_targets(fleet: list[dict[str, Any]]) -> list[Target]:
    out: list[Target] = []
    le = "\N{LESS-THAN OR EQUAL TO}"
    for row in fleet:
        n = row["devices"]
        if "ota" not in row["brokers"]:
            continue
        m = row["brokers"]["ota"]["median"]
        runs = row["brokers"]["ota"]["runs"]
        if any("fanout_complete" in r for r in runs):
            t = m.get("fanout_s")
            if t is None:
                partial = max((r.get("fanout_partial_s") or 0 for r in runs), default=0)
                out.append(
                    check(
                        f"notices to {n:,} connected devices {le} 1 s",
                        f"incomplete after {partial:.1f} s",
                        False,
                        "",
                    )
                )
            else:
                out.append(
                    check(
                        f"notices to {n:,} connected devices {le} 1 s",
                        f"{t:.2f} s",
                        t <= 1,
                        f"{t:,.1f}{TIMES} over",
                    )
                )
        t = m.get("connect_s")
        out.append(
            check(
                f"{n:,} devices connected and subscribed {le} 10 s",
                f"{t:.1f} s" if t is not None else "not all connected",
                t is not None and t <= 10,
                f"{(t or 0) / 10:,.1f}{TIMES} over" if t is not None else "",
            )
        )
        kib = m.get("rss_per_client_kib")
        if kib is not None:
            kb = kib * 1.024
            out.append(
                check(
                    f"{le} 20 KB per connected device (at {n:,})",
                    f"{kb:.1f} KB ({kib:.1f} KiB)",
                    kb <= 20,
                    f"{kb / 20:,.1f}{TIMES} over",
                )
            )
    return out


def https_targets(https: dict[str, Any] | None) -> list[Target]:
    if not https or "ota" not in https["servers"] or "nginx" not in https["servers"]:
        return []
    s = https["servers"]
    out: list[Target] = []
    r = pairwise(s["ota"]["runs"], s["nginx"]["runs"], "mb_per_s")
    cpu = s["ota"]["median"]["cpu_s_per_gb"]
    if r is not None:
        out.append(
            check(
                f"built-in HTTPS \N{GREATER-THAN OR EQUAL TO} 0.85{TIMES} nginx throughput",
                f"{r:.2f}{TIMES}",
                r >= 0.85,
                f"{0.85 / r:,.1f}{TIMES} short",
            )
        )
    if cpu is not None:
        out.append(
            check(
                "built-in HTTPS \N{LESS-THAN OR EQUAL TO} 1.5 s CPU per GB",
                f"{cpu:.2f} s/GB",
                cpu <= 1.5,
                f"{cpu / 1.5:,.1f}{TIMES} over",
            )
        )
    return out


def targets(results: dict[str, Any]) -> str:
    rows = fanin_targets(results.get("fanin") or [])
    rows += fleet_targets(results.get("fleet") or [])
    rows += https_targets(results.get("https"))
    lines = [table_head(["target (ota-broker)", "measured", "verdict", "by how much"])]
    lines += [table_row(list(r)) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- whole


def merge(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several results files as one: each stage from the last file that has it; every run's meta kept."""
    merged: dict[str, Any] = {"meta": dict(docs[0].get("meta", {}))}
    for doc in docs:
        for stage in ("fanin", "fleet", "https"):
            if doc.get(stage):
                merged[stage] = doc[stage]
    if len(docs) > 1:
        merged["meta"]["runs"] = [d.get("meta", {}) for d in docs]
        merged["meta"]["uptime_end"] = docs[-1].get("meta", {}).get("uptime_end", "?")
    return merged


def markdown(results: dict[str, Any], chart: Path | None) -> str:
    meta = results.get("meta", {})
    out = ["## Run", ""]
    out.append(f"- machine: {meta.get('machine', '?')}")
    versions = meta.get("versions", {})
    if versions:
        out.append("- versions: " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    for run in meta.get("runs") or [meta]:
        error = f"; stopped: {run['error']}" if run.get("error") else ""
        git = run.get("git", {})
        dirty = ", ".join(git.get("dirty", [])) or "none"
        out.append(
            f"- `{run.get('command', '?')}`: started {run.get('started', '?')}, "
            f"took {fmt(run.get('duration_s'), 0)} s{error}"
        )
        out.append(f"  - ota-broker run from: {run.get('ota_source', '?')}")
        out.append(f"  - repository at {git.get('commit', '?')}, uncommitted changes in: {dirty}")
        out.append(f"  - load: `{run.get('uptime_start', '?')}` → `{run.get('uptime_end', '?')}`")
    out.append("")
    if results.get("fanin"):
        out += ["### 1. Fan-in: 10 publishers → 1 subscriber on `/ota/device/progress/#`", ""]
        out += [
            "Idle subscriptions are held by idle connected clients, one exact filter "
            "`/ota/device/upgrade/pk/devN` each. Medians of the repetitions; ratios are medians of the "
            "per-repetition ratios.",
            "",
        ]
        out += [fanin_table(results["fanin"]), "", fanin_detail(results["fanin"]), ""]
        if chart is not None:
            out += [f"Chart: `{chart}`", ""]
    if results.get("fleet"):
        out += [
            f"### 2{DASH}4. Fleet: connect + subscribe N devices, one message to each, memory per client",
            "",
        ]
        out += [fleet_table(results["fleet"]), ""]
    if results.get("https"):
        out += ["### 5. HTTPS download, concurrent curl --http1.1 clients", ""]
        out += [https_table(results["https"]), ""]
    out += ["### Targets", "", targets(results), ""]
    return "\n".join(out)


def ota_label(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    source = str(meta.get("ota_source", ""))
    if source.startswith("snapshot"):  # the working tree: its commit, plus edits if it had any
        git = meta.get("git", {})
        edited = any(p.split("/")[0] in ("broker", "plugins", "firmware_store") for p in git.get("dirty", []))
        return f"ota-broker @ {git.get('commit', '?')}" + (" + edits" if edited else "")
    commit = source.split(" = ", 1)[1].split(" ", 1)[0] if " = " in source else ""
    return f"ota-broker @ {commit}" if commit else "ota-broker (earlier run)"


def chart(results: dict[str, Any], path: Path, compare: list[dict[str, Any]] | None = None) -> Path | None:
    """Fan-in msg/s against the number of subscribed devices, per broker (QoS 0 solid, QoS 1 dashed);
    `compare`: earlier runs whose ota-broker curves are drawn too, for before/after."""
    rows = results.get("fanin") or []
    if not rows:
        return None
    import matplotlib  # noqa: PLC0415 - only the report needs it (an optional `bench` dependency)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(10.5, 5), dpi=110)
    colors = {
        "amqtt": "tab:red",
        "ota": "tab:blue",
        "mosquitto": "tab:green",
        "mosquitto_nolimit": "tab:olive",
        "ota_before0": "tab:purple",
        "ota_before1": "tab:cyan",
        "ota_before2": "tab:brown",
    }
    series = [(name, name, rows, label(name)) for name in rows[0]["brokers"]]
    earlier = [c for c in compare or [] if c.get("fanin") and "ota" in c["fanin"][0]["brokers"]]
    for i, other in enumerate(earlier):
        series.append(("ota", f"ota_before{i}", other["fanin"], ota_label(other)))
    if earlier:
        series = [(n, k, r, ota_label(results) if k == "ota" else lab) for n, k, r, lab in series]
    for qos in sorted({r["qos"] for r in rows}):
        for name, key, data, name_label in series:
            points = sorted(
                (r["subs"], r["brokers"][name]["median"]["rate"])
                for r in data
                if r["qos"] == qos and r["brokers"][name]["median"]["rate"]
            )
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            lossy = any(
                (m := r["brokers"][name]["median"])["sent"] and m["received"] < 0.99 * m["sent"]
                for r in data
                if r["qos"] == qos
            )
            ax.plot(
                xs,
                ys,
                marker="o",
                linestyle="-" if qos == 0 else "--",
                color=colors.get(key),
                label=f"{name_label} QoS {qos}" + (" (drops messages)" if lossy else ""),
            )
    ax.set_xscale("symlog", linthresh=1000)
    ax.set_yscale("log")
    ticks = sorted({r["subs"] for r in rows})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:,}" for t in ticks])
    ax.set_xlabel("subscribed idle devices (one exact filter each)")
    ax.set_ylabel("messages/s delivered (10 publishers → 1 subscriber)")
    ax.set_title("MQTT fan-in rate against subscribed devices")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_result(result: dict[str, Any], out: Path | None) -> None:
    """A standalone bench script's result: JSON on stdout, and in `out` when given."""
    text = json.dumps(result, indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)

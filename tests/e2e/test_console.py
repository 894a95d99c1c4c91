"""The operator's web console in a real headless browser (Playwright driving Debian's Chromium) against a
real broker in this process, with real MQTT devices; and the console's server side: its CSP, the event
stream's authentication, the overview endpoint.

Screenshots of every page land in `test-artifacts/console/`. Without Chromium (or Playwright) the
browser tests are skipped, or fail when `CI` is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from plugins.ota.http.events import STREAMS, Tickets
from tests.support import TOKEN, Device, Env, eventually, reporting

CHROMIUM = os.environ.get("OTA_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
FIRMWARE = os.urandom(1_500_000)
UI_WAIT_MS = 15_000


def _browser_missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright)"
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        return f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture
async def page(env: Env) -> AsyncIterator[Any]:
    """A fresh browser page whose base URL is the broker's admin listener."""
    missing = _browser_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; the console tests must run in CI")
        pytest.skip(missing)
    from playwright.async_api import async_playwright

    host, port = env.running.admin_address
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                base_url=f"http://{host}:{port}", viewport={"width": 1280, "height": 900}
            )
            pg = await context.new_page()
            pg.set_default_timeout(UI_WAIT_MS)
            problems: list[str] = []
            pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            pg.on(
                "console",
                lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
            )
            pg.problems = problems  # type: ignore[attr-defined]
            yield pg
            await context.close()
        finally:
            await browser.close()


RED, GREEN = "rgb(164, 20, 29)", "rgb(11, 107, 46)"  # the console's --bad and --good


async def shot(page: Any, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def respond(env: Env, d: Device, go: asyncio.Event, *, fail_first: bool = False) -> None:
    """A device that downloads what its notice names, reports progress, waits for `go`, then either
    installs the new version or (fail_first) reports a download failure and succeeds on the next notice."""
    [notice] = await d.notices()
    status, _, body = await env.download(notice["data"]["url"])
    assert status == 200 and hashlib.md5(body).hexdigest() == notice["data"]["md5"]
    await d.progress("40", "downloading")
    await go.wait()
    if fail_first:
        await d.progress("-2", "timeout after 30 s")
        await d.wait_messages(d.upgrade_topic, 2, timeout=30)
        await d.progress("70", "flashing")
    else:
        await d.progress("100", "flashing")
    await d.inform(notice["data"]["version"])


async def test_operator_upgrades_a_fleet_in_the_console(env: Env, page: Any) -> None:
    """Sign in, upload firmware, start a job with options, watch it live (pause, resume, a failure and
    its reason, re-run failed) until 100 % and completed; the device list and a device's history."""
    from playwright.async_api import expect

    devices = [await reporting(env, n) for n in ("dev1", "dev2", "dev3")]

    # Sign-in, by keyboard: the skip link comes first, the token field has the focus.
    await page.goto("/")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.url.endswith("/console/")
    assert await page.evaluate("document.activeElement.id") == "token"
    await page.keyboard.press("Shift+Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.keyboard.press("Tab")
    await page.keyboard.type(TOKEN)
    await shot(page, "1-sign-in")
    await page.keyboard.press("Enter")

    # Overview: three devices online on 1.0.0.
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('ota-broker.token')") == TOKEN
    assert await page.evaluate("localStorage.length") == 0
    await expect(page.locator(".stat", has_text="Devices online").locator("dd")).to_have_text("3")
    chart = page.get_by_role("table", name="pk / default")
    await expect(chart.get_by_role("row", name="1.0.0")).to_contain_text("3")
    await shot(page, "2-overview")

    # Firmware: upload with progress; the page shows the hashes the server computed.
    await page.get_by_role("link", name="Firmware", exact=True).click()
    await page.get_by_label("Firmware file").set_input_files(
        files=[{"name": "fw-2.0.0.bin", "mimeType": "application/octet-stream", "buffer": FIRMWARE}]
    )
    await page.get_by_label("Product key").fill("pk")
    await page.get_by_label("Version", exact=True).fill("2.0.0")
    await page.get_by_label("Sign method").select_option("SHA256")
    await page.get_by_role("button", name="Upload").click()
    result = page.locator("#upload-result")
    await expect(result).to_contain_text(hashlib.sha256(FIRMWARE).hexdigest())
    await expect(result).to_contain_text(hashlib.md5(FIRMWARE).hexdigest())
    await expect(result).to_contain_text("no verification needed")
    await expect(page.locator("#upload-percent")).to_have_text("100 %")
    assert await page.locator("#upload-progress").evaluate("p => p.value") == 100
    [fw] = await env.api("GET", "/firmware", expect=200)
    assert fw["sign_method"] == "SHA256" and fw["size"] == len(FIRMWARE)
    await expect(page.get_by_role("table", name="All firmware")).to_contain_text("2.0.0")
    await shot(page, "3-firmware")

    # A job with options from every group of the form.
    await page.get_by_role("link", name=f"Verify firmware {fw['id']}").click()
    await expect(page.get_by_role("heading", name="New job")).to_be_visible()
    await expect(page.get_by_label("Firmware", exact=True)).to_have_value(str(fw["id"]))
    await expect(page.get_by_label("Type")).to_have_value("verify")
    await page.get_by_label("Type").select_option("static")
    await page.get_by_label("Devices", exact=True).fill("pk/dev1\npk/dev2\npk/dev3")
    await page.get_by_label("Only from versions").fill("1.0.0")
    await page.get_by_label("Gray release (% of matched devices)").fill("100")
    await page.get_by_label("Timeout (minutes)").fill("10")
    await page.get_by_label("Notices per minute").fill("6000")
    await page.get_by_label("Phases (% of devices)").fill("100")
    await page.get_by_label("Next phase at success (%)").fill("90")
    await page.get_by_label("Tags").fill("ring=canary\nticket=OPS-1")
    await shot(page, "4-job-create")
    go = asyncio.Event()
    responders = [asyncio.create_task(respond(env, d, go, fail_first=d.dn == "dev3")) for d in devices]
    try:
        await page.get_by_role("button", name="Start job").click()
        await expect(page.get_by_role("heading", name="Job #1")).to_be_visible()
        job = await env.api("GET", "/jobs/1", expect=200)
        assert job["options"]["src_versions"] == ["1.0.0"] and job["options"]["timeout_minutes"] == 10
        assert job["options"]["tags"] == {"ring": "canary", "ticket": "OPS-1"}
        assert job["options"]["rate_per_minute"] == 6000 and job["options"]["gray_percent"] == 100
        assert (
            job["options"]["rollout"]["phases"] == [100]
            and job["options"]["rollout"]["success_threshold"] == 90
        )

        # Live: what the devices report shows up without reloading, through the event stream only.
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        await expect(page.locator("#live-state")).to_have_text("live")
        for d in devices:
            await expect(page.locator(f'tr[data-device="{d.ref}"]')).to_contain_text("40 %")
        await expect(page.locator("#job-state")).to_contain_text("running")
        await expect(page.locator("#job-firmware")).to_have_text("pk / default 2.0.0 (#1)")
        # A running job's card says progress, and cancelling does not look like pausing.
        await expect(page.locator("#job-progress-label")).to_have_text("Progress")
        await expect(page.get_by_role("button", name="Cancel job")).to_have_class("danger")
        await expect(page.get_by_role("button", name="Pause")).not_to_have_class("danger")

        await page.get_by_role("button", name="Pause").click()
        await expect(page.locator("#job-state")).to_contain_text("paused")
        await page.get_by_role("button", name="Resume").click()
        await expect(page.locator("#job-state")).to_contain_text("running")

        go.set()
        await expect(page.locator("#job-state")).to_contain_text("completed")
        await expect(page.locator("#job-percent")).to_have_text("100 % (3 of 3 finished)")
        failed_row = page.locator('tr[data-device="pk/dev3"]')
        await expect(failed_row).to_contain_text("failed")
        await expect(failed_row).to_contain_text("download failed: timeout after 30 s")
        await expect(page.locator('#job-counts dd[data-state="failed"]')).to_have_text("1")
        # A failure shows: the job's bar has a red part a third long, said in words too; the failed
        # task's own bar is red, not a full blue one.
        bar = page.get_by_role("img", name="Tasks of job 1")
        await expect(bar).to_have_attribute("aria-label", "Tasks of job 1: 2 succeeded, 1 failed")
        failed_part = bar.locator('[data-part="failed"]')
        await expect(failed_part).to_have_attribute("data-count", "1")
        assert await failed_part.evaluate("e => getComputedStyle(e).backgroundColor") == RED
        share = await failed_part.evaluate(
            "e => e.getBoundingClientRect().width / e.parentElement.clientWidth"
        )
        assert abs(share - 1 / 3) < 0.02, share
        assert (
            await bar.locator('[data-part="succeeded"]').evaluate("e => getComputedStyle(e).backgroundColor")
            == GREEN
        )
        await expect(page.locator("#job-bar ~ .legend .key-failed")).to_have_text("1 failed")
        # and over time: the chart of the finished job
        await expect(page.get_by_role("img", name="Upgrades over time")).to_have_attribute(
            "aria-label", re.compile(r"^Upgrades over time: 2 succeeded and 1 failed of 3, over \d+ minute")
        )
        failed_bar = failed_row.get_by_role("progressbar")
        assert await failed_bar.evaluate("e => getComputedStyle(e).accentColor") == RED
        await expect(page.locator("#live-state")).to_have_text("final: no more changes")
        await shot(page, "5-live-job-failure")

        await page.get_by_role("button", name="Re-run failed").click()
        await expect(page.locator('#job-counts dd[data-state="succeeded"]')).to_have_text("3")
        await expect(page.locator("#job-state")).to_contain_text("completed")
        await expect(page.locator("#job-percent")).to_have_text("100 % (3 of 3 finished)")
        await expect(bar).to_have_attribute("aria-label", "Tasks of job 1: 3 succeeded")
        for d in devices:
            row = page.locator(f'tr[data-device="{d.ref}"]')
            await expect(row).to_contain_text("succeeded")
            await expect(row.get_by_role("progressbar")).to_have_attribute("value", "100")
        await asyncio.gather(*responders)
        await shot(page, "5-live-job-completed")
        # No polling: the page's requests while it was live are the actions and the event streams.
        api_calls = [u for u in requests if "/api/v1/" in u]
        assert len(api_calls) <= 12, api_calls
        assert sum("/events?ticket=" in u for u in api_calls) <= 3, api_calls
    finally:
        for r in responders:
            r.cancel()
        await asyncio.gather(*responders, return_exceptions=True)

    # The jobs list names each job's firmware, not its number.
    await page.get_by_role("link", name="Jobs", exact=True).click()
    await expect(page.get_by_role("table", name="Jobs, newest first")).to_contain_text("pk / default 2.0.0")
    await expect(page.get_by_role("img", name="Job 1")).to_have_attribute("aria-label", "Job 1: 3 succeeded")

    # Devices: search by product and name; all on 2.0.0 now.
    await page.get_by_role("link", name="Devices", exact=True).click()
    await page.get_by_label("Product key").fill("pk")
    await page.get_by_label("Name contains").fill("dev")
    await page.get_by_label("Connection").select_option("true")
    await page.get_by_role("button", name="Search").click()
    table = page.get_by_role("table", name="Devices")
    await expect(table.locator("tbody tr")).to_have_count(3)
    await expect(table).to_contain_text("default: 2.0.0")
    await page.get_by_label("Name contains").fill("dev3")
    await page.get_by_label("Name contains").press("Enter")
    await expect(table.locator("tbody tr")).to_have_count(1)
    # Searched by the broker (not in the page over its first 1,000), in any case, with the total.
    await expect(page.get_by_role("status").filter(has_text="device(s)")).to_contain_text("1 device(s).")
    assert any("name=dev3" in u for u in requests), [u for u in requests if "/devices?" in u]
    await page.get_by_label("Product key").fill("")
    await page.get_by_label("Name contains").fill("PK/DEV3")
    await page.get_by_label("Name contains").press("Enter")
    await expect(table.locator("tbody tr")).to_have_count(0)  # the product key is not "PK"
    await page.get_by_label("Name contains").fill("pk/DEV3")
    await page.get_by_label("Name contains").press("Enter")
    await expect(table.locator("tbody tr")).to_have_count(1)
    await shot(page, "6-devices")

    # A device page: its module versions and its task with the history (the failure and the retry).
    await table.get_by_role("link", name="pk/dev3").click()
    await expect(page.get_by_role("heading", name="pk/dev3")).to_be_visible()
    await expect(page.locator("#modules")).to_contain_text("2.0.0")
    tasks = page.locator("#device-tasks")
    await expect(tasks).to_contain_text("succeeded")
    await page.get_by_role("button", name="History of the task in job 1").click()
    history = page.get_by_role("table", name="State changes and progress reports")
    await expect(history).to_contain_text("failed")
    await expect(history).to_contain_text("succeeded")
    await shot(page, "7-device")

    await page.get_by_role("link", name="Overview").click()
    await expect(
        page.get_by_role("table", name="pk / default").get_by_role("row", name="2.0.0")
    ).to_contain_text("3")
    await expect(page.get_by_role("table", name="Newest failed or timed-out tasks")).to_have_count(0)
    # and over time: the three upgrades to 2.0.0 of the last 30 days
    await expect(page.get_by_role("img", name="Devices per version of pk / default")).to_have_attribute(
        "aria-label", "Devices per version of pk / default over 30 days, now 2.0.0: 3, others: 0"
    )
    await shot(page, "7-overview-over-time")

    # The job is over, so its firmware may go (after the browser's confirmation).
    await page.get_by_role("link", name="Firmware", exact=True).click()
    page.once("dialog", lambda dialog: dialog.accept())
    await page.get_by_role("button", name=f"Delete firmware {fw['id']}").click()
    await expect(page.get_by_text("No firmware yet.")).to_be_visible()
    assert await env.api("GET", "/firmware", expect=200) == []
    assert page.problems == []


async def test_wrong_token_and_expired_session_show_sign_in(env: Env, page: Any) -> None:
    """A wrong token is refused with a message; a session whose token stops working returns to sign-in."""
    from playwright.async_api import expect

    await page.goto("/console/")
    await page.get_by_label("Admin token").fill("not-the-token")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_have_text("Wrong token: the broker did not accept it.")
    assert await page.evaluate("sessionStorage.getItem('ota-broker.token')") is None
    await expect(page.get_by_role("navigation", name="Main")).to_be_hidden()

    await page.evaluate("sessionStorage.setItem('ota-broker.token', 'stale')")
    await page.goto("/console/#/jobs")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    await expect(page.get_by_role("alert")).to_contain_text("not accepted")
    assert await page.evaluate("sessionStorage.getItem('ota-broker.token')") is None

    await page.get_by_label("Admin token").fill(TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Jobs")).to_be_visible()  # back where it was going
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0
    assert [p for p in page.problems if "401" not in p] == []


# ------------------------------------------------------------------------------- server side, no browser


def _origin(env: Env) -> str:
    host, port = env.running.admin_address
    return f"http://{host}:{port}"


async def test_console_pages_carry_a_strict_csp(env: Env) -> None:
    """`/` redirects to the console; its files are public, typed and carry a CSP without inline scripts."""
    origin = _origin(env)
    async with env.http.get(origin + "/", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "/console/"
    for path, kind in (
        ("/console/", "text/html"),
        ("/console/index.html", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/style.css", "text/css"),
    ):
        async with env.http.get(origin + path) as r:
            body = await r.read()
            assert r.status == 200 and r.content_type == kind, path
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src 'self';" in csp and "unsafe" not in csp
            assert "frame-ancestors 'none'" in csp and r.headers["X-Content-Type-Options"] == "nosniff"
            etag = r.headers["ETag"]
        async with env.http.get(origin + path, headers={"If-None-Match": etag}) as r:
            assert r.status == 304
        if kind == "text/html":
            assert b"<script src=" in body and b"<script>" not in body and b" on" + b"click=" not in body
    for path in ("/console/../api/v1/devices", "/console/nope.js", "/console/admin.token"):
        async with env.http.get(origin + path) as r:
            assert r.status in (401, 404), path
            assert b"[" not in await r.read()


async def _events(env: Env, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, list[Any]]:
    """GET an event stream to its end (bounded): status, content type, the (event, data) pairs."""
    async with env.http.get(_origin(env) + "/api/v1" + path, headers=headers or {}) as r:
        if r.status != 200:
            return r.status, r.content_type, [await r.json()]
        events: list[Any] = []
        text = (await asyncio.wait_for(r.read(), 10)).decode()
        for block in text.split("\n\n"):
            fields = dict(
                line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != ":"
            )
            if "event" in fields:
                events.append((fields["event"], json.loads(fields["data"])))
        return r.status, r.content_type, events


async def test_event_stream_refuses_without_auth(env: Env) -> None:
    """The job stream needs the bearer token or a fresh ticket; a ticket opens nothing else; a final job's
    stream is one snapshot then `end`."""
    d = await reporting(env, "dev1")
    fw = await env.upload(FIRMWARE[:1000])
    job = await env.job(fw["id"], [d.ref])
    await env.api("POST", f"/jobs/{job['id']}/cancel", expect=200)
    path = f"/jobs/{job['id']}/events"

    for query in ("", "?ticket=", "?ticket=123.abc", f"?ticket={TOKEN}", "?ticket=9999999999.00"):
        status, _, [doc] = await _events(env, path + query)
        assert status == 401 and doc["error"] == "unauthorized", query
    status, _, _ = await _events(env, path, {"Authorization": "Bearer wrong"})
    assert status == 401

    ticket = await env.api("POST", "/tickets", expect=201)
    assert set(ticket) == {"ticket", "expires_at", "scope"}
    async with env.http.get(f"{env.admin}/jobs?ticket={ticket['ticket']}") as r:
        assert r.status == 401  # a ticket is for the event stream only
    async with env.http.post(f"{env.admin}/tickets?ticket={ticket['ticket']}") as r:
        assert r.status == 401

    status, kind, events = await _events(env, f"{path}?ticket={ticket['ticket']}")
    assert status == 200 and kind == "text/event-stream"
    assert [e for e, _ in events] == ["snapshot", "end"]
    snapshot = events[0][1]
    assert snapshot["job"]["state"] == "cancelled" and snapshot["tasks"][0]["device"] == "pk/dev1"
    assert snapshot["tasks_total"] == 1

    status, _, events = await _events(env, path, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and [e for e, _ in events] == ["snapshot", "end"]
    status, _, [doc] = await _events(env, "/jobs/99/events", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 404

    # A ticket is short-lived: one issued more than 60 s ago is refused (the API's clock is the service's).
    old, _ = Tickets(TOKEN).issue(env.service.clock() - 61)
    status, _, _ = await _events(env, f"{path}?ticket={old}")
    assert status == 401


async def test_event_stream_pushes_changes_and_ends_with_the_job(env: Env) -> None:
    """A running job's stream sends a snapshot on each change (not on a timer), and `end` when it completes."""
    d = await reporting(env, "dev1")
    fw = await env.upload(FIRMWARE[:1000])
    job = await env.job(fw["id"], [d.ref])
    await d.notices()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    started = time.monotonic()
    async with env.http.get(f"{env.admin}/jobs/{job['id']}/events", headers=headers) as r:
        assert r.status == 200 and r.headers["Cache-Control"].startswith("no-cache")
        seen: list[tuple[str, Any]] = []

        async def read_events() -> None:
            event = None
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event:
                    seen.append((event, json.loads(line.removeprefix("data: "))))

        reader = asyncio.create_task(read_events())
        await eventually(lambda: seen, what="the first snapshot")
        await asyncio.sleep(1.2)  # nothing changes: nothing is sent
        assert len(seen) == 1 and seen[0][1]["tasks"][0]["state"] == "notified"
        await d.progress("50", "downloading")
        await eventually(lambda: len(seen) >= 2, what="a snapshot after the progress report")
        assert seen[-1][1]["tasks"][0]["progress"] == 50
        await d.inform("2.0.0")
        await asyncio.wait_for(reader, 10)
    assert seen[-1][0] == "end" and seen[-2][1]["job"]["state"] == "completed"
    assert time.monotonic() - started < 10


async def test_event_stream_ends_when_the_client_leaves(env: Env) -> None:
    """A client that goes away ends its stream at the next check (the server does not write forever)."""
    d = await reporting(env, "dev1")
    fw = await env.upload(FIRMWARE[:1000])
    job = await env.job(fw["id"], [d.ref])
    admin = env.running.plugin.runtime.admin_api
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with env.http.get(f"{env.admin}/jobs/{job['id']}/events", headers=headers) as r:
        assert (await r.content.readuntil(b"\n\n")).startswith(b"retry:")
        assert (await r.content.readuntil(b"\n\n")).startswith(b"event: snapshot")
        assert admin[STREAMS].open == 1
        r.close()
    await eventually(lambda: admin[STREAMS].open == 0, timeout=5, what="the stream to end")


async def test_overview_counts_devices_versions_jobs_and_failures(env: Env) -> None:
    """GET /overview: devices online/offline, devices per product/module/version, unfinished jobs, the
    newest failures with their reason."""
    a = await reporting(env, "a")
    b = await reporting(env, "b")
    await b.inform("0.9", module="MCU")
    c = await reporting(env, "c")
    c.disconnect()
    await eventually(lambda: _offline(env, "pk/c"), what="pk/c offline")
    fw = await env.upload(FIRMWARE[:1000])
    job = await env.job(fw["id"], [a.ref, b.ref])
    await a.notices()
    await a.progress("-3", "bad signature")
    await env.task_state(job["id"], a.ref, "failed")

    doc = await env.api("GET", "/overview", expect=200)
    assert doc["devices"] == {"total": 3, "online": 2, "offline": 1}
    assert {(v["module"], v["version"]): v["devices"] for v in doc["versions"]} == {
        ("default", "1.0.0"): 3,
        ("MCU", "0.9"): 1,
    }
    assert doc["jobs"]["by_state"] == {"running": 1} and doc["jobs"]["active"][0]["id"] == job["id"]
    [failure] = doc["recent_failures"]
    assert failure["device"] == "pk/a" and failure["desc"] == "verification failed: bad signature"
    assert doc["partial"] is False
    async with env.http.get(env.admin + "/overview") as r:
        assert r.status == 401


async def _offline(env: Env, ref: str) -> bool:
    found = await env.find(f"/devices/{ref}")
    return found is not None and not found["online"]


async def test_a_package_and_a_job_over_mqtt_in_the_console(env: Env, page: Any) -> None:
    """Several files chosen in the upload form make one package, listed as such with each file's digests;
    the job form sends the download protocol and the notice timeout."""
    from playwright.async_api import expect

    await reporting(env, "dev1")
    await page.goto("/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.keyboard.press("Enter")
    await page.get_by_role("link", name="Firmware", exact=True).click()
    parts = {"app.bin": b"a" * 3000, "dsp.bin": b"d" * 2000}
    await page.get_by_label("Firmware file(s)").set_input_files(
        files=[{"name": n, "mimeType": "application/octet-stream", "buffer": b} for n, b in parts.items()]
    )
    await page.get_by_label("Product key").fill("pk")
    await page.get_by_label("Version", exact=True).fill("2.0.0")
    await page.get_by_role("button", name="Upload").click()
    files = page.get_by_role("table", name="Files of firmware 1")
    await expect(files.get_by_role("row", name="dsp.bin")).to_contain_text(
        hashlib.md5(parts["dsp.bin"]).hexdigest()
    )
    await expect(page.get_by_role("table", name="All firmware")).to_contain_text("2 files")

    await page.get_by_role("link", name="New job for firmware 1").click()
    await page.get_by_label("Devices", exact=True).fill("pk/dev1")
    await page.get_by_label("Download over").select_option("mqtt")
    await page.get_by_label("Timeout after the notice (minutes)").fill("30")
    await page.get_by_role("button", name="Start job").click()
    await expect(page.get_by_role("heading", name="Job #1")).to_be_visible()
    options = (await env.api("GET", "/jobs/1", expect=200))["options"]
    assert (options["download_protocol"], options["notify_timeout_minutes"]) == ("mqtt", 30)


async def test_a_job_shows_whom_it_notifies_and_a_whole_product_is_confirmed(env: Env, page: Any) -> None:
    """Before a job starts the console shows how many devices it notifies and a sample of them; a job for
    the whole product (or for many devices) starts only once the operator confirms it, and starts exactly
    the devices previewed. Devices can be picked from a CSV file."""
    from playwright.async_api import expect

    for name in ("d1", "d2", "d3"):
        await reporting(env, name)
    fw = await env.upload(FIRMWARE, version="2.0.0")
    await page.goto("/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.keyboard.press("Enter")
    await page.goto(f"/console/#/jobs/new?firmware={fw['id']}")
    await expect(page.get_by_role("heading", name="New job")).to_be_visible()
    # the firmware's whole name shows in its box
    select = page.get_by_label("Firmware", exact=True)
    fits = """e => {
        const pen = document.createElement('canvas').getContext('2d');
        const style = getComputedStyle(e);
        pen.font = `${style.fontWeight} ${style.fontSize} ${style.fontFamily}`;
        return pen.measureText(e.options[e.selectedIndex].text).width + 24 <= e.clientWidth;
    }"""
    assert await select.evaluate(fits), "the firmware's name is cut off in its box"

    # The device box left empty: the whole product. Declined, nothing starts; the preview stays.
    asked: list[str] = []

    async def decline(dialog: Any) -> None:
        asked.append(dialog.message)
        await dialog.dismiss()

    page.once("dialog", decline)
    await page.get_by_role("button", name="Start job").click()
    await expect(page.get_by_role("status").filter(has_text="not started")).to_have_text(
        "The job was not started."
    )
    assert asked == [
        "Start this job? It notifies 3 device(s) (every device of product pk) with default 2.0.0."
    ]
    await expect(page.locator("#job-preview-count")).to_have_text(
        "3 device(s) of 3 matched (every device of product pk) get default 2.0.0."
    )
    sample = page.get_by_role("table", name="A sample of 3 of 3")
    await expect(sample.locator("tbody tr")).to_have_count(3)
    await shot(page, "8-job-preview-confirm")
    assert await env.api("GET", "/jobs", expect=200) == []

    # Devices from a CSV file; a short list starts without asking.
    await page.get_by_label("Devices from a file").set_input_files(
        files=[
            {
                "name": "canary.csv",
                "mimeType": "text/csv",
                "buffer": b"product_key,device_name\r\npk,d1\r\npk,d3\r\n",
            }
        ]
    )
    await expect(page.get_by_label("Devices", exact=True)).to_have_value("pk/d1\npk/d3")
    # and by a search the broker makes over the product (one already listed is not added twice)
    await page.get_by_label("Find devices (name contains)").fill("D")
    await page.get_by_role("button", name="Add matching devices").click()
    await expect(page.get_by_label("Devices", exact=True)).to_have_value("pk/d1\npk/d3\npk/d2")
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#job-preview-count")).to_have_text(
        "3 device(s) of 3 matched (the devices listed) get default 2.0.0."
    )
    await page.get_by_role("button", name="Start job").click()
    await expect(page.get_by_role("heading", name="Job #1")).to_be_visible()
    tasks = await env.api("GET", "/jobs/1/tasks", expect=200)
    assert sorted(t["device"] for t in tasks) == ["pk/d1", "pk/d2", "pk/d3"]

    # The whole product, confirmed this time: the job starts.
    await env.api("POST", "/jobs/1/cancel", expect=200)
    await page.goto(f"/console/#/jobs/new?firmware={fw['id']}")
    page.once("dialog", lambda dialog: dialog.accept())
    await page.get_by_role("button", name="Start job").click()
    await expect(page.get_by_role("heading", name="Job #2")).to_be_visible()
    assert len(await env.api("GET", "/jobs/2/tasks", expect=200)) == 3
    assert page.problems == []


async def test_an_operator_signs_in_with_an_account_and_an_admin_reads_the_audit_log(
    env: Env, page: Any
) -> None:
    """An account signs in with its password (a session cookie the page cannot read); the page says who is
    signed in; the operator's changes go through and are in the audit log under their name, which an admin
    reads in the console; signing out ends the session in the broker."""
    from playwright.async_api import expect

    password = "correct horse battery"
    for name, role in (("olga", "operator"), ("ada", "admin")):
        await env.api(
            "POST", "/accounts", expect=201, json={"name": name, "role": role, "password": password}
        )
    await env.upload(FIRMWARE, version="2.0.0")

    await page.goto("/")
    await page.get_by_label("Account").fill("olga")
    await page.get_by_label("Password").fill("wrong password")
    await page.get_by_role("button", name="Use this account").click()
    await expect(page.locator("#account-error")).to_have_text(
        "Wrong account or password, or the account is disabled."
    )
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Use this account").click()
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    await expect(page.locator("#who")).to_have_text("olga (operator)")
    await expect(page.get_by_role("link", name="Audit log")).to_be_hidden()
    assert await page.evaluate("document.cookie") == "", "the session cookie is readable by the page"
    assert await page.evaluate("sessionStorage.getItem('ota-broker.token')") is None

    # a change through the console, with the cookie: made, and recorded under olga's name
    await page.get_by_role("link", name="Firmware", exact=True).click()
    page.once("dialog", lambda dialog: dialog.accept())
    await page.get_by_role("button", name="Delete firmware 1").click()
    await expect(page.get_by_text("No firmware yet.")).to_be_visible()
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    await page.get_by_label("Account").fill("ada")
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Use this account").click()
    await expect(page.locator("#who")).to_have_text("ada (admin)")
    await page.get_by_role("link", name="Audit log").click()
    log = page.get_by_role("table", name="Changes, newest first")
    await expect(log.locator("tbody tr").first).to_contain_text("olga")
    await expect(log.locator("tbody tr").first).to_contain_text("DELETE /api/v1/firmware/{id}")
    await expect(log).to_contain_text("POST /api/v1/accounts")
    await shot(page, "9-audit-log")
    # the one wrong password, answered 401 (which the browser logs), and nothing else
    assert page.problems == [
        "console error: Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    ]


async def test_devices_are_added_imported_rotated_and_deleted_in_the_console(env: Env, page: Any) -> None:
    """An admin adds a device (its secret shown once), imports a CSV (with its report: created, existing,
    refused lines), gives a device a new secret, and deletes one."""
    from playwright.async_api import expect

    await env.api("POST", "/devices", expect=201, json={"product_key": "pk", "device_name": "old"})
    await page.goto("/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.keyboard.press("Enter")
    await page.get_by_role("link", name="Devices", exact=True).click()

    await page.get_by_label("Product", exact=True).fill("pk")
    await page.get_by_label("Device name").fill("fresh")
    await page.get_by_role("button", name="Add device").click()
    shown = page.locator('#add-device-result code[data-device="pk/fresh"]')
    await expect(shown).to_be_visible()
    first_secret = await shown.text_content()
    assert first_secret and len(first_secret) >= 16
    assert await env.find("/devices/pk/fresh") is not None

    csv = b"product_key,device_name\npk,imp1\npk,imp2\npk,old\npk\n"
    await page.get_by_label("CSV file of devices").set_input_files(
        files=[{"name": "fleet.csv", "mimeType": "text/csv", "buffer": csv}]
    )
    await expect(page.locator("#import-summary")).to_have_text(
        "fleet.csv: 4 row(s); 2 created, 1 existed, 1 refused."
    )
    refused = page.get_by_role("table", name="Refused lines")
    await expect(refused.locator("tbody tr")).to_have_count(1)
    await expect(refused).to_contain_text("5")  # the line of the file, header counted
    await expect(
        page.get_by_role("link", name="Download the 2 new secret(s) (CSV, shown this once)")
    ).to_be_visible()
    assert await env.find("/devices/pk/imp2") is not None
    await shot(page, "10-devices-added-imported")

    # groups: given on a device's page, searched on the list, targeted by a job
    await page.goto("/console/#/devices/pk/imp1")
    await page.get_by_label("Groups").fill("canary, eu")
    await page.get_by_role("button", name="Save groups").click()
    await expect(page.locator("#status")).to_have_text("pk/imp1 is in group(s) canary, eu.")
    assert (await env.api("GET", "/devices/pk/imp1", expect=200))["groups"] == ["canary", "eu"]
    await page.goto("/console/#/devices?group=canary")
    await expect(page.get_by_role("table", name="Devices").locator("tbody tr")).to_have_count(1)
    await expect(page.get_by_label("Group", exact=True)).to_have_value("canary")
    fw = await env.upload(FIRMWARE, version="2.0.0")
    await page.goto(f"/console/#/jobs/new?firmware={fw['id']}")
    await page.get_by_label("Device group").fill("canary")
    await page.get_by_role("button", name="Preview").click()
    await expect(page.locator("#job-preview-count")).to_have_text(
        "1 device(s) of 1 matched (the devices of product pk in group canary) get default 2.0.0."
    )

    await page.goto("/console/#/devices/pk/fresh")
    page.once("dialog", lambda dialog: dialog.accept())
    await page.get_by_role("button", name="Rotate secret").click()
    rotated = page.locator('#device-secret code[data-device="pk/fresh"]')
    await expect(rotated).to_be_visible()
    assert await rotated.text_content() != first_secret
    await page.get_by_role("button", name="Show secret").click()
    await expect(page.locator('#device-secret code[data-device="pk/fresh"]')).to_have_text(
        (await rotated.text_content()) or ""
    )

    page.once("dialog", lambda dialog: dialog.accept())
    await page.get_by_role("button", name="Delete device").click()
    await expect(page.get_by_role("heading", name="Devices", exact=True)).to_be_visible()
    assert await env.find("/devices/pk/fresh") is None
    assert page.problems == []


async def test_a_message_does_not_outlive_its_page_and_phone_widths_fit(env: Env, page: Any) -> None:
    """ "Firmware uploaded." does not stand beside a failed upload nor follow to the next page; at a phone's
    width no page is wider than the screen (wide tables scroll inside themselves)."""
    from playwright.async_api import expect

    for name in ("a-device-with-a-rather-long-name-1", "a-device-with-a-rather-long-name-2"):
        await reporting(env, name)
    await page.goto("/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.keyboard.press("Enter")
    await page.get_by_role("link", name="Firmware", exact=True).click()
    status = page.locator("#status")
    files = [{"name": "fw.bin", "mimeType": "application/octet-stream", "buffer": FIRMWARE}]
    await page.get_by_label("Firmware file(s)").set_input_files(files=files)
    await page.get_by_label("Product key").fill("pk")
    await page.get_by_label("Version", exact=True).fill("2.0.0")
    await page.get_by_role("button", name="Upload").click()
    await expect(status).to_have_text("Firmware 1 uploaded.")
    await page.get_by_label("Firmware file(s)").set_input_files(files=files)  # the same version again: 409
    await page.get_by_role("button", name="Upload").click()
    await expect(page.get_by_role("alert").filter(has_text="Upload failed")).to_be_visible()
    await expect(status).to_have_text("")
    await page.get_by_role("button", name="Upload").click()
    await page.get_by_role("link", name="Jobs", exact=True).click()
    await expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    await expect(status).to_have_text("")

    await env.job(1, ["pk/a-device-with-a-rather-long-name-1", "pk/a-device-with-a-rather-long-name-2"])
    await page.set_viewport_size({"width": 375, "height": 800})
    for where in ("#/overview", "#/jobs", "#/jobs/1", "#/devices", "#/firmware", "#/jobs/new"):
        await page.goto(f"/console/{where}")
        await expect(page.locator("main h1")).to_be_visible()
        await page.wait_for_load_state("networkidle")
        wide = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 0, f"{where} is {wide}px wider than a phone's screen"
    await shot(page, "11-phone-job")
    assert [p for p in page.problems if "409" not in p] == []


async def test_a_fleet_of_2000_is_searched_and_paged_by_the_broker_in_the_console(
    env: Env, page: Any
) -> None:
    """The devices page asks the broker for one page at a time, with the total; the next and previous pages
    and a search by a part of the name reach every device, not only the first page's."""
    from playwright.async_api import expect

    csv = "".join(f"pk,c{i:05d}\n" for i in range(2000)).encode()
    async with env.http.post(
        env.admin + "/devices/import",
        data=csv,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "text/csv"},
    ) as r:
        assert r.status == 200 and len((await r.json())["created"]) == 2000
    await page.goto("/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.keyboard.press("Enter")
    await page.get_by_role("link", name="Devices", exact=True).click()
    count = page.locator("#devices-count")
    rows = page.get_by_role("table", name="Devices").locator("tbody tr")
    await expect(count).to_have_text("2000 device(s); 1 to 500 shown.")
    await expect(rows).to_have_count(500)
    await expect(page.get_by_role("link", name="Previous page")).to_have_count(0)
    for _ in range(3):
        await page.get_by_role("link", name="Next page").click()
    await expect(count).to_have_text("2000 device(s); 1501 to 2000 shown.")
    await expect(rows.last).to_contain_text("pk/c01999")
    await expect(page.get_by_role("link", name="Next page")).to_have_count(0)
    await page.get_by_role("link", name="Previous page").click()
    await expect(count).to_have_text("2000 device(s); 1001 to 1500 shown.")
    await expect(rows.first).to_contain_text("pk/c01000")
    await page.get_by_label("Name contains").fill("C0199")  # any case, beyond the first page
    await page.get_by_label("Name contains").press("Enter")
    await expect(count).to_have_text("10 device(s).")
    await expect(rows).to_have_count(10)
    await expect(rows.first).to_contain_text("pk/c01990")
    await shot(page, "12-fleet-search")
    assert page.problems == []


async def test_an_admin_manages_accounts_in_the_console(env: Env, page: Any) -> None:
    """Accounts page: add one with a role and a password, change its role, issue an API token (shown once,
    and working), disable it (its token stops), delete it."""
    from playwright.async_api import expect

    await page.goto("/")
    await page.get_by_label("Admin token").fill(TOKEN)
    await page.keyboard.press("Enter")
    await page.get_by_role("link", name="Accounts").click()
    await expect(page.get_by_role("heading", name="Accounts", exact=True)).to_be_visible()
    await page.get_by_label("Account name").fill("olga")
    await page.get_by_label("Role", exact=True).select_option("operator")
    await page.get_by_label("Password (for the console)").fill("correct horse battery")
    await page.get_by_role("button", name="Add account").click()
    row = page.locator('tr[data-account="olga"]')
    await expect(row).to_contain_text("yes")
    await page.get_by_label("Role of olga").select_option("viewer")
    await expect(page.locator("#status")).to_have_text("olga is viewer now.")
    assert (await env.api("GET", "/accounts/olga", expect=200))["role"] == "viewer"

    await page.get_by_role("button", name="New token for olga").click()
    token = await page.locator('#account-token code[data-account="olga"]').text_content()
    assert token and token.startswith("ota_")
    headers = {"Authorization": f"Bearer {token}"}
    async with env.http.get(env.admin + "/whoami", headers=headers) as r:
        assert r.status == 200 and (await r.json()) == {"name": "olga", "role": "viewer"}
    await shot(page, "13-accounts")

    await page.get_by_role("button", name="Disable olga").click()
    await expect(row).to_contain_text("disabled")
    async with env.http.get(env.admin + "/whoami", headers=headers) as r:
        assert r.status == 401
    page.once("dialog", lambda dialog: dialog.accept())
    await page.get_by_role("button", name="Delete olga").click()
    await expect(page.get_by_text("No account yet")).to_be_visible()
    assert await env.api("GET", "/accounts", expect=200) == []
    assert page.problems == []

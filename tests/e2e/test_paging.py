"""Every list of the management API is paged: a JSON array, `X-Total-Count`, and a `Link: rel="next"` while
more follow; the CLI's list commands follow the links to the end."""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any
from urllib.parse import urljoin

import pytest
from typer.testing import CliRunner

from broker.cli import cli
from tests.support import TOKEN, Env

AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_DEVICES = 2_345


async def _import(env: Env, rows: list[str]) -> None:
    body = io.BytesIO("".join(f"{r}\n" for r in rows).encode())
    async with env.http.post(
        env.admin + "/devices/import", data=body, headers={**AUTH, "Content-Type": "text/csv"}
    ) as r:
        assert r.status == 200 and not (await r.json())["errors"]


async def _get(env: Env, url: str) -> tuple[list[Any], int, str | None]:
    """One page: its items, X-Total-Count, and the absolute URL of the next page (or None)."""
    async with env.http.get(url, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        link = r.headers.get("Link")
        following = None
        if link is not None:
            match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
            assert match, link
            following = urljoin(url, match.group(1))
        return await r.json(), int(r.headers["X-Total-Count"]), following


async def _walk(env: Env, path: str) -> tuple[list[Any], int, int]:
    """Every item of a list by its next links: the items, the total announced, the number of pages."""
    url: str | None = env.admin + path
    items: list[Any] = []
    pages = 0
    totals = set()
    while url is not None and pages < 1000:
        page, total, url = await _get(env, url)
        items.extend(page)
        totals.add(total)
        pages += 1
    assert len(totals) == 1 and url is None
    return items, totals.pop(), pages


async def test_device_list_pages_past_a_thousand(env: Env) -> None:
    """With 2,345 devices GET /devices answers the first 1,000 with the total and a next link; the links
    lead through every device once, in order; filters and a chosen limit carry over to the next pages."""
    await _import(env, [f"pk,d{i:05d}" for i in range(N_DEVICES)] + [f"other,x{i}" for i in range(5)])
    first, total, following = await _get(env, env.admin + "/devices")
    assert len(first) == 1000 and total == N_DEVICES + 5 and following is not None
    items, total, pages = await _walk(env, "/devices?product_key=pk&limit=700")
    assert total == N_DEVICES and pages == 4
    assert [d["device_name"] for d in items] == [f"d{i:05d}" for i in range(N_DEVICES)]
    last, total, following = await _get(env, env.admin + f"/devices?offset={N_DEVICES + 5}")
    assert last == [] and total == N_DEVICES + 5 and following is None
    async with env.http.get(env.admin + "/devices?limit=0", headers=AUTH) as r:
        assert r.status == 422 and (await r.json())["message"].startswith("limit")


async def test_firmware_jobs_and_tasks_lists_are_paged(env: Env) -> None:
    """GET /firmware, /jobs and /jobs/{id}/tasks answer pages with a total and next links that cover the
    whole list exactly once."""
    await _import(env, [f"pk,t{i:04d}" for i in range(1_203)])
    firmware = [await env.upload(f"fw {i}".encode() * 100, version=f"1.{i}") for i in range(3)]
    jobs = [
        await env.job(fw["id"], [f"pk/t{i:04d}" for i in range(k * 401, (k + 1) * 401)])
        for k, fw in enumerate(firmware)
    ]
    items, total, pages = await _walk(env, "/firmware?limit=2")
    assert [f["id"] for f in items] == [f["id"] for f in firmware] and total == 3 and pages == 2
    items, total, pages = await _walk(env, "/jobs?limit=1")
    assert [j["id"] for j in items] == [j["id"] for j in reversed(jobs)] and total == 3 and pages == 3
    items, total, pages = await _walk(env, f"/jobs/{jobs[0]['id']}/tasks?limit=150")
    assert sorted(t["device"] for t in items) == [f"pk/t{i:04d}" for i in range(401)]
    assert total == 401 and pages == 3


@pytest.mark.parametrize(
    ("args", "count"),
    [
        (["device", "list", "--json"], N_DEVICES),
        (["device", "list", "--json", "--product-key", "pk"], N_DEVICES),
    ],
)
async def test_the_cli_lists_every_device(env: Env, args: list[str], count: int) -> None:
    """`ota-broker device list` prints every device, however many pages the API splits them into."""
    await _import(env, [f"pk,c{i:05d}" for i in range(N_DEVICES)])
    host, port = env.running.admin_address
    result = await asyncio.to_thread(
        CliRunner().invoke, cli, [*args, "--admin-url", f"http://{host}:{port}", "--token", TOKEN]
    )
    assert result.exit_code == 0, result.output
    names = [d["device_name"] for d in json.loads(result.stdout)]
    assert names == [f"c{i:05d}" for i in range(count)]


async def test_devices_are_searched_by_a_part_of_their_name_on_the_server(env: Env) -> None:
    """`?name=` finds every device whose name holds it, in any case, beyond the first 1,000 too, with the
    total; the CLI's `device list --name` the same; a needle over 64 characters is refused."""
    await _import(env, [f"pk,Meter_{i:05d}" for i in range(1_500)] + ["pk,pump_1", "other,meter_x"])
    items, total, _ = await _walk(env, "/devices?name=meter_010")
    assert total == 100 and [d["device_name"] for d in items] == [
        f"Meter_{i:05d}" for i in range(1_000, 1_100)
    ]
    items, total, _ = await _walk(env, "/devices?name=METER&product_key=other")
    assert total == 1 and items[0]["device_name"] == "meter_x"
    host, port = env.running.admin_address
    result = await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        [
            "device",
            "list",
            "--json",
            "--name",
            "_0149",
            "--admin-url",
            f"http://{host}:{port}",
            "--token",
            TOKEN,
        ],
    )
    assert result.exit_code == 0, result.output
    assert [d["device_name"] for d in json.loads(result.stdout)] == [
        f"Meter_{i:05d}" for i in range(1_490, 1_500)
    ]
    async with env.http.get(env.admin + "/devices?name=" + "x" * 65, headers=AUTH) as r:
        assert r.status == 422 and (await r.json())["message"].startswith("name")

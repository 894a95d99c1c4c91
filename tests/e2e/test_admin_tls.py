"""The management API over HTTPS (`admin_tls: true`), for the API and the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from typer.testing import CliRunner

from broker import app as broker_app
from broker.cli import cli
from tests.support import TOKEN, Env, Tls, broker_config


@pytest.fixture
async def tls_env(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    running = await broker_app.start(broker_config(tmp_path / "data", tls, admin_tls=True))
    async with aiohttp.ClientSession() as http:
        yield Env(running, tls, http)
    await running.stop()


async def test_admin_api_speaks_https(tls_env: Env, tmp_path: Path) -> None:
    """With admin_tls the API answers over HTTPS with the server certificate; the CLI trusts the given CA."""
    host, port = tls_env.running.admin_address
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with tls_env.http.get(
        f"https://{host}:{port}/api/v1/devices", headers=headers, ssl=tls_env.tls.client_context()
    ) as r:
        assert r.status == 200 and await r.json() == []
    with pytest.raises(aiohttp.ClientError):
        async with tls_env.http.get(f"http://{host}:{port}/api/v1/devices", headers=headers) as r:
            await r.read()

    ca_file = tmp_path / "ca.pem"
    tls_env.tls.ca.cert_pem.write_to_path(str(ca_file))
    env = {
        "OTA_ADMIN_URL": f"https://{host}:{port}",
        "OTA_ADMIN_TOKEN": TOKEN,
        "OTA_ADMIN_CACERT": str(ca_file),
    }
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["device", "add", "pk", "d1"], env=env)
    assert result.exit_code == 0, result.output
    assert "device_secret:" in result.output and "mosquitto_sub" in result.output

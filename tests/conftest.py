from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from broker import app as broker_app
from tests.support import Env, Tls, broker_config


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls.make(tmp_path)


@pytest.fixture
async def env(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A real broker in this process on 127.0.0.1 port 0, with its HTTPS endpoint and admin API."""
    running = await broker_app.start(broker_config(tmp_path / "data", tls))
    async with aiohttp.ClientSession() as http:
        e = Env(running, tls, http)
        try:
            yield e
        finally:
            for d in e.devices:
                d.disconnect()
            await running.stop()

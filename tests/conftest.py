from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.postgres import Postgres, running_postgres
from tests.support import Env, Tls, broker_config, started


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """A real PostgreSQL for the session (tests.postgres); each test makes its own database on it."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls.make(tmp_path)


@pytest.fixture
async def env(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A real broker in this process on 127.0.0.1 port 0, with its HTTPS endpoint and admin API."""
    async with started(broker_config(tmp_path / "data", tls), tls) as e:
        yield e

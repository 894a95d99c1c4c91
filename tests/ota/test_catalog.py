"""The catalog's memory of devices: an absent device is looked up again once `ABSENT_TTL_S` has passed, so a
device another replica registered is known here without a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from plugins.ota.app import catalog as catalog_module
from plugins.ota.app.catalog import Catalog
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store.sqlite import SqliteRepository

DEVICE = DeviceRef("pk", "d1")


async def test_an_absent_device_registered_elsewhere_is_found_once_the_answer_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(catalog_module.time, "monotonic", lambda: now[0])
    repo = SqliteRepository(tmp_path / "ota.db")
    await repo.open()
    try:
        catalog = Catalog(repo)
        assert not await catalog.exists(DEVICE)
        await repo.add_device(DEVICE, "secret", 1.0)  # another replica registers it
        assert not await catalog.exists(DEVICE)  # the remembered answer stands a while
        now[0] += catalog_module.ABSENT_TTL_S
        assert await catalog.exists(DEVICE)
        await repo.delete_device(DEVICE)
        assert await catalog.exists(DEVICE)  # known to exist: kept until deleted through this catalog
        catalog.deleted(DEVICE)
        assert not await catalog.exists(DEVICE)
    finally:
        await repo.close()

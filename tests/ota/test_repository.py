"""The `Repository` contract: the rules of every method, checked on both implementations alike (SQLite on a
file, PostgreSQL on a fresh database of a real server started for the session).

Each test takes `repo` (an open repository) or `backend` (to open more repositories on the same database);
both are parametrized over "sqlite" and "postgres".
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest

from plugins.ota.core.errors import Conflict, NotFound
from plugins.ota.core.machine import PlannedTask
from plugins.ota.core.model import (
    DownloadProtocol,
    Firmware,
    FirmwareFile,
    FirmwareStatus,
    JobOptions,
    JobState,
    JobType,
    Rollout,
    SignMethod,
    Task,
    TaskPolicy,
    TaskState,
)
from plugins.ota.core.topics import DeviceRef
from plugins.ota.store import postgres, sqlite
from plugins.ota.store.postgres import PostgresRepository
from plugins.ota.store.repository import Repository
from plugins.ota.store.schema import SchemaTooNew
from plugins.ota.store.sqlite import SqliteRepository
from tests.postgres import Postgres

S = TaskState
NOW = 1_000_000.0
SHA = "a" * 64
MD5 = "b" * 32
NO_POLICY = TaskPolicy()
OPTIONS = JobOptions(seed="seed")


def dev(name: str, product_key: str = "pk") -> DeviceRef:
    return DeviceRef(product_key, name)


# ---------------------------------------------------------------------------------------- backends


@dataclass
class Backend:
    """One database of one implementation: `make()` a repository on it (not yet open); read or set the
    schema version it records (beside the repository, as another release would)."""

    name: str
    make: Callable[[], Repository]
    schema_version: Callable[[], Awaitable[int]]
    set_schema_version: Callable[[int], Awaitable[None]]
    migrations: int


async def _sqlite_backend(path: Path) -> AsyncIterator[Backend]:
    async def version() -> int:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    async def set_version(version: int) -> None:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute(f"PRAGMA user_version = {version}")

    yield Backend("sqlite", lambda: SqliteRepository(path), version, set_version, len(sqlite.MIGRATIONS))


async def _postgres_backend(server: Postgres) -> AsyncIterator[Backend]:
    dsn = await server.new_database()

    async def version() -> int:
        db = await asyncpg.connect(dsn)
        try:
            return int(await db.fetchval("SELECT MAX(version) FROM schema_version"))
        finally:
            await db.close()

    async def set_version(version: int) -> None:
        db = await asyncpg.connect(dsn)
        try:
            await db.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
        finally:
            await db.close()

    def make() -> Repository:
        return PostgresRepository(dsn, pool_size=4)

    yield Backend("postgres", make, version, set_version, len(postgres.MIGRATIONS))
    await server.drop_database(dsn)


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """An empty database of each implementation (PostgreSQL: a new database on the session's server)."""
    if request.param == "sqlite":
        made = _sqlite_backend(tmp_path / "ota.db")
    else:
        made = _postgres_backend(request.getfixturevalue("postgres_server"))
    async for b in made:
        yield b


@pytest.fixture
async def repo(backend: Backend) -> AsyncIterator[Repository]:
    repository = backend.make()
    await repository.open()
    yield repository
    await repository.close()


# ----------------------------------------------------------------------------------------- helpers


async def add_firmware(
    repo: Repository,
    version: str = "2.0.0",
    *,
    product_key: str = "pk",
    module: str = "default",
    src_version: str | None = None,
    sha256: str = SHA,
    files: Sequence[FirmwareFile] = (),
    now: float = NOW,
) -> Firmware:
    return await repo.add_firmware(
        product_key=product_key,
        module=module,
        version=version,
        src_version=src_version,
        size=1234,
        md5=MD5,
        sha256=sha256,
        sign_method=SignMethod.SHA256,
        description="a firmware",
        now=now,
        files=files,
    )


def planned(*devices: DeviceRef, state: TaskState = S.QUEUED, group_no: int = 0) -> list[PlannedTask]:
    return [PlannedTask(d, state, group_no=group_no) for d in devices]


async def add_job(
    repo: Repository,
    firmware: Firmware,
    tasks: Sequence[PlannedTask],
    *,
    policy: TaskPolicy = NO_POLICY,
    options: JobOptions = OPTIONS,
    now: float = NOW,
) -> int:
    return await repo.create_job(firmware, JobType.STATIC, options, tasks, policy, now)


async def task_of(repo: Repository, job_id: int, device: DeviceRef) -> Task:
    found = await repo.job_task_of_device(job_id, device)
    assert found is not None
    return found


async def move(repo: Repository, task: Task, note: str = "moved", **changes: object) -> Task:
    """Save `task` with `changes` (updated_at advanced by one second unless given); it must win."""
    changes.setdefault("updated_at", task.updated_at + 1)
    saved = await repo.save_task(replace(task, **changes), note)  # type: ignore[arg-type]
    assert saved is not None
    return saved


# ------------------------------------------------------------------------------ the implementations


@pytest.mark.parametrize("implementation", [SqliteRepository, PostgresRepository])
def test_every_protocol_method_is_implemented_with_its_signature(implementation: type) -> None:
    """Each repository has every method of `Repository`, async, with the protocol's parameters."""
    for name, declared in inspect.getmembers(Repository, inspect.isfunction):
        if name.startswith("_"):
            continue
        actual = getattr(implementation, name)
        assert inspect.iscoroutinefunction(actual), name
        assert inspect.signature(actual).parameters.keys() == inspect.signature(declared).parameters.keys(), (
            name
        )
        for parameter in inspect.signature(declared).parameters.values():
            assert inspect.signature(actual).parameters[parameter.name].default == parameter.default, name


# ----------------------------------------------------------------------------------------- devices


async def test_add_device_is_found_with_its_fields_and_unknown_ones_are_not(repo: Repository) -> None:
    """A new device is enabled, offline, never seen, without modules; an unknown one is None or NotFound."""
    added = await repo.add_device(dev("d1"), "s3cret", NOW)
    assert (added.device, added.device_secret, added.enabled, added.online) == (
        dev("d1"),
        "s3cret",
        True,
        False,
    )
    assert (added.created_at, added.last_seen, added.modules) == (NOW, None, {})
    assert await repo.find_device(dev("d1")) == added
    assert await repo.get_device(dev("d1")) == added
    assert await repo.find_device(dev("d2")) is None
    with pytest.raises(NotFound):
        await repo.get_device(dev("d2"))


async def test_add_device_twice_conflicts_and_keeps_the_first(repo: Repository) -> None:
    """Adding an existing device raises Conflict and changes nothing; the same name in another product is
    another device."""
    await repo.add_device(dev("d1"), "first", NOW)
    with pytest.raises(Conflict):
        await repo.add_device(dev("d1"), "second", NOW + 1)
    assert (await repo.get_device(dev("d1"))).device_secret == "first"
    await repo.add_device(dev("d1", "other"), "third", NOW)
    assert await repo.count_devices() == 2


async def test_ensure_device_creates_an_unknown_device_once(repo: Repository) -> None:
    """ensure_device creates the device (seen now, with a generated secret) and is a no-op the second time."""
    assert await repo.ensure_device(dev("d1"), NOW) is True
    created = await repo.get_device(dev("d1"))
    assert created.device_secret and created.enabled and created.last_seen == NOW
    assert await repo.ensure_device(dev("d1"), NOW + 5) is False
    assert await repo.get_device(dev("d1")) == created


async def test_list_devices_sorts_by_product_then_name_in_byte_order(repo: Repository) -> None:
    """Devices are listed by product key then name, compared byte by byte (upper case before lower case)."""
    names = [dev("b"), dev("B"), dev("_a"), dev("a"), dev("A", "PK"), dev("a1")]
    for d in names:
        await repo.add_device(d, "s", NOW)
    listed = [r.device for r in await repo.list_devices()]
    assert listed == [dev("A", "PK"), dev("B"), dev("_a"), dev("a"), dev("a1"), dev("b")]


async def test_list_and_count_devices_apply_every_filter_alike(repo: Repository) -> None:
    """Each filter (product, module, version, online) and their combinations select the same devices in the
    list and in the count."""
    for d in (dev("d1"), dev("d2"), dev("d3"), dev("d4", "other")):
        await repo.add_device(d, "s", NOW)
    await repo.record_version(dev("d1"), "default", "1.0", NOW)
    await repo.record_version(dev("d2"), "default", "2.0", NOW)
    await repo.record_version(dev("d2"), "wifi", "1.0", NOW)
    await repo.record_version(dev("d4", "other"), "default", "1.0", NOW)
    await repo.set_online(dev("d1"), True, NOW)
    await repo.set_online(dev("d4", "other"), True, NOW)
    cases: list[tuple[dict[str, object], list[DeviceRef]]] = [
        ({}, [dev("d4", "other"), dev("d1"), dev("d2"), dev("d3")]),
        ({"product_key": "pk"}, [dev("d1"), dev("d2"), dev("d3")]),
        ({"module": "default"}, [dev("d4", "other"), dev("d1"), dev("d2")]),
        ({"module": "wifi"}, [dev("d2")]),
        ({"version": "1.0"}, [dev("d4", "other"), dev("d1"), dev("d2")]),
        ({"module": "default", "version": "1.0"}, [dev("d4", "other"), dev("d1")]),
        ({"module": "wifi", "version": "2.0"}, []),
        ({"online": True}, [dev("d4", "other"), dev("d1")]),
        ({"online": False}, [dev("d2"), dev("d3")]),
        ({"product_key": "pk", "online": True, "module": "default", "version": "1.0"}, [dev("d1")]),
        ({"product_key": "nope"}, []),
    ]
    for filters, expected in cases:
        assert [r.device for r in await repo.list_devices(**filters)] == expected, filters  # type: ignore[arg-type]
        assert await repo.count_devices(**filters) == len(expected), filters  # type: ignore[arg-type]


async def test_the_name_filter_finds_a_part_of_the_name_in_any_case_and_wildcards_as_themselves(
    repo: Repository,
) -> None:
    """`name`: the device name contains it, whatever the case; `%`, `_` and `\\` in it match only
    themselves (`_` is common in device names; the others are in no name); with the other filters, in the
    list and the count alike."""
    names = ["Meter_01", "meter-02", "METER_A", "pump_01", "m.1"]
    for name in names:
        await repo.add_device(dev(name), "s", NOW)
    await repo.add_device(dev("meter_9", "other"), "s", NOW)
    cases: list[tuple[dict[str, object], list[str]]] = [
        ({"name": "meter"}, ["METER_A", "Meter_01", "meter-02", "meter_9"]),
        ({"name": "METER_"}, ["METER_A", "Meter_01", "meter_9"]),  # `_` is the underscore, not "any one"
        ({"name": "_01"}, ["Meter_01", "pump_01"]),
        ({"name": "%"}, []),  # not "anything": no name holds a %
        ({"name": "\\"}, []),
        ({"name": "."}, ["m.1"]),
        ({"name": "meter", "product_key": "pk"}, ["METER_A", "Meter_01", "meter-02"]),
        ({"name": "nothing"}, []),
        ({"name": ""}, sorted([*names, "meter_9"], key=lambda n: (n != "meter_9", n))),  # empty: no filter
    ]
    for filters, expected in cases:
        found = [r.device.device_name for r in await repo.list_devices(**filters)]  # type: ignore[arg-type]
        assert sorted(found) == sorted(expected), filters
        assert await repo.count_devices(**filters) == len(expected), filters  # type: ignore[arg-type]


async def test_list_devices_pages_with_limit_and_offset(repo: Repository) -> None:
    """limit and offset page through the sorted list; a negative limit lists all; the count ignores paging."""
    devices = [dev(f"d{i:02d}") for i in range(7)]
    for d in reversed(devices):
        await repo.add_device(d, "s", NOW)
    assert [r.device for r in await repo.list_devices(limit=3)] == devices[:3]
    assert [r.device for r in await repo.list_devices(limit=3, offset=3)] == devices[3:6]
    assert [r.device for r in await repo.list_devices(limit=3, offset=6)] == devices[6:]
    assert await repo.list_devices(limit=3, offset=7) == []
    assert [r.device for r in await repo.list_devices(limit=-1, offset=2)] == devices[2:]
    assert await repo.count_devices() == 7


async def test_listed_devices_carry_their_module_versions(repo: Repository) -> None:
    """Each listed device has every module's version, and only its own."""
    await repo.add_device(dev("d1"), "s", NOW)
    await repo.add_device(dev("d2"), "s", NOW)
    await repo.record_version(dev("d1"), "default", "1.0", NOW)
    await repo.record_version(dev("d1"), "wifi", "3.1", NOW)
    listed = await repo.list_devices()
    assert [r.modules for r in listed] == [{"default": "1.0", "wifi": "3.1"}, {}]
    assert listed[0] == await repo.get_device(dev("d1"))


async def test_device_login_follows_secret_and_enabled(repo: Repository) -> None:
    """device_login answers the secret and whether the device is enabled, None for an unknown device."""
    assert await repo.device_login(dev("d1")) is None
    await repo.add_device(dev("d1"), "one", NOW)
    assert await repo.device_login(dev("d1")) == ("one", True)
    await repo.set_enabled(dev("d1"), False)
    await repo.set_secret(dev("d1"), "two")
    assert await repo.device_login(dev("d1")) == ("two", False)
    await repo.set_enabled(dev("d1"), True)
    assert (await repo.get_device(dev("d1"))).enabled is True


async def test_set_enabled_and_set_secret_of_an_unknown_device_are_not_found(repo: Repository) -> None:
    """Changing a device that does not exist raises NotFound."""
    with pytest.raises(NotFound):
        await repo.set_enabled(dev("ghost"), False)
    with pytest.raises(NotFound):
        await repo.set_secret(dev("ghost"), "x")


async def test_delete_device_removes_it_and_its_module_versions(repo: Repository) -> None:
    """A deleted device is gone with its modules (added again, it starts without any); an unknown one is NotFound."""
    await repo.add_device(dev("d1"), "s", NOW)
    await repo.record_version(dev("d1"), "default", "1.0", NOW)
    await repo.delete_device(dev("d1"))
    assert await repo.find_device(dev("d1")) is None
    assert await repo.list_devices(module="default") == []
    assert (await repo.add_device(dev("d1"), "s", NOW)).modules == {}
    with pytest.raises(NotFound):
        await repo.delete_device(dev("ghost"))


async def test_delete_device_conflicts_while_it_has_an_unfinished_task(repo: Repository) -> None:
    """A device with an unfinished task cannot be deleted; once the task is finished it can, the task kept."""
    await repo.add_device(dev("d1"), "s", NOW)
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, planned(dev("d1")))
    with pytest.raises(Conflict):
        await repo.delete_device(dev("d1"))
    assert await repo.find_device(dev("d1")) is not None
    await move(repo, await task_of(repo, job_id, dev("d1")), state=S.CANCELLED)
    await repo.delete_device(dev("d1"))
    assert await repo.find_device(dev("d1")) is None
    assert [t.state for t in await repo.tasks_of_job(job_id)] == [S.CANCELLED]


async def test_add_devices_inserts_only_new_ones_in_one_go(repo: Repository) -> None:
    """add_devices creates the devices that do not exist (in the order given, once each, a repeated one with
    its last secret), leaves existing ones as they are, and returns those it created."""
    await repo.add_device(dev("old"), "kept", NOW)
    created = await repo.add_devices(
        [(dev("n2"), "a"), (dev("old"), "x"), (dev("n1"), "b"), (dev("n2"), "c")], NOW + 1
    )
    assert created == [dev("n2"), dev("n1")]
    assert (await repo.get_device(dev("old"))).device_secret == "kept"
    assert await repo.device_login(dev("n2")) == ("c", True)
    assert (await repo.get_device(dev("n1"))).created_at == NOW + 1
    assert await repo.add_devices([(dev("n1"), "z")], NOW) == []
    assert await repo.add_devices([], NOW) == []
    assert await repo.count_devices() == 3


async def test_online_state_and_last_seen(repo: Repository) -> None:
    """set_online sets the flag and last_seen; mark_all_offline clears every flag and keeps last_seen; an
    unknown device is ignored."""
    for d in (dev("d1"), dev("d2")):
        await repo.add_device(d, "s", NOW)
        await repo.set_online(d, True, NOW + 1)
    await repo.set_online(dev("d2"), False, NOW + 2)
    await repo.set_online(dev("ghost"), True, NOW)
    assert [(r.online, r.last_seen) for r in await repo.list_devices()] == [(True, NOW + 1), (False, NOW + 2)]
    await repo.mark_all_offline()
    assert [(r.online, r.last_seen) for r in await repo.list_devices()] == [
        (False, NOW + 1),
        (False, NOW + 2),
    ]
    assert await repo.find_device(dev("ghost")) is None


async def test_presence_of_many_devices_in_one_call(repo: Repository) -> None:
    """set_presence records every device listed, a device listed twice as its last change says, leaves out
    devices that are not registered, and sets last_seen of the devices listed only."""
    for name in ("d1", "d2", "d3", "d4"):
        await repo.add_device(dev(name), "s", NOW)
    await repo.set_presence([(dev("d1"), True), (dev("d4"), True)], NOW + 1)
    await repo.set_presence(
        [(dev("d1"), False), (dev("d2"), True), (dev("ghost"), True), (dev("d2"), False), (dev("d3"), True)],
        NOW + 2,
    )
    await repo.set_presence([], NOW + 3)
    assert [(r.device.device_name, r.online, r.last_seen) for r in await repo.list_devices()] == [
        ("d1", False, NOW + 2),
        ("d2", False, NOW + 2),
        ("d3", True, NOW + 2),
        ("d4", True, NOW + 1),
    ]
    assert await repo.find_device(dev("ghost")) is None


async def test_registered_among_a_list_of_devices(repo: Repository) -> None:
    """existing_devices answers which of the devices asked about are registered, in one query (a device
    asked twice, another product's device of the same name, an empty list)."""
    await repo.add_device(dev("d1"), "s", NOW)
    await repo.add_device(dev("d1", "other"), "s", NOW)
    await repo.add_device(dev("d3"), "s", NOW)
    asked = [dev("d1"), dev("d2"), dev("d1"), dev("d3", "other"), dev("d3")]
    assert await repo.existing_devices(asked) == {dev("d1"), dev("d3")}
    assert await repo.existing_devices([]) == set()


async def test_record_version_upserts_per_module_and_marks_the_device_seen(repo: Repository) -> None:
    """record_version stores one version per module (a new report replaces it) and sets last_seen."""
    await repo.add_device(dev("d1"), "s", NOW)
    await repo.record_version(dev("d1"), "default", "1.0", NOW + 1)
    await repo.record_version(dev("d1"), "wifi", "0.9", NOW + 2)
    await repo.record_version(dev("d1"), "default", "1.1", NOW + 3)
    found = await repo.get_device(dev("d1"))
    assert found.modules == {"default": "1.1", "wifi": "0.9"}
    assert found.last_seen == NOW + 3
    assert list(found.modules) == ["default", "wifi"]


# ---------------------------------------------------------------------------------------- firmware


async def test_add_firmware_round_trips_every_field(repo: Repository) -> None:
    """A firmware reads back as it was added (files in order, default status no_verify_needed); ids ascend."""
    files = (FirmwareFile("app.bin", 1234, MD5, SHA), FirmwareFile("res.pak", 99, "c" * 32, "d" * 64))
    first = await add_firmware(repo, files=files)
    assert (first.product_key, first.module, first.version, first.src_version) == (
        "pk",
        "default",
        "2.0.0",
        None,
    )
    assert (first.size, first.md5, first.sha256, first.sign_method) == (1234, MD5, SHA, SignMethod.SHA256)
    assert (first.description, first.status, first.created_at, first.files) == (
        "a firmware",
        FirmwareStatus.NO_VERIFY_NEEDED,
        NOW,
        files,
    )
    assert await repo.get_firmware(first.id) == first
    second = await repo.add_firmware(
        status=FirmwareStatus.UNVERIFIED,
        product_key="pk",
        module="default",
        version="2.0.1",
        src_version="2.0.0",
        size=1,
        md5=MD5,
        sha256=SHA,
        sign_method=SignMethod.MD5,
        description="",
        now=NOW,
    )
    assert second.id > first.id
    assert (second.status, second.src_version, second.files, second.sign) == (
        FirmwareStatus.UNVERIFIED,
        "2.0.0",
        (),
        MD5,
    )


async def test_a_firmware_identity_is_product_module_version_and_source(repo: Repository) -> None:
    """The same product, module, version and source version twice conflicts (no source counts as one value);
    any one of them different is another firmware."""
    await add_firmware(repo, "2.0")
    with pytest.raises(Conflict):
        await add_firmware(repo, "2.0")
    await add_firmware(repo, "2.0", src_version="1.0")
    with pytest.raises(Conflict):
        await add_firmware(repo, "2.0", src_version="1.0")
    await add_firmware(repo, "2.0", src_version="1.1")
    await add_firmware(repo, "2.0", module="wifi")
    await add_firmware(repo, "2.0", product_key="other")
    assert await repo.count_firmware() == 5


async def test_unknown_firmware_is_none_or_not_found(repo: Repository) -> None:
    """find_firmware of an unknown id is None, get_firmware and delete_firmware raise NotFound."""
    assert await repo.find_firmware(404) is None
    with pytest.raises(NotFound):
        await repo.get_firmware(404)
    with pytest.raises(NotFound):
        await repo.delete_firmware(404)


async def test_list_and_count_firmware_oldest_first_by_product_and_page(repo: Repository) -> None:
    """Firmware is listed oldest first, optionally of one product, paged; limit -1 lists all."""
    a = await add_firmware(repo, "1", product_key="pb")
    b = await add_firmware(repo, "2", product_key="pa")
    c = await add_firmware(repo, "3", product_key="pb")
    assert await repo.list_firmware() == [a, b, c]
    assert await repo.list_firmware("pb") == [a, c]
    assert await repo.list_firmware(limit=2) == [a, b]
    assert await repo.list_firmware(limit=-1, offset=1) == [b, c]
    assert await repo.list_firmware("pb", limit=1, offset=1) == [c]
    assert (await repo.count_firmware(), await repo.count_firmware("pb"), await repo.count_firmware("x")) == (
        3,
        2,
        0,
    )


async def test_set_firmware_status_changes_only_that_firmware(repo: Repository) -> None:
    """set_firmware_status changes the one firmware's status; an unknown id changes nothing."""
    a = await add_firmware(repo, "1")
    b = await add_firmware(repo, "2")
    await repo.set_firmware_status(a.id, FirmwareStatus.VERIFIED)
    await repo.set_firmware_status(404, FirmwareStatus.VERIFY_FAILED)
    assert (await repo.get_firmware(a.id)).status is FirmwareStatus.VERIFIED
    assert await repo.get_firmware(b.id) == b


async def test_blob_in_use_by_a_firmware_or_any_file_of_a_package(repo: Repository) -> None:
    """A blob is in use while a firmware is it or lists it among its files; not after that firmware is deleted."""
    files = (FirmwareFile("a.bin", 1, MD5, "1" * 64), FirmwareFile("b.bin", 1, MD5, "2" * 64))
    fw = await add_firmware(repo, sha256="1" * 64, files=files)
    assert await repo.blob_in_use("1" * 64) and await repo.blob_in_use("2" * 64)
    assert not await repo.blob_in_use("3" * 64)
    await repo.delete_firmware(fw.id)
    assert not await repo.blob_in_use("2" * 64)


async def test_delete_firmware_removes_its_finished_jobs_tasks_and_history(repo: Repository) -> None:
    """Deleting a firmware whose tasks are all finished returns it and removes its jobs and tasks; other
    firmware's jobs stay."""
    fw = await add_firmware(repo, "1")
    other = await add_firmware(repo, "2")
    job_id = await add_job(repo, fw, planned(dev("d1"), dev("d2")))
    kept = await add_job(repo, other, planned(dev("d1")))
    for task in await repo.tasks_of_job(job_id):
        await move(repo, task, state=S.SUCCEEDED, progress=100)
    assert await repo.delete_firmware(fw.id) == fw
    assert await repo.find_firmware(fw.id) is None
    assert await repo.find_job(job_id) is None
    assert await repo.tasks_of_device(dev("d2")) == []
    assert [j.id for j in await repo.list_jobs()] == [kept]
    assert await repo.task_state_counts() == {S.QUEUED: 1}


async def test_delete_firmware_conflicts_while_an_unfinished_task_uses_it(repo: Repository) -> None:
    """A firmware with an unfinished task cannot be deleted, and nothing of it is."""
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, planned(dev("d1"), dev("d2")))
    await move(repo, await task_of(repo, job_id, dev("d1")), state=S.FAILED)
    with pytest.raises(Conflict):
        await repo.delete_firmware(fw.id)
    assert await repo.get_firmware(fw.id) == fw
    assert await repo.count_tasks_of_job(job_id) == 2


# -------------------------------------------------------------------------------------------- jobs


async def test_create_job_stores_the_job_as_running_with_its_options(repo: Repository) -> None:
    """A new job is running, with its type, options (tag order kept), times and task counts as given."""
    fw = await add_firmware(repo)
    options = JobOptions(
        seed="s",
        src_versions=("1.0",),
        tags=(("zone", "b"), ("app", "a")),
        gray_percent=12.5,
        rate_per_minute=30.0,
        retry_interval_minutes=0.5,
        download_protocol=DownloadProtocol.MQTT,
        rollout=Rollout((10.0, 100.0), 90.0, 3, None),
    )
    job_id = await repo.create_job(
        fw,
        JobType.DYNAMIC,
        options,
        planned(dev("d1"), dev("d2")) + planned(dev("d3"), state=S.SKIPPED),
        TaskPolicy(),
        NOW,
        schedule_at=NOW + 60,
        end_at=NOW + 3600,
    )
    job = await repo.get_job(job_id)
    assert (job.id, job.firmware_id, job.type, job.stored_state) == (
        job_id,
        fw.id,
        JobType.DYNAMIC,
        JobState.RUNNING,
    )
    assert job.options == options
    assert (job.created_at, job.updated_at, job.schedule_at, job.end_at) == (NOW, NOW, NOW + 60, NOW + 3600)
    assert (job.current_group, job.pause_reason) == (0, "")
    assert job.counts == {S.QUEUED: 2, S.SKIPPED: 1}


async def test_create_job_stores_tasks_in_plan_order_with_the_policy(repo: Repository) -> None:
    """Tasks get ids in the order planned (not sorted by device), the firmware's module and version, the
    policy, a zero revision, and one history row each ("created" unless the plan says why)."""
    fw = await add_firmware(repo, module="wifi")
    policy = TaskPolicy(timeout_s=600.0, retry_count=2, retry_interval_s=30.0, notify_timeout_s=86400.0)
    plan = [
        PlannedTask(dev("z"), S.QUEUED, group_no=1),
        PlannedTask(dev("a"), S.SKIPPED, "already_on_target"),
        PlannedTask(dev("m"), S.CONFIRM),
    ]
    job_id = await add_job(repo, fw, plan, policy=policy)
    tasks = await repo.tasks_of_job(job_id)
    assert [t.device for t in tasks] == [dev("z"), dev("a"), dev("m")]
    assert [t.id for t in tasks] == sorted(t.id for t in tasks)
    assert [(t.state, t.desc, t.group_no) for t in tasks] == [
        (S.QUEUED, "", 1),
        (S.SKIPPED, "already_on_target", 0),
        (S.CONFIRM, "", 0),
    ]
    first = tasks[0]
    assert (first.job_id, first.firmware_id, first.module, first.target_version) == (
        job_id,
        fw.id,
        "wifi",
        "2.0.0",
    )
    assert (first.timeout_s, first.retry_count, first.retry_interval_s, first.notify_timeout_s) == (
        600.0,
        2,
        30.0,
        86400.0,
    )
    assert (first.progress, first.attempts, first.rev, first.updated_at) == (0, 0, 0, NOW)
    assert (first.notified_at, first.noticed_at, first.started_at, first.not_before) == (
        None,
        None,
        None,
        None,
    )
    assert [await repo.task_history(t.id) for t in tasks] == [
        [{"at": NOW, "state": "queued", "progress": 0, "desc": "created"}],
        [{"at": NOW, "state": "skipped", "progress": 0, "desc": "already_on_target"}],
        [{"at": NOW, "state": "confirm", "progress": 0, "desc": "created"}],
    ]


async def test_a_job_without_tasks_and_tasks_added_later(repo: Repository) -> None:
    """A job may start with no task; add_tasks appends tasks after the existing ones, with their history."""
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, [])
    assert (await repo.get_job(job_id)).counts == {}
    await repo.add_tasks(job_id, fw, planned(dev("b")), TaskPolicy(retry_count=1), NOW + 1)
    await repo.add_tasks(job_id, fw, planned(dev("a")), TaskPolicy(), NOW + 2)
    await repo.add_tasks(job_id, fw, [], TaskPolicy(), NOW + 3)
    tasks = await repo.tasks_of_job(job_id)
    assert [(t.device, t.retry_count, t.updated_at) for t in tasks] == [
        (dev("b"), 1, NOW + 1),
        (dev("a"), 0, NOW + 2),
    ]
    assert len(await repo.task_history(tasks[1].id)) == 1


async def test_update_job_changes_only_the_fields_given(repo: Repository) -> None:
    """update_job sets updated_at and each field given (an empty pause reason and group 0 included), nothing else."""
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, [])
    before = await repo.get_job(job_id)
    assert await repo.update_job(job_id, NOW + 1, state=JobState.PAUSED, pause_reason="errors") is True
    paused = await repo.get_job(job_id)
    assert (paused.stored_state, paused.pause_reason, paused.updated_at) == (
        JobState.PAUSED,
        "errors",
        NOW + 1,
    )
    assert (paused.current_group, paused.options, paused.created_at) == (0, before.options, NOW)
    new_options = replace(before.options, acknowledged_failures=3)
    assert await repo.update_job(job_id, NOW + 2, current_group=2, options=new_options) is True
    assert await repo.update_job(job_id, NOW + 3, pause_reason="") is True
    after = await repo.get_job(job_id)
    assert (after.stored_state, after.current_group, after.options) == (JobState.PAUSED, 2, new_options)
    assert (after.pause_reason, after.updated_at) == ("", NOW + 3)
    assert await repo.update_job(404, NOW, state=JobState.CANCELLED) is False


async def test_update_job_only_from_given_states(repo: Repository) -> None:
    """With `only_from`, a job in another state is left unchanged (False); in one of them it changes (True)."""
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, [])
    assert not await repo.update_job(job_id, NOW + 1, state=JobState.RUNNING, only_from=[JobState.PAUSED])
    assert (await repo.get_job(job_id)).updated_at == NOW
    assert await repo.update_job(
        job_id, NOW + 2, state=JobState.COMPLETED, only_from=[JobState.PAUSED, JobState.RUNNING]
    )
    assert (await repo.get_job(job_id)).stored_state is JobState.COMPLETED


async def test_jobs_in_states_and_running_jobs_in_id_order_with_counts(repo: Repository) -> None:
    """jobs_in_states lists the jobs in any of the states, oldest first, with their counts; running_jobs the
    running ones; no state, none."""
    fw = await add_firmware(repo)
    a = await add_job(repo, fw, planned(dev("d1")))
    b = await add_job(repo, fw, [])
    c = await add_job(repo, fw, [])
    await repo.update_job(b, NOW, state=JobState.PAUSED)
    await repo.update_job(c, NOW, state=JobState.COMPLETED)
    assert [j.id for j in await repo.running_jobs()] == [a]
    assert (await repo.running_jobs())[0].counts == {S.QUEUED: 1}
    assert [j.id for j in await repo.jobs_in_states(JobState.COMPLETED, JobState.RUNNING)] == [a, c]
    assert await repo.jobs_in_states() == []


async def test_list_jobs_newest_first_paged_and_counted(repo: Repository) -> None:
    """list_jobs pages through the jobs newest first, each with its task counts; count_jobs counts them all."""
    fw = await add_firmware(repo)
    ids = [await add_job(repo, fw, planned(*(dev(f"d{i}{n}") for n in range(i)))) for i in range(4)]
    listed = await repo.list_jobs()
    assert [j.id for j in listed] == ids[::-1]
    assert [j.counts for j in listed] == [{S.QUEUED: 3}, {S.QUEUED: 2}, {S.QUEUED: 1}, {}]
    assert listed[0] == await repo.get_job(ids[3])
    assert [j.id for j in await repo.list_jobs(limit=2, offset=1)] == [ids[2], ids[1]]
    assert await repo.count_jobs() == 4


async def test_unknown_job_and_task_are_none_or_not_found(repo: Repository) -> None:
    """find_job of an unknown id is None; get_job and get_task raise NotFound."""
    assert await repo.find_job(404) is None
    with pytest.raises(NotFound):
        await repo.get_job(404)
    with pytest.raises(NotFound):
        await repo.get_task(404)


async def test_group_counts_per_rollout_group_with_gaps(repo: Repository) -> None:
    """group_counts lists each group's counts by state, by group number; a group without tasks is empty."""
    fw = await add_firmware(repo)
    job_id = await add_job(
        repo,
        fw,
        planned(dev("a"), dev("b"))
        + planned(dev("c"), group_no=2)
        + planned(dev("d"), state=S.SKIPPED, group_no=2),
    )
    await move(repo, await task_of(repo, job_id, dev("b")), state=S.SUCCEEDED)
    assert await repo.group_counts(job_id) == [{S.QUEUED: 1, S.SUCCEEDED: 1}, {}, {S.QUEUED: 1, S.SKIPPED: 1}]
    assert await repo.group_counts(404) == []


async def test_dispatchable_tasks_are_queued_in_open_groups_and_due(repo: Repository) -> None:
    """dispatchable_tasks lists queued tasks of groups up to `max_group` whose not_before has come, by group
    then plan order, at most `limit`."""
    fw = await add_firmware(repo)
    job_id = await add_job(
        repo,
        fw,
        planned(dev("g1"), group_no=1)
        + planned(dev("a"), dev("later"), dev("notified"), dev("due"))
        + planned(dev("g2"), group_no=2),
    )
    await move(repo, await task_of(repo, job_id, dev("later")), not_before=NOW + 100)
    await move(repo, await task_of(repo, job_id, dev("due")), not_before=NOW + 10)
    await move(repo, await task_of(repo, job_id, dev("notified")), state=S.NOTIFIED)
    other = await add_job(repo, fw, planned(dev("x")))

    def names(tasks: list[Task]) -> list[str]:
        return [t.device.device_name for t in tasks]

    assert names(await repo.dispatchable_tasks(job_id, 0, NOW, 10)) == ["a"]
    assert names(await repo.dispatchable_tasks(job_id, 1, NOW + 10, 10)) == ["a", "due", "g1"]
    assert names(await repo.dispatchable_tasks(job_id, 2, NOW + 100, 10)) == ["a", "later", "due", "g1", "g2"]
    assert names(await repo.dispatchable_tasks(job_id, 2, NOW + 100, 2)) == ["a", "later"]
    assert names(await repo.dispatchable_tasks(other, 0, NOW, 10)) == ["x"]


async def test_job_task_of_device_is_the_latest_of_that_job(repo: Repository) -> None:
    """job_task_of_device finds the device's newest task in that job, None when it has none there."""
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, planned(dev("d1"), dev("d2")))
    await repo.add_tasks(job_id, fw, planned(dev("d1")), TaskPolicy(), NOW + 1)
    other = await add_job(repo, fw, planned(dev("d3")))
    found = await task_of(repo, job_id, dev("d1"))
    assert found.updated_at == NOW + 1
    assert found == (await repo.tasks_of_job(job_id))[-1]
    assert await repo.job_task_of_device(other, dev("d1")) is None


# ------------------------------------------------------------------------------------------- tasks


async def test_unfinished_task_is_the_latest_unfinished_of_that_module(repo: Repository) -> None:
    """unfinished_task finds the device's newest task of the module in an unfinished state, ignoring finished
    tasks, other modules and other devices."""
    fw = await add_firmware(repo)
    wifi = await add_firmware(repo, module="wifi")
    first = await add_job(repo, fw, planned(dev("d1"), dev("d2")))
    await add_job(repo, wifi, planned(dev("d1")))
    assert await repo.unfinished_task(dev("d1"), "default") == await task_of(repo, first, dev("d1"))
    for state in (S.CONFIRM, S.NOTIFIED, S.IN_PROGRESS):
        task = await move(repo, await task_of(repo, first, dev("d1")), state=state)
        assert await repo.unfinished_task(dev("d1"), "default") == task
    await move(repo, await task_of(repo, first, dev("d1")), state=S.SUCCEEDED)
    assert await repo.unfinished_task(dev("d1"), "default") is None
    assert (await repo.unfinished_task(dev("d1"), "wifi")) is not None
    assert await repo.unfinished_task(dev("d3"), "default") is None


async def test_unfinished_tasks_of_device_over_all_modules_oldest_first(repo: Repository) -> None:
    """unfinished_tasks_of_device lists every unfinished task of the device, any module, oldest first."""
    fw = await add_firmware(repo)
    wifi = await add_firmware(repo, module="wifi")
    a = await add_job(repo, fw, planned(dev("d1"), dev("d2")))
    b = await add_job(repo, wifi, planned(dev("d1")))
    c = await add_job(repo, fw, planned(dev("d1"), state=S.SKIPPED))
    del c
    tasks = await repo.unfinished_tasks_of_device(dev("d1"))
    assert [t.job_id for t in tasks] == [a, b]
    await move(repo, tasks[0], state=S.TIMED_OUT)
    assert [t.job_id for t in await repo.unfinished_tasks_of_device(dev("d1"))] == [b]


async def test_unfinished_tasks_of_many_devices_in_one_query(repo: Repository) -> None:
    """unfinished_tasks_of_devices answers, for each device asked about (once, however often it was asked),
    what unfinished_tasks_of_device would: its unfinished tasks of every module, oldest first."""
    fw = await add_firmware(repo)
    wifi = await add_firmware(repo, module="wifi")
    a = await add_job(repo, fw, planned(dev("d1"), dev("d2"), dev("x", "other")))
    b = await add_job(repo, wifi, planned(dev("d1")))
    await move(repo, await task_of(repo, a, dev("d2")), state=S.FAILED)
    asked = [dev("d2"), dev("d1"), dev("d9"), dev("d1"), dev("x", "other")]
    found = await repo.unfinished_tasks_of_devices(asked)
    assert list(found) == [dev("d2"), dev("d1"), dev("d9"), dev("x", "other")]
    assert {d: [t.job_id for t in tasks] for d, tasks in found.items()} == {
        dev("d2"): [],
        dev("d1"): [a, b],
        dev("d9"): [],
        dev("x", "other"): [a],
    }
    for device, tasks in found.items():
        assert tasks == await repo.unfinished_tasks_of_device(device)
    assert await repo.unfinished_tasks_of_devices([]) == {}


async def test_busy_devices_are_those_of_the_list_with_an_unfinished_task_of_the_module(
    repo: Repository,
) -> None:
    """busy_devices picks, among the devices asked about, those holding an unfinished task of that module."""
    fw = await add_firmware(repo)
    wifi = await add_firmware(repo, module="wifi")
    job_id = await add_job(repo, fw, planned(dev("d1"), dev("d2"), dev("d3"), dev("x", "other")))
    await add_job(repo, wifi, planned(dev("d4")))
    await move(repo, await task_of(repo, job_id, dev("d2")), state=S.FAILED)
    asked = [dev("d1"), dev("d2"), dev("d4"), dev("d5"), dev("x", "other")]
    assert await repo.busy_devices(asked, "default") == {dev("d1"), dev("x", "other")}
    assert await repo.busy_devices(asked, "wifi") == {dev("d4")}
    assert await repo.busy_devices([], "default") == set()


async def test_tasks_of_job_by_state_in_plan_order_and_paged(repo: Repository) -> None:
    """tasks_of_job lists a job's tasks in plan order, optionally only in the given states, paged (-1: all)."""
    fw = await add_firmware(repo)
    devices = [dev(f"d{i}") for i in range(5)]
    job_id = await add_job(repo, fw, planned(*devices))
    await add_job(repo, fw, planned(dev("other")))
    await move(repo, await task_of(repo, job_id, devices[1]), state=S.NOTIFIED)
    await move(repo, await task_of(repo, job_id, devices[3]), state=S.FAILED)

    async def names(*args: object, **kwargs: int) -> list[str]:
        return [t.device.device_name for t in await repo.tasks_of_job(job_id, *args, **kwargs)]  # type: ignore[arg-type]

    assert await names() == ["d0", "d1", "d2", "d3", "d4"]
    assert await names([S.NOTIFIED, S.FAILED]) == ["d1", "d3"]
    assert await names(iter([S.QUEUED])) == ["d0", "d2", "d4"]
    assert await names([]) == []
    assert await names(limit=2, offset=1) == ["d1", "d2"]
    assert await names([S.QUEUED], limit=-1, offset=1) == ["d2", "d4"]
    assert await repo.count_tasks_of_job(job_id) == 5
    assert await repo.count_tasks_of_job(404) == 0


async def test_tasks_of_device_newest_first_up_to_the_limit(repo: Repository) -> None:
    """tasks_of_device lists the device's tasks over all jobs, newest first, at most `limit`."""
    fw = await add_firmware(repo)
    jobs = [await add_job(repo, fw, planned(dev("d1"), dev("d2"))) for _ in range(3)]
    assert [t.job_id for t in await repo.tasks_of_device(dev("d1"))] == jobs[::-1]
    assert [t.job_id for t in await repo.tasks_of_device(dev("d1"), limit=2)] == jobs[:0:-1]
    assert await repo.tasks_of_device(dev("nobody")) == []


async def test_save_task_writes_every_field_when_the_revision_matches(repo: Repository) -> None:
    """save_task writes every changeable field and returns the task at the next revision, as stored."""
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, planned(dev("d1")))
    task = await task_of(repo, job_id, dev("d1"))
    changed = replace(
        task,
        state=S.IN_PROGRESS,
        progress=42,
        desc="downloading",
        attempts=2,
        notified_at=NOW + 1,
        noticed_at=NOW + 2,
        started_at=NOW + 3,
        not_before=NOW + 4,
        updated_at=NOW + 5,
    )
    saved = await repo.save_task(changed, "progress 42")
    assert saved == replace(changed, rev=1)
    assert await repo.get_task(task.id) == saved


async def test_save_task_refuses_a_stale_revision(repo: Repository) -> None:
    """A save carrying a revision someone else has moved past returns None and changes nothing."""
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, planned(dev("d1")))
    task = await task_of(repo, job_id, dev("d1"))
    winner = await move(repo, task, state=S.NOTIFIED)
    assert await repo.save_task(replace(task, state=S.CANCELLED, updated_at=NOW + 9), "stale") is None
    assert await repo.get_task(task.id) == winner
    assert await repo.save_task(replace(task, id=404), "missing") is None


async def test_concurrent_saves_of_one_revision_let_exactly_one_win(repo: Repository) -> None:
    """Of several saves of the same revision at once, exactly one is stored, with one history row."""
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, planned(dev("d1")))
    task = await task_of(repo, job_id, dev("d1"))
    tries = [replace(task, progress=p, state=S.IN_PROGRESS, updated_at=NOW + p) for p in range(1, 9)]
    results = await asyncio.gather(*(repo.save_task(t, f"try {t.progress}") for t in tries))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert await repo.get_task(task.id) == winners[0]
    history = await repo.task_history(task.id)
    assert len(history) == 2
    assert history[-1]["progress"] == winners[0].progress


async def test_every_saved_change_leaves_one_history_row(repo: Repository) -> None:
    """Each successful save appends a row (at updated_at, the new state and progress, the note), oldest
    first; a refused save appends none."""
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, planned(dev("d1")))
    task = await task_of(repo, job_id, dev("d1"))
    notified = await move(repo, task, "notice sent", state=S.NOTIFIED, updated_at=NOW + 1)
    started = await move(repo, notified, "progress 10", state=S.IN_PROGRESS, progress=10, updated_at=NOW + 2)
    await repo.save_task(replace(notified, state=S.FAILED), "stale")
    await move(repo, started, "progress 10", updated_at=NOW + 3)
    assert await repo.task_history(task.id) == [
        {"at": NOW, "state": "queued", "progress": 0, "desc": "created"},
        {"at": NOW + 1, "state": "notified", "progress": 0, "desc": "notice sent"},
        {"at": NOW + 2, "state": "in_progress", "progress": 10, "desc": "progress 10"},
        {"at": NOW + 3, "state": "in_progress", "progress": 10, "desc": "progress 10"},
    ]
    assert await repo.task_history(404) == []


async def test_overdue_tasks_by_progress_timeout_and_notify_timeout(repo: Repository) -> None:
    """An in-progress task is overdue once started_at + timeout_s has come; a notified one once noticed_at +
    notify_timeout_s has; tasks without a timeout or in other states never are; listed by id."""
    fw = await add_firmware(repo)
    timed = await add_job(
        repo, fw, planned(dev("a"), dev("b"), dev("c")), policy=TaskPolicy(timeout_s=60, notify_timeout_s=600)
    )
    untimed = await add_job(repo, fw, planned(dev("d"), dev("e")))
    await move(repo, await task_of(repo, timed, dev("a")), state=S.IN_PROGRESS, started_at=NOW)
    await move(repo, await task_of(repo, timed, dev("b")), state=S.NOTIFIED, noticed_at=NOW)
    await move(repo, await task_of(repo, timed, dev("c")), state=S.QUEUED, started_at=NOW - 1000)
    await move(repo, await task_of(repo, untimed, dev("d")), state=S.IN_PROGRESS, started_at=NOW - 1000)
    await move(repo, await task_of(repo, untimed, dev("e")), state=S.NOTIFIED, noticed_at=NOW - 10_000)

    async def overdue(now: float) -> list[str]:
        return [t.device.device_name for t in await repo.overdue_tasks(now)]

    assert await overdue(NOW + 59) == []
    assert await overdue(NOW + 60) == ["a"]
    assert await overdue(NOW + 600) == ["a", "b"]


async def test_devices_in_transfer_are_recently_notified_or_mid_download(repo: Repository) -> None:
    """devices_in_transfer lists the devices of tasks notified at or after the given time, and of tasks in
    progress below 100 %, once per such task."""
    fw = await add_firmware(repo)
    first = await add_job(repo, fw, planned(dev("new"), dev("old"), dev("mid"), dev("done"), dev("queued")))
    second = await add_job(repo, fw, planned(dev("mid")))
    await move(repo, await task_of(repo, first, dev("new")), state=S.NOTIFIED, noticed_at=NOW)
    await move(repo, await task_of(repo, first, dev("old")), state=S.NOTIFIED, noticed_at=NOW - 1)
    await move(repo, await task_of(repo, first, dev("mid")), state=S.IN_PROGRESS, progress=99)
    await move(repo, await task_of(repo, second, dev("mid")), state=S.IN_PROGRESS, progress=5)
    await move(repo, await task_of(repo, first, dev("done")), state=S.IN_PROGRESS, progress=100)
    assert sorted(await repo.devices_in_transfer(NOW)) == [dev("mid"), dev("mid"), dev("new")]
    assert sorted(await repo.devices_in_transfer(NOW - 1)) == [dev("mid"), dev("mid"), dev("new"), dev("old")]


async def test_task_state_counts_over_all_jobs(repo: Repository) -> None:
    """task_state_counts counts tasks per state over every job, leaving out states with none."""
    assert await repo.task_state_counts() == {}
    fw = await add_firmware(repo)
    a = await add_job(repo, fw, planned(dev("d1"), dev("d2")))
    await add_job(repo, fw, planned(dev("d1")) + planned(dev("d3"), state=S.SKIPPED))
    await move(repo, await task_of(repo, a, dev("d2")), state=S.SUCCEEDED)
    assert await repo.task_state_counts() == {S.QUEUED: 2, S.SUCCEEDED: 1, S.SKIPPED: 1}


async def test_may_download_while_the_device_holds_a_notified_or_running_task(repo: Repository) -> None:
    """A device may download a firmware while it has a task of it notified or in progress, not queued,
    finished, of another firmware, or another device's."""
    fw = await add_firmware(repo, "1")
    other = await add_firmware(repo, "2")
    job_id = await add_job(repo, fw, planned(dev("d1"), dev("d2")))
    task = await task_of(repo, job_id, dev("d1"))
    assert not await repo.may_download(fw.id, dev("d1"))
    task = await move(repo, task, state=S.NOTIFIED)
    assert await repo.may_download(fw.id, dev("d1"))
    task = await move(repo, task, state=S.IN_PROGRESS)
    assert await repo.may_download(fw.id, dev("d1"))
    assert not await repo.may_download(other.id, dev("d1"))
    assert not await repo.may_download(fw.id, dev("d2"))
    await move(repo, task, state=S.SUCCEEDED)
    assert not await repo.may_download(fw.id, dev("d1"))


# ------------------------------------------------------------------------------------ the database


async def test_state_survives_close_and_reopen(backend: Backend) -> None:
    """Everything written is there after the repository is closed and another one opens the database, and
    ids go on ascending."""
    repo = backend.make()
    await repo.open()
    await repo.add_device(dev("d1"), "s", NOW)
    await repo.record_version(dev("d1"), "default", "1.0", NOW)
    fw = await add_firmware(repo)
    job_id = await add_job(repo, fw, planned(dev("d1")))
    task = await move(repo, await task_of(repo, job_id, dev("d1")), state=S.NOTIFIED)
    device, job, history = (
        await repo.get_device(dev("d1")),
        await repo.get_job(job_id),
        await repo.task_history(task.id),
    )
    await repo.close()
    again = backend.make()
    await again.open()
    try:
        assert await again.get_device(dev("d1")) == device
        assert await again.get_firmware(fw.id) == fw
        assert await again.get_job(job_id) == job
        assert await again.get_task(task.id) == task
        assert await again.task_history(task.id) == history
        assert await again.create_job(fw, JobType.STATIC, JobOptions(), [], TaskPolicy(), NOW) > job_id
    finally:
        await again.close()


async def test_a_closed_repository_refuses_to_work(backend: Backend) -> None:
    """A repository used before open or after close raises instead of touching a database."""
    repo = backend.make()
    with pytest.raises(RuntimeError, match="not open"):
        await repo.count_devices()
    await repo.open()
    await repo.close()
    with pytest.raises(RuntimeError, match="not open"):
        await repo.count_jobs()
    await repo.close()  # closing twice is harmless


async def test_a_database_newer_than_the_code_is_refused(backend: Backend) -> None:
    """A database whose schema version is beyond this release's migrations is refused at open, unchanged."""
    repo = backend.make()
    await repo.open()
    await repo.close()
    await backend.set_schema_version(backend.migrations + 1)
    newer = backend.make()
    with pytest.raises(
        SchemaTooNew, match=f"version {backend.migrations + 1}, newer than this release knows"
    ):
        await newer.open()
    with pytest.raises(RuntimeError, match="not open"):
        await newer.count_devices()


async def test_replicas_opening_one_database_at_once_migrate_it_once(backend: Backend) -> None:
    """Several repositories opening the same empty database together all open, and each migration ran once."""
    replicas = [backend.make() for _ in range(4)]
    await asyncio.gather(*(r.open() for r in replicas))
    try:
        assert await replicas[0].add_device(dev("d1"), "s", NOW) == await replicas[3].get_device(dev("d1"))
    finally:
        await asyncio.gather(*(r.close() for r in replicas))
    assert await backend.schema_version() == backend.migrations


async def test_observe_is_told_of_reads_and_writes(repo: Repository) -> None:
    """The metrics callback hears of each query as a "read" and each write as a "write", with its duration."""
    heard: list[tuple[str, float]] = []
    repo.observe = lambda kind, seconds: heard.append((kind, seconds))
    await repo.add_device(dev("d1"), "s", NOW)
    assert "write" in {kind for kind, _ in heard}
    heard.clear()
    await repo.set_online(dev("d1"), True, NOW)
    await repo.mark_all_offline()
    assert [kind for kind, _ in heard] == ["write", "write"]
    heard.clear()
    await repo.count_devices()
    await repo.find_device(dev("d1"))
    assert {kind for kind, _ in heard} == {"read"}
    assert all(seconds >= 0 for _, seconds in heard)


# -------------------------------------------------------------------------------------- replicas


async def test_one_process_at_a_time_leads_and_another_takes_over_when_it_stops(backend: Backend) -> None:
    """Of the repositories open on one database, exactly one leads (SQLite: its only process, always); it
    keeps the lead while it lives, and when it closes, another takes it at its next ask."""
    replicas = [backend.make() for _ in range(3)]
    await asyncio.gather(*(r.open() for r in replicas))
    try:
        if backend.name == "sqlite":
            assert all([await r.lead() for r in replicas])
            return
        first = [await r.lead() for r in replicas]
        assert first.count(True) == 1
        leader = replicas[first.index(True)]
        assert [await r.lead() for r in replicas] == first  # held, not handed around
        await leader.close()
        rest = [r for r in replicas if r is not leader]
        assert [await r.lead() for r in rest].count(True) == 1
    finally:
        await asyncio.gather(*(r.close() for r in replicas))


async def test_presence_is_told_first_whole_then_as_other_processes_change_it(backend: Backend) -> None:
    """`watch_presence` tells every device online now; with PostgreSQL, then each change another replica
    records (once: a device already online recorded online again is no change), and everything again after
    the watching connection was lost."""
    a, b = backend.make(), backend.make()
    await a.open()
    await b.open()
    heard: list[tuple[DeviceRef, bool]] = []
    try:
        for name in ("on", "off", "later"):
            await b.add_device(dev(name), "s", NOW)
        await b.set_online(dev("on"), True, NOW)
        await a.watch_presence(lambda device, online: heard.append((device, online)))
        assert heard == [(dev("on"), True)]
        if backend.name == "sqlite":
            return
        heard.clear()
        await b.set_online(dev("later"), True, NOW)
        await b.set_online(dev("later"), True, NOW + 1)  # no change: no news
        await b.set_online(dev("on"), False, NOW + 2)
        await b.set_online(dev("nobody"), True, NOW)  # no such device: nothing recorded, no news
        # in one batch: news of the changed one only
        await b.set_presence([(dev("off"), True), (dev("later"), True), (dev("nobody"), False)], NOW + 3)
        expected = [(dev("later"), True), (dev("on"), False), (dev("off"), True)]
        for _ in range(100):
            if len(heard) >= len(expected):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # nothing more comes
        assert heard == expected
        heard.clear()
        assert isinstance(a, PostgresRepository) and a._own is not None
        a._own.terminate()  # the watching connection is lost: the next ask reconnects and tells all again
        await a.lead()
        assert sorted(heard, key=str) == [(dev("later"), True), (dev("off"), True)]
    finally:
        await a.close()
        await b.close()


async def test_a_replica_found_gone_has_its_session_adopted_once_and_learns_it_on_return(
    backend: Backend,
) -> None:
    """The replicas' registry (PostgreSQL): each registers with a session of its own; one whose database
    connection is gone and that is silent is found by another, locked so that no third one adopts it too;
    once forgotten, the replica coming back learns that it was taken for gone and registers again."""
    if backend.name == "sqlite":
        pytest.skip("one service alone has no replicas")
    a, b, c = backend.make(), backend.make(), backend.make()
    for r in (a, b, c):
        await r.open()
    try:
        assert isinstance(a, PostgresRepository) and isinstance(b, PostgresRepository)
        assert isinstance(c, PostgresRepository)
        (ida, client_a), (idb, client_b) = await a.register_replica("ota"), await b.register_replica("ota")
        await c.register_replica("ota")
        assert ida != idb and client_a == f"ota-{ida}" and client_b == f"ota-{idb}"
        assert await a.replica_alive() and await b.replica_alive()
        assert await a.orphaned_replicas(0.0) == []  # silent or not, a replica holding its lock is alive
        assert b._own is not None
        b._own.terminate()  # b's database connection is lost (the process died, or the network)
        assert await a.orphaned_replicas(60.0) == []  # not silent for long enough yet
        assert await a.orphaned_replicas(0.0) == [(idb, client_b)]
        assert await c.orphaned_replicas(0.0) == []  # a adopts it: no other replica does at the same time
        await a.forget_replica(idb)
        assert await c.orphaned_replicas(0.0) == []
        assert not await b.replica_alive()  # back: its session was adopted, it must register again
        idb2, client_b2 = await b.register_replica("ota")
        assert idb2 not in (ida, idb) and client_b2 == f"ota-{idb2}" and await b.replica_alive()
        await a.release_replica(idb2)  # not held: nothing happens
        assert await c.orphaned_replicas(0.0) == []
    finally:
        for r in (a, b, c):
            await r.close()


async def test_accounts_tokens_and_the_audit_log(repo: Repository) -> None:
    """Accounts with roles; a token known by its sha256, working while neither it is revoked nor its account
    disabled; an account's role as it is now; the audit log newest first, paged with its total."""
    from plugins.ota.core.accounts import AuditEntry, Principal, Role

    ann = await repo.add_account("ann", Role.OPERATOR, "hash-1", NOW)
    assert (ann.name, ann.role, ann.disabled, ann.has_password) == ("ann", Role.OPERATOR, False, True)
    await repo.add_account("bob", Role.VIEWER, None, NOW)
    with pytest.raises(Conflict):
        await repo.add_account("ann", Role.ADMIN, None, NOW)
    assert [a.name for a in await repo.list_accounts()] == ["ann", "bob"]
    assert await repo.password_hash("ann") == "hash-1" and await repo.password_hash("bob") is None

    token = await repo.add_token("ann", "a" * 64, "ci", NOW)
    assert (token.account, token.label, token.revoked_at) == ("ann", "ci", None)
    with pytest.raises(NotFound):
        await repo.add_token("nobody", "b" * 64, "x", NOW)
    assert await repo.principal_of_token("a" * 64) == Principal("ann", Role.OPERATOR)
    assert await repo.principal_of_token("c" * 64) is None

    await repo.update_account("ann", role=Role.ADMIN)  # a role changed applies at once
    assert await repo.principal_of_token("a" * 64) == Principal("ann", Role.ADMIN)
    await repo.update_account("ann", disabled=True)  # a disabled account: none of its ways in work
    assert await repo.principal_of_token("a" * 64) is None
    assert await repo.principal_of_account("ann") is None and await repo.password_hash("ann") is None
    await repo.update_account("ann", disabled=False, password_hash="hash-2")
    assert await repo.password_hash("ann") == "hash-2"
    revoked = await repo.revoke_token("ann", token.id, NOW + 1)
    assert revoked.revoked_at == NOW + 1 and await repo.principal_of_token("a" * 64) is None
    assert (await repo.revoke_token("ann", token.id, NOW + 2)).revoked_at == NOW + 1  # stays as it was
    with pytest.raises(NotFound):
        await repo.revoke_token("bob", token.id, NOW)  # not bob's
    with pytest.raises(NotFound):
        await repo.update_account("nobody", role=Role.VIEWER)
    await repo.delete_account("ann")
    assert await repo.find_account("ann") is None and await repo.principal_of_token("a" * 64) is None
    with pytest.raises(NotFound):
        await repo.delete_account("ann")

    for i in range(5):
        await repo.record_audit(
            AuditEntry(NOW + i, "bob", "viewer", "POST /api/v1/jobs", f"/api/v1/jobs #{i}", 403, "127.0.0.1")
        )
    page, total = await repo.audit_page(2, 1)
    assert total == 5 and [e.target for e in page] == ["/api/v1/jobs #3", "/api/v1/jobs #2"]
    assert (page[0].actor, page[0].status, page[0].remote) == ("bob", 403, "127.0.0.1")
    assert await repo.prune_audit(NOW + 2) == 2  # the two older than that instant
    page, total = await repo.audit_page(10, 0)
    assert total == 3 and [e.at for e in page] == [NOW + 4, NOW + 3, NOW + 2]


async def test_device_groups_filter_the_device_list_and_go_with_the_device(repo: Repository) -> None:
    for name in ("a", "b", "c"):
        await repo.add_device(dev(name), "s", NOW)
    assert await repo.set_device_groups(dev("a"), ["canary", "eu", "canary"]) == ["canary", "eu"]
    await repo.set_device_groups(dev("b"), ["eu"])
    with pytest.raises(NotFound):
        await repo.set_device_groups(dev("nobody"), ["eu"])
    listed = await repo.list_devices(group="eu")
    assert [d.device for d in listed] == [dev("a"), dev("b")]
    assert await repo.count_devices(group="canary") == 1
    assert await repo.count_devices(group="canary", name="b") == 0
    assert await repo.groups_of([dev("a"), dev("b"), dev("c")]) == {
        dev("a"): ["canary", "eu"],
        dev("b"): ["eu"],
        dev("c"): [],
    }
    await repo.set_device_groups(dev("a"), [])  # replaced whole: none left
    assert await repo.count_devices(group="canary") == 0
    await repo.delete_device(dev("b"))
    assert await repo.count_devices(group="eu") == 0


async def test_devices_per_version_are_counted_by_the_database(repo: Repository) -> None:
    for name, version in (("a", "1.0.0"), ("b", "1.0.0"), ("c", "2.0.0")):
        await repo.add_device(dev(name), "s", NOW)
        await repo.record_version(dev(name), "default", version, NOW)
    await repo.add_device(dev("m", "other"), "s", NOW)
    await repo.record_version(dev("m", "other"), "MCU", "0.9", NOW)
    assert await repo.version_counts() == [
        ("other", "MCU", "0.9", 1),
        ("pk", "default", "1.0.0", 2),
        ("pk", "default", "2.0.0", 1),
    ]

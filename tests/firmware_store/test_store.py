"""FirmwareStore: content-addressed blobs, hashed on write, verified again after a restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware_store import Blob, BlobTooLarge, FirmwareStore

MAX_SIZE = 1 << 20
FIRMWARE = b"\x7fELF firmware image " + bytes(range(256)) * 8


async def stream(*parts: bytes) -> AsyncIterator[bytes]:
    """The chunks of an upload, as the HTTP layer hands them over."""
    for part in parts:
        yield part


def reference(data: bytes) -> Blob:
    """The blob hashlib says `data` is."""
    return Blob(hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest(), len(data))


def restarted(store: FirmwareStore) -> FirmwareStore:
    """A new store over the same root: what the process sees after a restart (nothing verified yet)."""
    fresh = FirmwareStore(store.root, max_size=store.max_size)
    fresh.open()
    return fresh


def stored_files(root: Path) -> list[Path]:
    """Every blob file under `root`, leaving out the upload scratch folder."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp")


@pytest.fixture
def store(tmp_path: Path) -> FirmwareStore:
    s = FirmwareStore(tmp_path / "firmware", max_size=MAX_SIZE)
    s.open()
    return s


async def test_put_hashes_the_streamed_chunks(store: FirmwareStore) -> None:
    """put() consumes the upload chunk by chunk and returns the sha256, md5 and size hashlib computes."""
    parts = (FIRMWARE[:7], b"", FIRMWARE[7:1000], FIRMWARE[1000:])
    blob = await store.put(stream(*parts))
    assert blob == reference(FIRMWARE)


async def test_put_of_an_empty_upload_stores_the_empty_blob(store: FirmwareStore) -> None:
    """An upload with no bytes is a valid zero-size blob with the digests of the empty string."""
    blob = await store.put(stream())
    assert blob == reference(b"")
    assert store.path(blob.sha256).read_bytes() == b""


async def test_blob_lives_at_its_content_address(store: FirmwareStore) -> None:
    """A blob is stored at `<root>/<sha256[:2]>/<sha256>` with exactly the uploaded bytes."""
    blob = await store.put(stream(FIRMWARE))
    expected = store.root / blob.sha256[:2] / blob.sha256
    assert store.path(blob.sha256) == expected
    assert expected.read_bytes() == FIRMWARE
    assert stored_files(store.root) == [expected]


async def test_identical_content_is_stored_once(store: FirmwareStore) -> None:
    """Uploading the same bytes twice (chunked differently) yields the same blob and one file."""
    first = await store.put(stream(FIRMWARE))
    second = await store.put(stream(FIRMWARE[:100], FIRMWARE[100:]))
    assert first == second
    assert stored_files(store.root) == [store.path(first.sha256)]
    assert list((store.root / "tmp").iterdir()) == []


async def test_upload_of_exactly_max_size_is_accepted(store: FirmwareStore) -> None:
    """The size limit is inclusive: an upload of exactly max_size bytes is kept."""
    data = b"x" * MAX_SIZE
    blob = await store.put(stream(data[: MAX_SIZE // 2], data[MAX_SIZE // 2 :]))
    assert blob.size == MAX_SIZE


async def test_upload_over_max_size_is_refused_and_leaves_nothing(store: FirmwareStore) -> None:
    """One byte over max_size raises BlobTooLarge and leaves no blob and no temporary file behind."""
    chunk = b"y" * (MAX_SIZE // 4)
    with pytest.raises(BlobTooLarge):
        await store.put(stream(chunk, chunk, chunk, chunk, b"!"))
    assert list((store.root / "tmp").iterdir()) == []
    assert stored_files(store.root) == []


async def test_verify_accepts_an_intact_blob_after_a_restart(store: FirmwareStore) -> None:
    """verify() is true for an untouched blob, also when a fresh store has to re-hash it."""
    blob = await store.put(stream(FIRMWARE))
    assert await store.verify(blob)
    assert await restarted(store).verify(blob)


async def test_verify_rejects_a_modified_blob(store: FirmwareStore) -> None:
    """A blob whose bytes changed on disk (same size) fails verification after a restart."""
    blob = await store.put(stream(FIRMWARE))
    path = store.path(blob.sha256)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = restarted(store)
    assert not await fresh.verify(blob)
    assert not await fresh.verify(blob), "a failed blob must not be remembered as verified"


async def test_verify_rejects_a_truncated_blob(store: FirmwareStore) -> None:
    """A blob cut short on disk fails verification after a restart."""
    blob = await store.put(stream(FIRMWARE))
    path = store.path(blob.sha256)
    path.write_bytes(path.read_bytes()[:-1])
    assert not await restarted(store).verify(blob)


async def test_verify_rejects_a_missing_blob(store: FirmwareStore) -> None:
    """A blob whose file was removed fails verification after a restart instead of raising."""
    blob = await store.put(stream(FIRMWARE))
    store.path(blob.sha256).unlink()
    assert not await restarted(store).verify(blob)


async def test_verify_rejects_a_record_whose_digests_do_not_match(store: FirmwareStore) -> None:
    """verify() checks size and both digests: a record with a wrong md5 or size for the file fails."""
    blob = await store.put(stream(FIRMWARE))
    fresh = restarted(store)
    assert not await fresh.verify(Blob(blob.sha256, "0" * 32, blob.size))
    assert not await fresh.verify(Blob(blob.sha256, blob.md5, blob.size + 1))


async def test_reupload_repairs_a_corrupted_blob(store: FirmwareStore) -> None:
    """Uploading the same firmware again replaces a corrupted file at its address with good bytes."""
    blob = await store.put(stream(FIRMWARE))
    store.path(blob.sha256).write_bytes(b"garbage")
    fresh = restarted(store)
    assert await fresh.put(stream(FIRMWARE)) == blob
    assert await restarted(store).verify(blob)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("../etc/passwd", id="traversal"),
        pytest.param("", id="empty"),
        pytest.param("a" * 63, id="63-hex"),
        pytest.param("a" * 65, id="65-hex"),
        pytest.param("A" * 64, id="uppercase"),
        pytest.param("g" * 64, id="not-hex"),
        pytest.param("../" + "a" * 61, id="traversal-64-chars"),
        pytest.param("/" + "a" * 63, id="absolute"),
        pytest.param("a" * 32 + "/" + "a" * 31, id="slash-inside"),
        pytest.param("a" * 64 + "\n", id="trailing-newline"),
    ],
)
def test_path_refuses_anything_but_a_sha256_hex_digest(store: FirmwareStore, name: str) -> None:
    """path() only ever turns a 64-character lowercase hex digest into a filesystem path."""
    with pytest.raises(ValueError, match="sha256"):
        store.path(name)


def test_open_clears_leftover_uploads(tmp_path: Path) -> None:
    """open() removes temporary uploads a crash left behind, and keeps stored blobs."""
    root = tmp_path / "firmware"
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / "upload-deadbeef").write_bytes(b"half an upload")
    kept = root / ("ab" * 32)[:2] / ("ab" * 32)
    kept.parent.mkdir()
    kept.write_bytes(b"stored")
    FirmwareStore(root, max_size=MAX_SIZE).open()
    assert list((root / "tmp").iterdir()) == []
    assert kept.read_bytes() == b"stored"


async def test_delete_removes_the_blob(store: FirmwareStore) -> None:
    """delete() removes the file, and the same store no longer vouches for the blob."""
    blob = await store.put(stream(FIRMWARE))
    assert await store.verify(blob)
    await store.delete(blob.sha256)
    assert not store.path(blob.sha256).exists()
    assert not await store.verify(blob)


async def test_delete_of_an_absent_blob_is_a_no_op(store: FirmwareStore) -> None:
    """Deleting a digest that is not stored succeeds and changes nothing."""
    blob = await store.put(stream(FIRMWARE))
    await store.delete("0" * 64)
    assert stored_files(store.root) == [store.path(blob.sha256)]


async def test_delete_refuses_a_path_that_is_not_a_digest(store: FirmwareStore) -> None:
    """delete() validates its argument like path(), so it cannot remove files outside the store."""
    victim = store.root.parent / "victim"
    victim.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="sha256"):
        await store.delete("../victim")
    assert victim.read_bytes() == b"keep me"


async def test_checks_at_once_share_one_hashing_of_a_racy_file(
    store: FirmwareStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after an upload the file is too new to trust its timestamps, so it is hashed on every check;
    checks that arrive while it is being hashed (a campaign's first downloads) share that hashing."""
    blob = await store.put(stream(FIRMWARE))
    hashed: list[str] = []
    real = store._check

    def counting(b: Blob) -> bool:
        hashed.append(b.sha256)
        time.sleep(0.2)  # a large file: every check below arrives (its `stat` done) while this one runs
        return real(b)

    monkeypatch.setattr(store, "_check", counting)
    checks = await asyncio.gather(*(store.check(blob) for _ in range(20)))
    assert all(c.ok for c in checks)
    assert len(hashed) == 1
    assert sum(c.fresh for c in checks) <= 1, "a shared verdict is reported fresh once at most"
    await store.check(blob)  # one after the other: still hashed while the file is racily new
    assert len(hashed) == 2


async def test_a_check_after_the_file_changed_does_not_take_a_running_verdict(
    store: FirmwareStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hashing shared with a check of another state of the file would answer for bytes it never read:
    a check that sees the file changed hashes it itself."""
    blob = await store.put(stream(FIRMWARE))
    path = store.path(blob.sha256)
    release = threading.Event()
    real = store._check

    def slow(b: Blob) -> bool:
        ok = real(b)
        release.wait(5.0)
        return ok

    monkeypatch.setattr(store, "_check", slow)
    first = asyncio.ensure_future(store.check(blob))
    await asyncio.sleep(0.2)  # hashing the intact file
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000))  # a state the first check did not see
    second = asyncio.ensure_future(store.check(blob))
    await asyncio.sleep(0.2)
    release.set()
    assert (await first).ok
    assert not (await second).ok

"""Firmware blobs stored by their sha256 under `<root>/`; hashes computed once, on write."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import aiofiles.os

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_READ_BLOCK = 1 << 20


class BlobTooLarge(ValueError):
    """The upload exceeded the store's size limit; nothing was kept."""


@dataclass(frozen=True, slots=True)
class Check:
    """A blob's verdict; `fresh` when it was just computed (the first after a change of the file)."""

    ok: bool
    fresh: bool


@dataclass(frozen=True, slots=True)
class _FileState:
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


def _state(path: Path) -> _FileState:
    st = path.stat()
    return _FileState(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@dataclass(frozen=True, slots=True)
class _Verdict:
    state: _FileState | None  # None: the file was missing
    ok: bool
    trusted: bool  # False while the file may still change without its timestamps showing it


_RACY_NS = 2_000_000_000  # timestamps may be this coarse (FAT: 2 s); ext4 and xfs tick per jiffy


@dataclass(frozen=True, slots=True)
class Blob:
    sha256: str
    md5: str
    size: int


class FirmwareStore:
    """Content-addressed files: `<root>/<sha256[:2]>/<sha256>`.

    Names from uploads never reach the filesystem: the only path component taken from outside is a
    validated sha256 hex digest. A blob is verified (size and both digests) the first time it is served
    after a start and again whenever its file's size, mtime, ctime or inode differ from when it was last
    hashed; the verdict is kept only for that state of the file. A file changed within `_RACY_NS` of
    its hashing could change again with the same timestamps, so it is hashed again until it is older
    (git's "racily clean" rule). A blob that fails is never served. Checks of one blob that arrive while
    it is being hashed share that hashing (a campaign started right after an upload sends many downloads
    at once into the racy window: each hashed the whole file again).
    """

    def __init__(self, root: Path, *, max_size: int) -> None:
        self.root = root
        self.max_size = max_size
        self._tmp = root / "tmp"
        self._verdicts: dict[str, _Verdict] = {}
        # blob -> the state of its file being hashed now, and that hashing
        self._hashing: dict[str, tuple[_FileState | None, asyncio.Future[Check]]] = {}

    def open(self) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():  # uploads cut short by a crash
            leftover.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    async def put(self, chunks: AsyncIterable[bytes]) -> Blob:
        """Store the stream, hashing as it is written; an identical blob is stored once."""
        md5, sha256, size = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0
        tmp = self._tmp / f"upload-{secrets.token_hex(8)}"
        try:
            async with aiofiles.open(tmp, "wb") as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_size:
                        raise BlobTooLarge(f"firmware exceeds the {self.max_size}-byte upload limit")
                    md5.update(chunk)
                    sha256.update(chunk)
                    await out.write(chunk)
                await out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
            blob = Blob(sha256.hexdigest(), md5.hexdigest(), size)
            final = self.path(blob.sha256)
            final.parent.mkdir(exist_ok=True)
            await aiofiles.os.replace(tmp, final)
            self._remember(blob.sha256, _state(final), ok=True)
            return blob
        finally:
            tmp.unlink(missing_ok=True)

    async def verify(self, blob: Blob) -> bool:
        """True when the stored file still has the blob's size and digests."""
        return (await self.check(blob)).ok

    async def check(self, blob: Blob) -> Check:
        """Whether the stored file still has the blob's size and digests: hashed again only when the file
        changed since it was last hashed (a `stat` otherwise)."""
        try:
            state: _FileState | None = await asyncio.to_thread(_state, self.path(blob.sha256))
        except OSError:
            state = None
        known = self._verdicts.get(blob.sha256)
        if known is not None and known.state == state and known.trusted:
            return Check(known.ok, fresh=False)
        running = self._hashing.get(blob.sha256)
        if running is not None and running[0] == state:  # the same state of the file, hashed now: share it
            return Check((await asyncio.shield(running[1])).ok, fresh=False)
        hashing = asyncio.ensure_future(self._hash(blob, state, known))
        self._hashing[blob.sha256] = (state, hashing)
        hashing.add_done_callback(lambda _: self._hashed(blob.sha256, hashing))
        return await asyncio.shield(hashing)  # a request that goes away leaves it to the others

    def _hashed(self, sha256: str, hashing: asyncio.Future[Check]) -> None:
        running = self._hashing.get(sha256)
        if running is not None and running[1] is hashing:
            del self._hashing[sha256]

    async def _hash(self, blob: Blob, state: _FileState | None, known: _Verdict | None) -> Check:
        ok = state is not None and await asyncio.to_thread(self._check, blob)
        self._remember(blob.sha256, state, ok=ok)
        return Check(ok, fresh=known is None or known.state != state or known.ok != ok)

    def _remember(self, sha256: str, state: _FileState | None, *, ok: bool) -> None:
        racy = state is not None and time.time_ns() - max(state.mtime_ns, state.ctime_ns) < _RACY_NS
        self._verdicts[sha256] = _Verdict(state, ok, trusted=not racy)

    def _check(self, blob: Blob) -> bool:
        path = self.path(blob.sha256)
        md5, sha256, size = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0
        try:
            with path.open("rb") as f:
                while block := f.read(_READ_BLOCK):
                    size += len(block)
                    md5.update(block)
                    sha256.update(block)
        except OSError:
            return False
        return (size, md5.hexdigest(), sha256.hexdigest()) == (blob.size, blob.md5, blob.sha256)

    async def read(self, blob: Blob, offset: int, size: int) -> bytes | None:
        """`size` bytes of the blob from `offset` (fewer at its end), read from the file alone; None when
        the stored file no longer matches the blob (it is never served)."""
        if not (await self.check(blob)).ok:
            return None
        return await asyncio.to_thread(_read_range, self.path(blob.sha256), offset, size)

    async def delete(self, sha256: str) -> None:
        self._verdicts.pop(sha256, None)
        await asyncio.to_thread(self.path(sha256).unlink, missing_ok=True)


def _read_range(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)

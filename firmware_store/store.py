"""Firmware blobs stored by their sha256 under `<root>/`; hashes computed once, on write."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
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
class Blob:
    sha256: str
    md5: str
    size: int


class FirmwareStore:
    """Content-addressed files: `<root>/<sha256[:2]>/<sha256>`.

    Names from uploads never reach the filesystem: the only path component taken from outside is a
    validated sha256 hex digest. A blob is verified (size and both digests) the first time it is served
    after a start; a blob that fails is never served.
    """

    def __init__(self, root: Path, *, max_size: int) -> None:
        self.root = root
        self.max_size = max_size
        self._tmp = root / "tmp"
        self._verified: set[str] = set()

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
            self._verified.add(blob.sha256)
            return blob
        finally:
            tmp.unlink(missing_ok=True)

    async def verify(self, blob: Blob) -> bool:
        """True when the stored file still has the blob's size and digests (checked once per start)."""
        if blob.sha256 in self._verified:
            return True
        ok = await asyncio.to_thread(self._check, blob)
        if ok:
            self._verified.add(blob.sha256)
        return ok

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

    async def delete(self, sha256: str) -> None:
        self._verified.discard(sha256)
        await asyncio.to_thread(self.path(sha256).unlink, missing_ok=True)

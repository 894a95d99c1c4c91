"""What operators do with firmware: upload (one file or a package), delete (and its blobs no other
firmware shares); and what they read of firmware."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, Callable, Sequence

from firmware_store import Blob, FirmwareStore
from plugins.ota.app.catalog import Catalog
from plugins.ota.core.errors import InvalidInput
from plugins.ota.core.model import (
    FILE_NAME,
    FILE_NAME_RULE,
    MAX_PACKAGE_FILES,
    Firmware,
    FirmwareFile,
    FirmwareStatus,
    SignMethod,
)
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")


class FirmwareAdmin:
    def __init__(
        self, repo: Repository, store: FirmwareStore, catalog: Catalog, clock: Callable[[], float]
    ) -> None:
        self.repo = repo
        self.store = store
        self.catalog = catalog
        self.clock = clock

    @property
    def max_size(self) -> int:
        """The largest firmware file the store takes, in bytes."""
        return self.store.max_size

    async def put_blob(self, chunks: AsyncIterable[bytes]) -> Blob:
        """Store an upload's bytes (hashed on the way); `add` then makes it firmware, or `discard_upload`
        drops it."""
        return await self.store.put(chunks)

    async def get(self, firmware_id: int) -> Firmware:
        return await self.repo.get_firmware(firmware_id)

    async def page(
        self, product_key: str | None = None, *, limit: int = -1, offset: int = 0
    ) -> tuple[list[Firmware], int]:
        """Firmware oldest first, and how many there are in all."""
        return (
            await self.repo.list_firmware(product_key, limit=limit, offset=offset),
            await self.repo.count_firmware(product_key),
        )

    async def add(
        self,
        package: Blob | Sequence[tuple[str, Blob]],
        *,
        product_key: str,
        version: str,
        module: str,
        sign_method: SignMethod,
        src_version: str | None,
        description: str,
        verify: bool = False,
    ) -> Firmware:
        """Record uploaded blobs as firmware: one file, or a package of (file name, blob) in order; the caller
        discards the blobs if this raises. Firmware uploaded with `verify` must pass a verify job before batch
        jobs take it (as Aliyun's NeedToVerify)."""
        files = [("", package)] if isinstance(package, Blob) else list(package)
        if not 1 <= len(files) <= MAX_PACKAGE_FILES:
            raise InvalidInput("file", f"give 1 to {MAX_PACKAGE_FILES} files")
        for name, blob in files:
            if blob.size == 0:
                raise InvalidInput("file", f"{name or 'the firmware file'} is empty")
        if len(files) > 1:
            for name, _ in files:
                if not FILE_NAME.fullmatch(name):
                    raise InvalidInput("file", f"file name {name[:80]!r}: {FILE_NAME_RULE}")
            if len({name for name, _ in files}) != len(files):
                raise InvalidInput("file", "the files of a package need different names")
        main = files[0][1]
        firmware = await self.repo.add_firmware(
            product_key=product_key,
            module=module,
            version=version,
            src_version=src_version,
            size=main.size,
            md5=main.md5,
            sha256=main.sha256,
            sign_method=sign_method,
            description=description,
            now=self.clock(),
            status=FirmwareStatus.UNVERIFIED if verify else FirmwareStatus.NO_VERIFY_NEEDED,
            files=[FirmwareFile(n, b.size, b.md5, b.sha256) for n, b in files] if len(files) > 1 else (),
        )
        log.info(
            "firmware %d added: %s/%s %s, %d file(s), %d bytes",
            firmware.id,
            product_key,
            module,
            version,
            len(files),
            sum(b.size for _, b in files),
        )
        return firmware

    async def discard_upload(self, blob: Blob) -> None:
        """Drop an uploaded blob that did not become firmware (unless other firmware shares it)."""
        await self._drop_blob_if_unused(blob)

    async def _drop_blob_if_unused(self, blob: Blob) -> None:
        if not await self.repo.blob_in_use(blob.sha256):
            await self.store.delete(blob.sha256)

    async def delete(self, firmware_id: int) -> None:
        firmware = await self.repo.delete_firmware(firmware_id)
        self.catalog.firmware_deleted(firmware_id)
        for file in firmware.package:
            await self._drop_blob_if_unused(Blob(file.sha256, file.md5, file.size))
        log.info("firmware %d deleted", firmware_id)

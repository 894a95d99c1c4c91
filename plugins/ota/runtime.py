"""The OTA service built whole from its settings: the TLS files, the repository, the firmware store, the
link signer, `OtaApp`, the HTTPS download endpoint, the management API and the periodic tick.

The amqtt plugin (plugins.ota.plugin) owns one `OtaRuntime`, hands it the device channel, starts it
once the broker is up and stops it in two steps: the listeners and the tick before the broker closes
its sessions, the database after.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from firmware_store import DownloadSlots, FirmwareStore, LinkSigner
from firmware_store.server import Site, download_app, start_site
from firmware_store.tls import TlsFiles, ensure_tls, exclusive, write_private
from plugins.device_auth.gate import Gate
from plugins.ota.app.admission import probe_loop_lag
from plugins.ota.app.channel import DeviceChannel
from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core.admission import TransferWindow
from plugins.ota.core.topics import DeviceRef
from plugins.ota.http.admin import admin_app
from plugins.ota.metrics import OtaMetrics
from plugins.ota.settings import AuthMode, Settings
from plugins.ota.store.postgres import PostgresRepository
from plugins.ota.store.repository import Repository
from plugins.ota.store.sqlite import SqliteRepository

log = logging.getLogger("ota.plugin")


class OtaRuntime:
    """One OTA service: built by `start`, its listeners closed by `stop_serving`, its database by `close`."""

    def __init__(
        self,
        settings: Settings,
        channel: DeviceChannel,
        clock: Callable[[], float],
        metrics: OtaMetrics,
    ) -> None:
        self.settings = settings
        self.channel = channel
        self.clock = clock
        self.metrics = metrics
        self.app: OtaApp | None = None  # set once `start` has built it
        self.tls: TlsFiles | None = None
        self.https_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.admin_api: web.Application | None = None
        self.broker_auth: Gate | None = None  # the device-auth gate, for an external broker's hooks
        self.public_url = ""
        self._repo: Repository | None = None
        self._leading = False  # this process runs the periodic work (`Repository.lead`)
        self._sites: list[Site] = []
        self._ticker: asyncio.Task[None] | None = None
        self._lag_probe: asyncio.Task[None] | None = None

    @property
    def open_mode(self) -> bool:
        return self.settings.auth_mode == AuthMode.OPEN

    async def start(self) -> OtaApp:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        with exclusive(s.data_dir):  # replicas sharing the folder make its keys and certificates once
            self.tls = (
                TlsFiles(s.tls_cert, s.tls_cert, s.tls_key)
                if s.tls_cert and s.tls_key
                else ensure_tls(s.data_dir / "tls", s.public_host, s.tls_profile)
            )
            link_key = _secret_file(s.data_dir / "link.key", lambda: secrets.token_bytes(32).hex()).encode()
            token = s.admin_token or _secret_file(
                s.data_dir / "admin.token", lambda: secrets.token_urlsafe(32)
            )
            # A read-only credential for Prometheus: it opens /metrics and nothing else.
            metrics_token = _secret_file(s.data_dir / "metrics.token", lambda: secrets.token_urlsafe(32))
            # An external broker's credential for asking who may connect (attached mode only).
            hook_token = (
                _secret_file(s.data_dir / "broker-auth.token", lambda: secrets.token_urlsafe(32))
                if self.broker_auth is not None
                else ""
            )
        repo = open_repository(s)
        repo.observe = self.metrics.observe_db
        await repo.open()
        self._repo = repo
        if not s.database_url:  # the only process on this state: nobody is connected before it starts
            await repo.mark_all_offline()
        store = FirmwareStore(s.data_dir / "firmware", max_size=s.max_upload_bytes)
        store.open()

        # The signer needs the public URL, which may name the HTTPS port only known once bound.
        signer = LinkSigner(link_key, s.public_url, s.link_ttl_s, offload=s.download_offload)
        # Downloads at once, HTTPS and MQTT streams together; the window admits transfers within it.
        slots = DownloadSlots(s.max_downloads)
        window = TransferWindow(maximum=s.max_downloads, lag_target_s=s.control_lag_target_s)
        self.app = app = OtaApp(
            repo,
            store,
            signer,
            self.channel,
            self.clock,
            auto_register=self.open_mode,
            max_payload_bytes=s.max_payload_bytes,
            progress_per_second=s.progress_per_second,
            progress_burst=s.progress_burst,
            mqtt_download_bytes_per_second=s.mqtt_download_bytes_per_second,
            step_s=s.tick_seconds,
            window=window,
            slots=slots,
            audit_retention_s=s.audit_retention_s,
        )
        # Replicas: none runs job steps before its first ask of the lead (one alone on SQLite leads from the start).
        app.dispatcher.leading = not s.database_url
        dl = download_app(
            store,
            signer,
            app.downloads.resolve_blob,
            app.downloads.may_download,
            self.clock,
            max_per_subject=s.max_downloads_per_device,
            stats=self.metrics.sources.downloads,
            slots=slots,
        )
        site = await start_site(
            dl,
            s.https_bind.host,
            s.https_bind.port,
            self.tls.server_context(s.tls_profile),
            header_timeout_s=s.http_header_timeout_s,
        )
        self._sites.append(site)
        self.https_address = site.address
        self.public_url = signer.base_url = s.public_url_for(self.https_address[1])
        log.info(
            "https listening on %s (devices download from %s)", _fmt(self.https_address), self.public_url
        )
        sources = self.metrics.sources
        sources.rejected = lambda: app.rejected
        sources.notices_sent = lambda: app.notices_sent
        sources.task_states = app.task_state_counts
        sources.download_slots = lambda: (slots.used(self.clock()), slots.capacity)
        window_of = app.admission
        sources.transfer_window = lambda: (
            window_of.window.limit,
            window_of.window.in_flight,
            window_of.waiting_total,
        )
        hooks = None
        if self.broker_auth is not None:  # an external broker asks who may connect: its own credential
            hooks = (self.broker_auth, hook_token)
        self.admin_api = admin_app(
            app, token, metrics=self.metrics, metrics_token=metrics_token, broker_auth=hooks
        )
        site = await start_site(
            self.admin_api,
            s.admin_bind.host,
            s.admin_bind.port,
            self.tls.server_context(s.tls_profile) if s.admin_tls else None,
            header_timeout_s=s.http_header_timeout_s,
        )
        self._sites.append(site)
        self.admin_address = site.address
        scheme = "https" if s.admin_tls else "http"
        log.info("admin api listening on %s://%s/api/v1", scheme, _fmt(self.admin_address))
        if self.open_mode:
            log.warning(
                "AUTH MODE IS 'open': any client may connect without credentials and act as any device. "
                "Use it only on a trusted lab network; set OTA_AUTH_MODE=device-secret otherwise."
            )
        else:
            log.info("auth mode: device-secret (devices log in with Aliyun one-device-one-secret signatures)")
        self._ticker = asyncio.create_task(self._tick_loop(app))
        self._lag_probe = asyncio.create_task(probe_loop_lag(self._lagged))
        return app

    def _lagged(self, lag_s: float) -> None:
        self.metrics.loop_lag.observe(lag_s)
        if self.app is not None:
            self.app.admission.lagged(lag_s)

    @property
    def leading(self) -> bool:
        """This process runs the periodic work (alone, or the replica holding the lead)."""
        return self._leading or not self.settings.database_url

    @property
    def repo(self) -> Repository:
        assert self._repo is not None, "the service is not started"
        return self._repo

    async def _tick_loop(self, app: OtaApp) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_seconds)
            try:
                leading = await self.repo.lead()
                if leading != self._leading and self.settings.database_url:
                    log.info(
                        "this replica %s the periodic work (timeouts, retries, job steps)",
                        "now runs" if leading else "no longer runs",
                    )
                self._leading = leading
                await app.tick(lead=leading)
            except Exception:
                log.exception("periodic task check failed")

    async def stop_serving(self) -> None:
        """Stop the tick and close the HTTP listeners (before the broker closes its sessions)."""
        for task in (self._ticker, self._lag_probe):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._ticker = self._lag_probe = None
        for site in self._sites:
            await site.close()
        self._sites.clear()

    async def close(self) -> None:
        """Finish in-flight work, then close the database (after the broker closed its sessions)."""
        if self.app is not None:
            await self.app.drain()
        if self._repo is not None:
            await self._repo.close()
            self._repo = None

    async def device_login(self, device: DeviceRef) -> tuple[str, bool] | None:
        """The device's secret and whether it is enabled; None for no such device or before the start."""
        if self.app is None or self._repo is None:
            return None
        return await self.app.device_login(device)


def open_repository(settings: Settings) -> Repository:
    """The service's state: PostgreSQL at `database_url` (shared by replicas), else SQLite in the data folder."""
    if settings.database_url:
        return PostgresRepository(settings.database_url)
    return SqliteRepository(settings.data_dir / "ota.db")


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    """Read a secret kept in `path` (mode 0600), creating it on first use."""
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = make()
    write_private(path, (value + "\n").encode())
    return value

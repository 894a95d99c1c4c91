"""The amqtt adapter: hosts the OTA service inside the broker process.

It turns broker events into service calls, implements the service's `DeviceChannel` by writing straight
into device sessions (auto-delivery: a device gets its notice whether or not it subscribed, exactly once
if it did), and runs the HTTPS download endpoint and the management API on the broker's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin
from amqtt.session import ApplicationMessage, Session

from firmware_store import FirmwareStore, LinkSigner
from firmware_store.server import Site, download_app, start_site
from firmware_store.tls import TlsFiles, ensure_tls, write_private
from plugins.broker_port import MqttBroker
from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core.messages import Outgoing, same_notice
from plugins.ota.core.topics import DeviceRef, InvalidDeviceRef, OtaTopic, topic_name
from plugins.ota.http.admin import admin_app
from plugins.ota.metrics import OtaMetrics
from plugins.ota.settings import OtaConfig, Settings, resolve
from plugins.ota.store.repository import Repository
from plugins.ota.store.sqlite import SqliteRepository

log = logging.getLogger("ota.plugin")

REVOKED_KEEP_S = 120.0  # longer than a login can take (amqtt's connect timeout and the auth checks)


class OtaPlugin(BasePlugin[BrokerContext]):
    """`plugins.ota.plugin.OtaPlugin` in the broker's `plugins:` section."""

    Config = OtaConfig

    def __init__(self, context: BrokerContext, clock: Callable[[], float] = time.time) -> None:
        super().__init__(context)
        self.settings: Settings = resolve(self.config)
        self.clock = clock
        self.service: OtaApp | None = None
        self.start_error: BaseException | None = None
        self.https_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.public_url = ""
        self.tls: TlsFiles | None = None
        self._repo: Repository | None = None
        self._sites: list[Site] = []
        self._ticker: asyncio.Task[None] | None = None
        self._client_device: dict[str, DeviceRef] = {}
        self._device_clients: dict[DeviceRef, list[str]] = {}  # newest last
        self._conns: dict[str, _Connection] = {}  # client id -> the connection that authenticated
        # device -> when (event loop time) its credentials last changed; oldest first, kept REVOKED_KEEP_S
        self._revoked: dict[DeviceRef, float] = {}
        self._broker: MqttBroker | None = None  # given by the broker (`bind_broker`)
        self.metrics = OtaMetrics()

    def bind_broker(self, broker: MqttBroker) -> None:
        """ota-broker's broker hands itself over: the plugin delivers and closes connections through it."""
        self._broker = broker

    @property
    def broker(self) -> MqttBroker:
        if self._broker is None:
            raise RuntimeError("the OTA plugin runs in ota-broker's broker only (`ota-broker run`)")
        return self._broker

    # ------------------------------------------------------------------------------------ lifecycle

    async def on_broker_post_start(self) -> None:
        try:
            await self._start()
        except Exception as e:  # amqtt swallows event failures: keep it for the runner to act on
            self.start_error = e  # `broker.app.start` reports it in one line and exits
            log.debug("the OTA service could not start: %s", e, exc_info=True)

    async def _start(self) -> None:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.tls = (
            TlsFiles(s.tls_cert, s.tls_cert, s.tls_key)
            if s.tls_cert and s.tls_key
            else ensure_tls(s.data_dir / "tls", s.public_host, s.tls_profile)
        )
        repo = SqliteRepository(s.data_dir / "ota.db")
        repo.observe = self.metrics.observe_db
        await repo.open()
        self._repo = repo
        await repo.mark_all_offline()
        store = FirmwareStore(s.data_dir / "firmware", max_size=s.max_upload_bytes)
        store.open()
        link_key = _secret_file(s.data_dir / "link.key", lambda: secrets.token_bytes(32).hex()).encode()
        token = s.admin_token or _secret_file(s.data_dir / "admin.token", lambda: secrets.token_urlsafe(32))
        # A read-only credential for Prometheus: it opens /metrics and nothing else.
        metrics_token = _secret_file(s.data_dir / "metrics.token", lambda: secrets.token_urlsafe(32))

        # The signer needs the public URL, which may name the HTTPS port only known once bound.
        signer = LinkSigner(link_key, s.public_url, s.link_ttl_s, offload=s.download_offload)
        self.service = service = OtaApp(
            repo,
            store,
            signer,
            self,
            self.clock,
            auto_register=self.open_mode,
            max_payload_bytes=s.max_payload_bytes,
            progress_per_second=s.progress_per_second,
            progress_burst=s.progress_burst,
            mqtt_download_bytes_per_second=s.mqtt_download_bytes_per_second,
            step_s=s.tick_seconds,
        )
        dl = download_app(
            store,
            signer,
            service.downloads.resolve_blob,
            service.downloads.may_download,
            self.clock,
            max_per_subject=s.max_downloads_per_device,
            stats=self.metrics.sources.downloads,
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
        self._wire_metrics(service, repo)
        site = await start_site(
            admin_app(service, token, metrics=self.metrics, metrics_token=metrics_token),
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
        self._ticker = asyncio.create_task(self._tick_loop())

    def _wire_metrics(self, service: OtaApp, repo: Repository) -> None:
        sources = self.metrics.sources
        sources.devices_connected = lambda: len(self._device_clients)
        sources.clients_connected = lambda: len(self._conns)
        sources.broker_delivered = self._broker_delivered
        sources.rejected = lambda: service.rejected
        sources.notices_sent = lambda: service.notices_sent
        sources.task_states = repo.task_state_counts

    def _broker_delivered(self) -> int | None:
        """The broker's count of deliveries to subscribers."""
        return None if self._broker is None else self._broker.delivered_count

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick_seconds)
            if self.service is not None:
                try:
                    await self.service.tick()
                except Exception:
                    log.exception("periodic task check failed")

    async def on_broker_pre_shutdown(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        for site in self._sites:
            await site.close()
        self._sites.clear()

    async def close(self) -> None:
        """After the broker closed its sessions: finish in-flight work, then close the database."""
        if self.service is not None:
            await self.service.drain()
        if self._repo is not None:
            await self._repo.close()
            self._repo = None

    # ------------------------------------------------------------------ DeviceDirectory (for auth)

    @property
    def open_mode(self) -> bool:
        return self.settings.auth_mode == "open"

    @property
    def auth_mode(self) -> str:
        return self.settings.auth_mode

    async def device_login(self, device: DeviceRef) -> tuple[str, bool] | None:
        if self._repo is None:
            return None
        return await self._repo.device_login(device)

    # ------------------------------------------------------------------------------- broker events

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        """Record the connection that authenticated; the OTA service delivers through this record. (The
        broker, `broker.hardened.HardenedBroker`, has already closed an older connection with this client id,
        MQTT-3.1.4-2, and authenticates before it touches its session table.)"""
        entry = self.broker.connection(client_id)
        if entry is None or entry[0] is not client_session:
            return
        old = self._conns.get(client_id)
        device = DeviceRef.from_username(client_session.username)
        if device is not None and self._revoked_since_login(device, client_session):
            # Disabled, deleted or given a new secret after this login read its credentials, before the
            # connection was recorded here where `disconnect` finds it: checked again, and closed.
            log.info(
                "closing the connection of %s (client %r): its credentials changed while it logged in",
                device,
                client_id[:96],
                extra={"device": str(device)},
            )
            self._end(entry[1])
            return
        self._conns[client_id] = _Connection(client_session, entry[1], self.clock())
        if (
            device is not None
            and self.service is not None
            and (self._bind(client_id, device) or old is not None)
        ):
            await self.service.events.device_connected(device)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        conn = self._conns.get(client_id)
        if conn is None or conn.session is not client_session:
            return  # an older connection of a client id that has connected again
        if self.broker.is_connected(conn.session):
            return  # the same session taken over by a new connection (clean session off)
        del self._conns[client_id]
        device = self._client_device.pop(client_id, None)
        if device is None:
            return
        clients = self._device_clients.get(device, [])
        if client_id in clients:
            clients.remove(client_id)
        if not clients:
            self._device_clients.pop(device, None)
            if self.service is not None:
                await self.service.events.device_disconnected(device)

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        parsed = _parse(topic)
        if parsed is None or parsed.kind.device_to_server or self.service is None or not self.open_mode:
            return
        if self._bind(client_id, parsed.device):
            await self.service.events.device_connected(parsed.device)

    async def on_broker_message_received(self, *, client_id: str, message: ApplicationMessage | None) -> None:
        if message is None or self.service is None:
            return
        try:
            parsed = OtaTopic.parse(message.topic)
        except InvalidDeviceRef as e:
            self.metrics.message_received(None)
            self.service.reject(client_id, "bad_topic", f"{message.topic[:128]!r}: {e}")
            return
        self.metrics.message_received(None if parsed is None else parsed.kind)
        if parsed is None or not parsed.kind.device_to_server:
            return
        if not self._may_act_for(client_id, parsed.device):
            self.service.reject(
                parsed.device, "foreign_publish", f"client {client_id[:96]!r} is not this device"
            )
            return
        newly = self.open_mode and self._bind(client_id, parsed.device)
        await self.service.events.handle_publish(parsed, bytes(message.data or b""), now_online=newly)

    # ------------------------------------------------------------------ sessions and device identity

    def _bind(self, client_id: str, device: DeviceRef) -> bool:
        """Make `client_id` the current session of `device` (open mode); True when that is new.

        One client acts for one device. A device may have several clients at once (a lab's
        `mosquitto_sub` and `mosquitto_pub` with the same credentials): the newest connected one is its
        session, and when it leaves the previous one still connected takes over.
        """
        old = self._client_device.get(client_id)
        if old is not None and old != device:
            return False
        clients = self._device_clients.setdefault(device, [])
        if clients and clients[-1] == client_id:
            return False
        if client_id in clients:
            clients.remove(client_id)
        clients.append(client_id)
        self._client_device[client_id] = device
        return True

    def _may_act_for(self, client_id: str, device: DeviceRef) -> bool:
        """Whether this client may speak for `device`. The broker fires its message event before any
        topic ACL check, so the OTA service checks the sender itself."""
        bound = self._client_device.get(client_id)
        if self.open_mode:
            return bound is None or bound == device
        return bound == device  # device-secret: the device it authenticated as

    def _connection(self, device: DeviceRef) -> _Connection | None:
        for client_id in reversed(self._device_clients.get(device, [])):
            conn = self._conns.get(client_id)
            if conn is not None and self.broker.is_connected(conn.session):
                return conn
        return None

    def is_online(self, device: DeviceRef) -> bool:
        return self._connection(device) is not None

    def session_started_at(self, device: DeviceRef) -> float | None:
        conn = self._connection(device)
        return None if conn is None else conn.connected_at

    async def send(self, device: DeviceRef, message: Outgoing) -> bool:
        """Deliver to the device's own session (at the message's QoS when it did not subscribe), plus any
        other subscribers of its topic (at the QoS they were granted)."""
        topic, payload, qos = topic_name(message.kind, device), message.payload, message.qos
        self.metrics.message_sent(message.kind)
        broker = self.broker
        conn = self._connection(device)
        if conn is not None and qos and self._holds(conn.session, topic, payload):
            # Its session has this notice unacknowledged or queued (a persistent session after a restart or
            # a reconnect): that copy is sent again, with DUP and its packet id; a second one would be a
            # duplicate.
            return True
        subscribed = conn is not None and broker.is_subscribed(conn.session, topic)
        # Subscribers, the device among them if it subscribed, get it through the broker's routing.
        await self.context.broadcast_message(topic, payload)  # each at its granted QoS
        if conn is None:
            return False
        if not subscribed:  # the broker keeps a QoS 1 message in flight until acknowledged, resending it
            broker.deliver(conn.session, topic, payload, qos)
        return True

    def _holds(self, session: Session, topic: str, payload: bytes) -> bool:
        """Whether `session` has the same notice on `topic` in flight (unacknowledged) or queued (offline)."""
        return any(t == topic and same_notice(held, payload) for t, held in self.broker.pending(session))

    def _revoked_since_login(self, device: DeviceRef, session: Session) -> bool:
        """Whether `device`'s credentials changed after `session` began to authenticate (the broker
        stamps `authenticated_since` on the session)."""
        since = getattr(session, "authenticated_since", None)
        revoked = self._revoked.get(device)
        return not self.open_mode and since is not None and revoked is not None and revoked >= since

    def _end(self, handler: Any) -> None:
        self.broker.end_connection(handler)

    async def disconnect(self, device: DeviceRef) -> None:
        """Close every connection of `device`, including one still logging in (its credentials changed)."""
        now = asyncio.get_running_loop().time()
        self._revoked.pop(device, None)
        self._revoked[device] = now
        while self._revoked:  # forget changes older than any login still in progress could be
            oldest, at = next(iter(self._revoked.items()))
            if at >= now - REVOKED_KEEP_S:
                break
            del self._revoked[oldest]
        for client_id in list(self._device_clients.get(device, [])):
            conn = self._conns.get(client_id)
            if conn is not None:
                log.info(
                    "closing the connection of %s (client %r)",
                    device,
                    client_id[:96],
                    extra={"device": str(device)},
                )
                self._end(conn.handler)


@dataclass(slots=True)
class _Connection:
    session: Session
    handler: Any  # amqtt's BrokerProtocolHandler of this connection
    connected_at: float


def _parse(topic: str) -> OtaTopic | None:
    try:
        return OtaTopic.parse(topic)
    except InvalidDeviceRef:
        return None


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

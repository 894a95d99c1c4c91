"""The amqtt adapter: a thin translator between the broker's events and the OTA app layer.

It turns broker events (connect, disconnect, subscribe, publish) into app-layer calls, and implements the
app layer's `DeviceChannel` over the broker interface (plugins.broker_port): it delivers straight into
device sessions (auto-delivery: a device gets its notice whether or not it subscribed, exactly once if
it did) and closes them. Everything else - the database, the firmware store, the HTTPS download endpoint,
the management API, the periodic tick - is built by `plugins.ota.runtime.OtaRuntime`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from amqtt.broker import BrokerContext
from amqtt.plugins.base import BasePlugin
from amqtt.session import ApplicationMessage, Session

from firmware_store.tls import TlsFiles
from plugins.broker_port import MqttBroker
from plugins.device_auth.plugin import DeviceAuthPlugin
from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core.messages import Outgoing, same_notice
from plugins.ota.core.topics import DeviceRef, InvalidDeviceRef, OtaTopic, topic_name
from plugins.ota.metrics import OtaMetrics
from plugins.ota.runtime import OtaRuntime
from plugins.ota.settings import OtaConfig, Settings, validate

log = logging.getLogger("ota.plugin")

REVOKED_KEEP_S = 120.0  # longer than a login can take (amqtt's connect timeout and the auth checks)


class OtaPlugin(BasePlugin[BrokerContext]):
    """`plugins.ota.plugin.OtaPlugin` in the broker's `plugins:` section."""

    Config = OtaConfig

    def __init__(self, context: BrokerContext, clock: Callable[[], float] = time.time) -> None:
        super().__init__(context)
        self.settings: Settings = validate(self.config)  # the entry as `broker.config` resolved it
        self.clock = clock
        self.metrics = OtaMetrics()
        self.runtime = OtaRuntime(self.settings, self, clock, self.metrics)
        self.start_error: BaseException | None = None
        self._client_device: dict[str, DeviceRef] = {}
        self._device_clients: dict[DeviceRef, list[str]] = {}  # newest last
        self._conns: dict[str, _Connection] = {}  # client id -> the connection that authenticated
        # device -> when (event loop time) its credentials last changed; oldest first, kept REVOKED_KEEP_S
        self._revoked: dict[DeviceRef, float] = {}
        self._broker: MqttBroker | None = None  # given by the broker (`bind_broker`)
        sources = self.metrics.sources
        sources.devices_connected = lambda: len(self._device_clients)
        sources.clients_connected = lambda: len(self._conns)
        sources.broker_delivered = self._broker_delivered
        sources.control_latency = self._control_latency

    def bind_broker(self, broker: MqttBroker) -> None:
        """ota-broker's broker hands itself over: the plugin delivers and closes connections through it."""
        self._broker = broker

    @property
    def broker(self) -> MqttBroker:
        if self._broker is None:
            raise RuntimeError("the OTA plugin runs in ota-broker's broker only (`ota-broker run`)")
        return self._broker

    @property
    def service(self) -> OtaApp | None:
        """The app layer (None until the runtime has built it; it is built before the listeners start)."""
        return self.runtime.app

    # The runtime's listeners, for the runner's messages and the tests.
    @property
    def https_address(self) -> tuple[str, int] | None:
        return self.runtime.https_address

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return self.runtime.admin_address

    @property
    def public_url(self) -> str:
        return self.runtime.public_url

    @property
    def tls(self) -> TlsFiles | None:
        return self.runtime.tls

    # ------------------------------------------------------------------------------------ lifecycle

    async def on_broker_post_start(self) -> None:
        auth = self.broker.find_plugin(DeviceAuthPlugin) if self._broker is not None else None
        self.runtime.broker_auth = auth.gate if auth is not None else None
        try:
            await self.runtime.start()
        except Exception as e:  # amqtt swallows event failures: keep it for the runner to act on
            self.start_error = e  # `broker.app.start` reports it in one line and exits
            log.debug("the OTA service could not start: %s", e, exc_info=True)

    def _broker_delivered(self) -> int | None:
        """The broker's count of deliveries to subscribers."""
        return None if self._broker is None else self._broker.delivered_count

    def _control_latency(self) -> dict[str, tuple[list[tuple[float, int]], float]]:
        """The broker's CONNACK and PUBACK latency histograms."""
        broker = self._broker
        if broker is None:
            return {}
        return {
            "connack": (broker.connack_latency.cumulative(), broker.connack_latency.total_s),
            "puback": (broker.puback_latency.cumulative(), broker.puback_latency.total_s),
        }

    async def on_broker_pre_shutdown(self) -> None:
        await self.runtime.stop_serving()

    async def close(self) -> None:
        """After the broker closed its sessions: finish in-flight work, then close the database."""
        await self.runtime.close()

    # ------------------------------------------------------------------ DeviceDirectory (for auth)

    @property
    def open_mode(self) -> bool:
        return self.settings.auth_mode == "open"

    @property
    def auth_mode(self) -> str:
        return self.settings.auth_mode

    async def device_login(self, device: DeviceRef) -> tuple[str, bool] | None:
        return await self.runtime.device_login(device)

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

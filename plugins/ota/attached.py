"""Attached mode: the OTA service as a client of an MQTT broker the fleet already runs (EMQX, HiveMQ,
VerneMQ, Mosquitto 2), with no broker of its own.

The service connects with its own account and a persistent session (what devices send while it reconnects
waits in the broker), and subscribes to what devices send through shared subscriptions,
`$share/<group>/<filter>`: with several replicas in one group each message reaches one of them. A QoS 1
message is acknowledged only once it is handled (`plugins.ota.service_client`), so what a service had
received and not handled when it died is delivered again: to itself when it comes back, or, for replicas,
to the replica that adopts the session of one gone (each replica has a session of its own, registered in
the database; the leading replica takes over the sessions their replicas left behind, handles what they
hold and erases them). Notices and replies go out with QoS 1 on the device's own topics. Everything else
(the database, the firmware store, the HTTPS downloads, the management API, the periodic tick) is the same
`plugins.ota.runtime.OtaRuntime` as in the embedded broker.

What differs from the embedded broker, and why:

- Who a message is from: the broker's ACL decides who may publish on a device's topics (ota-broker's
  HTTP hooks give EMQX and mosquitto-go-auth the same rules, `plugins.device_auth.hooks`); the service
  takes the device from the topic.
- Online state: the service holds no connections. A broker that announces its clients' connections on
  `$SYS/brokers/+/clients/+/connected|disconnected` (EMQX) marks devices online and offline, and a device's
  connection brings its pending notice; otherwise a device counts as online from its first message (an
  inform, a progress report, a pull) until the service restarts, and a notice for a device that has not
  spoken yet waits for its next message (an SDK informs its version at every connect). One sent to a device
  that is gone waits in the broker if the device keeps a persistent session.
- A device whose credentials change cannot be disconnected from here: the broker refuses its next login
  through the hooks, and its ACL cache decides when its topics close.
- Notices reach a device only if it subscribed to its upgrade topic (every C SDK does); a broker-side
  auto-subscription covers SDKs that rely on Aliyun's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from amqtt.client import ClientError, ConnectError
from amqtt.mqtt.constants import QOS_1

from plugins.device_auth.gate import DeviceAuthConfig, Gate
from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core.messages import Outgoing, is_push_notice
from plugins.ota.core.topics import (
    DeviceRef,
    InvalidDeviceRef,
    OtaTopic,
    TopicKind,
    topic_name,
    uplink_filters,
)
from plugins.ota.metrics import OtaMetrics
from plugins.ota.runtime import OtaRuntime
from plugins.ota.service_client import ServiceClient
from plugins.ota.settings import Settings
from plugins.ota.store.repository import ReplicaRegistry

log = logging.getLogger("ota.attached")

# What devices send, as filters over every device (the service's account must be allowed to subscribe).
UPLINK_FILTERS = uplink_filters()
# Where a broker announces its clients' connections (EMQX: `$SYS/brokers/<node>/clients/<clientid>/...`,
# a JSON payload with `username`); a broker that publishes none (Mosquitto) leaves online state to messages.
CLIENT_EVENTS = ("$SYS/brokers/+/clients/+/connected", "$SYS/brokers/+/clients/+/disconnected")
CONNECT_TIMEOUT_S = 10.0
MAX_HANDLING = 256  # messages handled at once (one device's in order, different devices' side by side)
STOP_WAIT_S = 10.0
RECONNECT_MAX_WAIT_S = 30.0
# A replica counts as gone once its lock on the database is free and it has not beaten for this long (a
# replica whose database connection comes back within it keeps its session).
REPLICA_SILENT_S = 5.0
# Taking over a gone replica's session: it is done once nothing more came for ADOPT_IDLE_S, or after
# ADOPT_MAX_S whatever is left (a broker keeping the session hands it over at the next attempt).
ADOPT_IDLE_S = 1.0
ADOPT_MAX_S = 120.0


CONNACK_REFUSALS = {
    1: "the broker does not accept MQTT 3.1.1 (return code 1)",
    2: "the client id was refused (return code 2)",
    3: "the broker is unavailable (return code 3)",
    4: "bad username or password (return code 4)",
    5: "not authorized (return code 5)",
}


class AttachError(RuntimeError):
    """The external broker cannot be reached or refused the service."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """Where and how the service connects: `mqtt://` or `mqtts://host:port`, its account, its share group."""

    url: str
    username: str | None
    password: str | None
    group: str
    client_id: str
    ca_file: str | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> Attachment:
        parts = urlsplit(s.attach_url)
        username = s.attach_username or (unquote(parts.username) if parts.username else None)
        password = s.attach_password or (unquote(parts.password) if parts.password else None)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        url = f"{parts.scheme}://{netloc}/"
        return cls(url, username, password, s.attach_group, s.attach_client_id, s.attach_ca_file or None)

    def shared(self, topic_filter: str) -> str:
        return f"$share/{self.group}/{topic_filter}"


class AttachedChannel:
    """`DeviceChannel` over an MQTT client: devices are reached by publishing on their topics."""

    def __init__(self, clock: Callable[[], float], metrics: OtaMetrics) -> None:
        self.clock = clock
        self.metrics = metrics
        self.client: ServiceClient | None = None
        self._seen: dict[DeviceRef, float] = {}  # device -> when its first message since the start came
        self._publishing: set[asyncio.Future[Any]] = set()  # notices and replies waiting for their PUBACK

    def came(self, device: DeviceRef) -> None:
        """The broker announced a new connection of `device`: its session starts now."""
        self._seen[device] = self.clock()

    def left(self, device: DeviceRef) -> None:
        self._seen.pop(device, None)

    def heard_elsewhere(self, device: DeviceRef, online: bool) -> None:
        """Another replica (or this one, through the database) recorded `device` online or offline: the
        devices one replica hears from are online for all, so any replica's job step notifies them."""
        if online:
            self._seen.setdefault(device, self.clock())
        else:
            self._seen.pop(device, None)

    def saw(self, device: DeviceRef) -> bool:
        """Record a message from `device`; True when it is the first (the device just came online)."""
        if device in self._seen:
            return False
        self._seen[device] = self.clock()
        return True

    def is_online(self, device: DeviceRef) -> bool:
        return device in self._seen

    def session_started_at(self, device: DeviceRef) -> float | None:
        return self._seen.get(device)

    async def send(self, device: DeviceRef, message: Outgoing) -> bool:
        """Publish on the device's topic at the message's QoS; False when the device has not been heard
        from (its task then waits for its next message) or the broker cannot be reached now.

        A notice or a reply counts as sent once it is handed to the connection, as the embedded broker
        counts one handed to the device's session: its PUBACK is awaited apart, not by the step that sent
        it (waiting for each one's round trip made a 1,000-device campaign 1.3 times as long). Blocks of a
        firmware sent over MQTT do wait for theirs: that is their flow control."""
        if device not in self._seen:
            return False
        client = self.client
        if client is None:
            return False
        self.metrics.message_sent(message.kind)
        publishing = client.publish(topic_name(message.kind, device), message.payload, qos=message.qos)
        if message.kind is not TopicKind.FILE_DOWNLOAD_REPLY:
            task = asyncio.ensure_future(publishing)
            self._publishing.add(task)
            task.add_done_callback(lambda t: self._published(device, t))
            return True
        try:
            await publishing
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.warning(
                "could not publish to %s: the connection closed", device, extra={"device": str(device)}
            )
            return False  # amqtt ends what waits on a connection that closed
        except (TimeoutError, ClientError, ConnectionError, OSError) as e:
            log.warning("could not publish to %s: %s", device, e, extra={"device": str(device)})
            return False
        return True

    def _published(self, device: DeviceRef, task: asyncio.Future[Any]) -> None:
        self._publishing.discard(task)
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            why = "the connection closed" if error is None else f"{type(error).__name__}: {error}"
            log.warning(
                "a message to %s may not have arrived: %s", device, why, extra={"device": str(device)}
            )

    async def settle(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) for the publishes under way to be acknowledged."""
        if self._publishing:
            await asyncio.wait(set(self._publishing), timeout=timeout_s)

    async def disconnect(self, device: DeviceRef) -> None:
        """The broker holds the connections: its next login is refused through the auth hooks."""
        self._seen.pop(device, None)
        log.info(
            "%s: credentials changed; the broker refuses its next login (its open connection is the broker's)",
            device,
            extra={"device": str(device)},
        )


class AttachedService:
    """The OTA service attached to an external broker: the runtime, the MQTT client and its message loop."""

    def __init__(
        self,
        settings: Settings,
        auth: DeviceAuthConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.attachment = Attachment.from_settings(settings)
        self.metrics = OtaMetrics()
        self.channel = AttachedChannel(clock, self.metrics)
        self.runtime = OtaRuntime(settings, self.channel, clock, self.metrics)
        # The external broker asks who may connect through the HTTP hooks: the same gate as the embedded
        # broker's, over this service's device registry and the device-auth accounts of config.yaml.
        self.runtime.broker_auth = Gate(auth or DeviceAuthConfig(), lambda: self)
        self._loop: asyncio.Task[None] | None = None
        self.client: ServiceClient | None = None
        # Several replicas on one database: each registers, and has a session of its own (`client_id`).
        self.registry: ReplicaRegistry | None = None
        self.replica: int | None = None
        self.client_id = self.attachment.client_id
        self._watcher: asyncio.Task[None] | None = None
        self._room = asyncio.Semaphore(MAX_HANDLING)
        self._tails: dict[str, asyncio.Task[None]] = {}  # per device: the last of its messages being handled
        self._handling: set[asyncio.Task[None]] = set()

    @property
    def app(self) -> OtaApp:
        assert self.runtime.app is not None
        return self.runtime.app

    # The gate's `DeviceDirectory` (and its `LoginMetrics` through `metrics`).
    @property
    def auth_mode(self) -> str:
        return self.settings.auth_mode

    async def device_login(self, device: DeviceRef) -> tuple[str, bool] | None:
        return await self.runtime.device_login(device)

    async def start(self) -> None:
        """Start the service (database, HTTPS, API), connect and subscribe; raises AttachError when the
        broker cannot be reached or refuses, after closing what was opened."""
        await self.runtime.start()
        try:
            repo = self.runtime.repo
            await repo.watch_presence(self.channel.heard_elsewhere)
            if self.settings.database_url and isinstance(repo, ReplicaRegistry):
                self.registry = repo
                self.replica, self.client_id = await repo.register_replica(self.attachment.client_id)
            self.client = await self._connect()
        except BaseException:
            await self.runtime.stop_serving()
            await self.runtime.close()
            raise
        self.channel.client = self.client
        self._loop = asyncio.create_task(self._receive())
        if self.registry is not None:
            self._watcher = asyncio.create_task(self._watch_replicas(self.registry))
        log.info(
            "attached to %s as %r (client id %r, shared group %r)",
            self.attachment.url,
            self.attachment.username,
            self.client_id,
            self.attachment.group,
        )

    async def _connect(self) -> ServiceClient:
        """Connect with this service's session and subscribe to what devices send."""
        a = self.attachment
        client = await self._open(self.client_id, clean=False)
        try:
            granted = await asyncio.wait_for(
                client.subscribe([(a.shared(f), QOS_1) for f in UPLINK_FILTERS]), CONNECT_TIMEOUT_S
            )
        except (TimeoutError, ClientError, OSError) as e:
            await _close(client)
            raise AttachError(f"cannot subscribe on {a.url}: {type(e).__name__}: {e}") from e
        refused = [f for f, code in zip(UPLINK_FILTERS, granted, strict=True) if code not in (0, 1, 2)]
        if refused:
            await _close(client)
            raise AttachError(
                f"{a.url} refused the subscriptions {', '.join(refused)} (may the account {a.username!r} "
                "subscribe to them, and does the broker support shared subscriptions?)"
            )
        with contextlib.suppress(ClientError, OSError, TimeoutError):  # optional: not every broker has them
            events = await asyncio.wait_for(
                client.subscribe([(f, QOS_1) for f in CLIENT_EVENTS]), CONNECT_TIMEOUT_S
            )
            if any(code not in (0, 1, 2) for code in events):
                log.info(
                    "the broker refused its client events (%s): online state comes from messages",
                    ", ".join(CLIENT_EVENTS),
                )
        return client

    async def _open(self, client_id: str, *, clean: bool) -> ServiceClient:
        """Connect under `client_id` (a persistent session unless `clean`); AttachError when the broker cannot
        be reached or refuses."""
        a = self.attachment
        config: dict[str, Any] = {
            "keep_alive": 30,
            "auto_reconnect": False,  # the service attaches again itself (`_reattach`), subscriptions included
            "cleansession": clean,
            "default_qos": QOS_1,
        }
        client = ServiceClient(client_id=client_id, config=config)
        url = a.url
        if a.username is not None:  # amqtt reads the account from the URL, percent-decoded
            scheme, rest = url.split("://", 1)
            userinfo = quote(a.username, safe="")
            if a.password is not None:
                userinfo += ":" + quote(a.password, safe="")
            url = f"{scheme}://{userinfo}@{rest}"
        try:
            await asyncio.wait_for(
                client.connect(url, cleansession=clean, cafile=a.ca_file), CONNECT_TIMEOUT_S
            )
        except (TimeoutError, ConnectError, ClientError, OSError) as e:
            await _close(client)
            code = getattr(e, "return_code", None)
            why = (
                CONNACK_REFUSALS.get(code, f"return code {code}")
                if code is not None
                else f"{type(e).__name__}: {e}"
            )
            raise AttachError(f"cannot attach to {a.url} as {a.username!r}: {why}") from e
        return client

    async def _receive(self) -> None:
        """Take what the broker delivers, and attach again whenever the connection is lost."""
        while True:
            client = self.client
            assert client is not None
            try:
                message = await client.deliver_message()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the service stops
                message, lost = None, "the connection closed"  # amqtt cancels its delivery when it does
            except Exception as e:
                message, lost = None, f"{type(e).__name__}: {e}"
            else:
                lost = ""
            if lost:
                await self._reattach(lost)
                continue
            if message is None:
                continue
            await self._room.acquire()  # at most MAX_HANDLING at once: the rest wait in the broker
            self._dispatch(client, message)

    async def _reattach(self, why: str) -> None:
        """Connect and subscribe again, for as long as it takes: a broker that restarted without keeping
        sessions has forgotten the service's subscriptions, so they are made again every time."""
        a = self.attachment
        log.warning("lost the connection to %s (%s): attaching again", a.url, why)
        self.channel.client = None  # meanwhile notices are not sent: their tasks wait as for a device offline
        if self.client is not None:
            await _close(self.client)
        delay = 1.0
        while True:
            try:
                self.client = await self._connect()
            except AttachError as e:
                log.warning("%s; trying again in %gs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_WAIT_S)
                continue
            self.channel.client = self.client
            log.info("attached to %s again", a.url)
            return

    def _dispatch(self, client: ServiceClient, message: Any) -> None:
        """Handle a message in a task of its own, after the messages before it from the same device (their
        order matters: a progress report before the new version's inform), beside other devices'; then
        acknowledge it."""
        topic = str(message.topic)
        key = _order_key(topic)
        before = self._tails.get(key)
        task = asyncio.create_task(self._handle_in_order(before, client, message))
        self._tails[key] = task
        self._handling.add(task)
        task.add_done_callback(lambda t: self._handled(key, t))

    async def _handle_in_order(
        self, before: asyncio.Task[None] | None, client: ServiceClient, message: Any
    ) -> None:
        if before is not None:
            await asyncio.wait([before])  # its outcome is its own
        topic = str(message.topic)
        try:
            await self.handle(topic, bytes(message.data or b""))
        except Exception:  # logged, and acknowledged all the same: delivered again, it would fail again
            log.exception("failed to handle a message on %r", topic[:128])
        await client.acknowledge(message)

    def _handled(self, key: str, task: asyncio.Task[None]) -> None:
        self._room.release()
        self._handling.discard(task)
        if self._tails.get(key) is task:
            del self._tails[key]

    async def _watch_replicas(self, registry: ReplicaRegistry) -> None:
        """Every tick: this replica's heartbeat (registering again if it was taken for gone), and, in the
        leading replica, the adoption of the sessions gone replicas left behind, one after the other."""
        while True:
            await asyncio.sleep(self.settings.tick_seconds)
            try:
                if not await registry.replica_alive():
                    old = self.client_id
                    self.replica, self.client_id = await registry.register_replica(self.attachment.client_id)
                    log.warning("this replica registered again, with the client id %r", self.client_id)
                    if self._loop is not None:  # attach again under the new client id
                        self._loop.cancel()
                        await asyncio.gather(self._loop, return_exceptions=True)
                        await self._reattach("this replica registered again")
                        self._loop = asyncio.create_task(self._receive())
                    # its old session, if it subscribed again meanwhile, is in no one's record: hand it over
                    await self._take_over(old)
                if self.runtime.leading:
                    for replica, client_id in await registry.orphaned_replicas(REPLICA_SILENT_S):
                        await self._adopt(registry, replica, client_id)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the database or the broker away: next tick
                log.warning("replica check failed: %s: %s", type(e).__name__, e)

    async def _adopt(self, registry: ReplicaRegistry, replica: int, client_id: str) -> None:
        """Take over the session of a replica that is gone: stop its share of the subscriptions, handle what
        it holds (what the broker had handed it unacknowledged, and queued for it since), erase it."""
        log.warning("replica %d is gone: taking over its session %r", replica, client_id)
        handled = await self._take_over(client_id)
        if handled is None:
            await registry.release_replica(replica)  # found again at a later tick
            return
        await registry.forget_replica(replica)
        log.info("took over replica %d's session: %d message(s) handled", replica, handled)

    async def _take_over(self, client_id: str) -> int | None:
        """Connect under `client_id`'s session, unsubscribe it, handle what it holds and erase it: the number
        of messages handled, or None when the broker could not be reached or more kept coming than could be
        handled in ADOPT_MAX_S (the session is left as it is, to be taken over later)."""
        try:
            client = await self._open(client_id, clean=False)
        except AttachError as e:
            log.warning("%s; the session %r is taken over later", e, client_id)
            return None
        try:
            with contextlib.suppress(ClientError, OSError, TimeoutError):
                await asyncio.wait_for(
                    client.unsubscribe([self.attachment.shared(f) for f in UPLINK_FILTERS]), CONNECT_TIMEOUT_S
                )
            handled, complete = await self._drain(client, ADOPT_MAX_S)
        finally:
            await _close(client)
        if not complete:
            log.warning("the session %r was not emptied within %gs: taken over later", client_id, ADOPT_MAX_S)
            return None
        await self._erase(client_id)
        return handled

    async def _drain(self, client: ServiceClient, limit_s: float) -> tuple[int, bool]:
        """Handle what `client` is delivered until nothing more comes for ADOPT_IDLE_S, and wait for all of it
        to be handled and acknowledged: (messages handled, True) or, past `limit_s`, (so far, False)."""
        deadline = asyncio.get_running_loop().time() + limit_s
        handled = 0
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return handled, False
            try:
                message = await client.deliver_message(timeout_duration=min(ADOPT_IDLE_S, left))
            except TimeoutError:
                break
            except Exception:  # the connection closed: what is unacknowledged waits in the session
                return handled, False
            if message is None:
                continue
            await self._room.acquire()
            self._dispatch(client, message)
            handled += 1
        while client.unacknowledged:
            if asyncio.get_running_loop().time() >= deadline:
                return handled, False
            await asyncio.sleep(0.05)
        return handled, True

    async def _erase(self, client_id: str) -> None:
        """Have the broker forget the session `client_id` (a clean connection under it ends it)."""
        with contextlib.suppress(AttachError):
            await _close(await self._open(client_id, clean=True))

    async def handle(self, topic: str, payload: bytes) -> None:
        """One message a device sent, through the same app layer as the embedded broker's."""
        app = self.app
        if topic.startswith("$SYS/"):
            await self._client_event(topic, payload)
            return
        try:
            parsed = OtaTopic.parse(topic)
        except InvalidDeviceRef as e:
            self.metrics.message_received(None)
            app.reject(topic[:96], "bad_topic", f"{topic[:128]!r}: {e}")
            return
        self.metrics.message_received(None if parsed is None else parsed.kind)
        if parsed is None or not parsed.kind.device_to_server:
            return
        if parsed.kind is TopicKind.LEGACY_REQUEST and is_push_notice(payload):
            return  # the answer to a legacy request goes out on the same topic: a replica's own reply
        first = self.channel.saw(parsed.device)
        if first and parsed.kind is not TopicKind.FILE_DOWNLOAD:
            await app.events.device_connected(parsed.device)
        await app.events.handle_publish(parsed, payload)

    async def _client_event(self, topic: str, payload: bytes) -> None:
        """A connection or disconnection the broker announced: the device's online state, and on a
        connection its pending notice (as the embedded broker does when a device connects)."""
        parts = topic.split("/")
        if len(parts) != 6 or parts[1] != "brokers" or parts[3] != "clients":
            return
        try:
            doc = json.loads(payload)
        except ValueError:
            log.debug("a client event on %r that is not JSON", topic[:128])
            return
        device = DeviceRef.from_username(doc.get("username")) if isinstance(doc, dict) else None
        if device is None:
            return  # an application or the service itself, not a device
        if parts[5] == "connected":
            self.channel.came(device)
            await self.app.events.device_connected(device)
        elif parts[5] == "disconnected":
            self.channel.left(device)
            await self.app.events.device_disconnected(device)

    async def stop(self) -> None:
        await self.runtime.stop_serving()
        for task in (self._watcher, self._loop):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        client = self.client
        retiring = self.registry is not None and self.replica is not None and client is not None
        if retiring and client is not None:
            # A replica leaves for good: the broker stops handing it its share, it handles what it holds,
            # and its session goes (the other replicas take every device's messages from now on).
            with contextlib.suppress(ClientError, OSError, TimeoutError):
                await asyncio.wait_for(
                    client.unsubscribe([self.attachment.shared(f) for f in UPLINK_FILTERS]), CONNECT_TIMEOUT_S
                )
            _, retiring = await self._drain(client, STOP_WAIT_S)
        if self._handling:  # what was received is handled before the database closes
            await asyncio.wait(set(self._handling), timeout=STOP_WAIT_S)
        await self.channel.settle(STOP_WAIT_S)  # and what was sent is acknowledged before the disconnect
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5.0)
        if retiring and self.registry is not None and self.replica is not None:
            await self._erase(self.client_id)
            with contextlib.suppress(Exception):
                await self.registry.forget_replica(self.replica)
        await self.runtime.close()


async def _close(client: ServiceClient) -> None:
    """Close a client whose connect failed: amqtt leaves the socket of a refused CONNECT open."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), 5.0)
    handler = getattr(client, "_handler", None)
    writer = getattr(handler, "writer", None)
    if writer is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.close(), 5.0)


def _order_key(topic: str) -> str:
    """What a message must keep its order within: its device (a client event: its client id)."""
    if topic.startswith("$SYS/"):
        parts = topic.split("/")
        return f"$client/{parts[4]}" if len(parts) == 6 else topic
    try:
        parsed = OtaTopic.parse(topic)
    except InvalidDeviceRef:
        return topic
    return topic if parsed is None else str(parsed.device)

"""`HardenedBroker`: amqtt's `Broker` with fixes for what amqtt 0.12.1 leaves open, each small enough to
offer upstream; docs/conformance.md lists the tests. It is extended by subclassing only: each connection
gets a `broker.handler.StrictHandler` (the strict reader, keep-alive, lossless QoS 1/2 flows) and each
session is a `broker.session_state.LeanSession`, both built here; amqtt's own classes are left as they are.
The limits (`broker.limits`) belong to the instance, so brokers in one process may differ. The amqtt
internals still relied on are listed, and checked, in tests/broker/test_amqtt_internals.py.

- Connections (2, 3, 6): a CONNECT is authenticated before any existing session is looked at, so a refused
  CONNECT reusing a client id changes nothing and its CONNACK says session-present 0; a new connection with
  the client id of a live one closes the old connection first and waits for it to end (MQTT-3.1.4-2); a
  listener's `max_connections` slot is given back however the connection ends.
- Routing (11): subscriptions live in a `TopicIndex` (exact topics hashed,
  wildcard filters in a trie), so routing a message costs the same with 10 or 10,000 devices subscribed;
  each subscriber gets one copy at min(publish QoS, granted QoS) (MQTT-3.3.5-1, MQTT-3.8.4-6).
- CONNECT: `protocol.read_connect` reads and checks it (a malformed one is closed without a CONNACK,
  another protocol level gets return code 1); until it arrives a socket is counted apart from the
  listener's `max_connections`, which evicts the oldest such socket rather than keep clients out.
- Clean sessions end with their connection (MQTT-3.1.2-6): never resumed by a later clean-session-0 one.
- Session expiry: a disconnected persistent session is dropped `session_expiry_interval` seconds after its
  client left, found in a heap of the sessions that went offline (amqtt walked every session, connected
  ones included, every second: 20 ms a second for 10,000 connected clients, whatever they were doing).
- Retained messages (4): a session gets retained messages only for filters it holds itself, and only those
  its topic ACL lets it receive (MQTT-3.3.1-6); they are kept in SQLite with the sessions.
- The Will (5): a CONNECT whose Will topic starts with `$` is refused with return code 5 (malformed Will
  topics never get this far), and a Will on a topic the client may not publish to is dropped
  at CONNECT with a log line, so it is never sent.
- Queues (8): QoS 1/2 messages for an offline persistent session are kept up to `max_queued_messages`,
  then dropped with a log line; deliveries never wait inline on a client's acknowledgement, and a failed
  delivery is one log line, not a traceback (13).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import ssl
import time
from pathlib import Path
from typing import Any, TypeVar

from amqtt.broker import Broker, RetainedApplicationMessage
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, BrokerError, MQTTError, NoDataError
from amqtt.events import BrokerEvents, MQTTEvents
from amqtt.mqtt.constants import QOS_0
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session
from amqtt.utils import gen_client_id

from broker import protocol, websocket
from broker.handler import StrictHandler, reader_timeout
from broker.keepalive import KeepAliveWheel
from broker.latency import Latency
from broker.limits import limits_of
from broker.session_state import LeanSession
from broker.sessions import InFlight, SessionStore
from broker.tls_listeners import TlsListeners
from broker.topic_index import TopicIndex, matching_retained
from plugins.mqtt_topics import InvalidTopicFilter, filter_problem

log = logging.getLogger("ota.broker")

TAKEOVER_WAIT_S = 5.0  # how long a new connection waits for the old one with its client id to end
PRE_CONNECT_SWEEP_S = 1.0  # how often sockets late with their CONNECT are looked for (at most)
EXPIRY_CHECK_S = 1.0  # how often sessions past their expiry are looked for (amqtt's period)
_REFUSED = 0x80
_P = TypeVar("_P")


def _client_id(session: Session) -> str:
    return str(session.client_id)


async def _write_and_drain(writer: Any, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def _owner(session: Any) -> str:
    """The identity a session belongs to: the username it authenticated with ("" when anonymous)."""
    return str(session.username or "")


def _peer(remote: tuple[str, int]) -> str:
    return f"{remote[0]}:{remote[1]}"


def _ago(session: Any, now: float) -> str:
    left = session.last_disconnect_time
    return "a while" if left is None else f"{now - float(left):.0f}s"


def _who(session: Any) -> str:
    return str(getattr(session, "client_id", "?"))[:96]


class HardenedBroker(TlsListeners, Broker):  # type: ignore[misc]
    """Every connection gets a `StrictHandler` and every session is a `LeanSession`, both built here.
    `limits` (default: the configuration's `broker.limits.MqttLimits` entry) belong to this broker."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        *args: Any,
        session_db: Path | None = None,
        limits: protocol.Limits | None = None,
        **kwargs: Any,
    ) -> None:
        self.limits = limits if limits is not None else limits_of(config)
        super().__init__(config, *args, **kwargs)
        if self.plugins_manager._event_plugin_callbacks.get(MQTTEvents.PACKET_RECEIVED):
            log.warning(
                "a plugin handles on_mqtt_packet_received: this broker reads packets itself and never fires it"
            )
        self._store = SessionStore(session_db) if session_db is not None else None
        self._stopping = False
        # Read by amqtt and plugins as a mapping: filter -> [(session, qos)]. amqtt's Session is not hashable
        # (it compares by client id), so the index tells subscribers apart by client id as amqtt does.
        self._subscriptions: TopicIndex[Session] = TopicIndex(key=_client_id)
        self._deliveries: set[asyncio.Task[Any]] = set()
        self._connection_ended: dict[str, asyncio.Future[None]] = {}
        # listener -> sockets without a CONNECT yet (writer -> loop time it came, None once dropped as late)
        self._pre_connect: dict[str, dict[Any, float | None]] = {}
        self._pre_connect_sweep: asyncio.TimerHandle | None = None
        # Sessions that went offline, by the wall-clock time they expire: (due, n, client id, session, the
        # session's `last_disconnect_time` then). An entry whose session was dropped, or has connected since
        # (its disconnect time is another, or none), is skipped when it comes due.
        self._expiring: list[tuple[float, int, str, Session, Any]] = []
        self._expiring_n = itertools.count()
        self.delivered_count = 0  # messages handed to subscribers' connections (read by /metrics)
        self.dropped_count = 0  # QoS 0 messages dropped for clients that read too slowly
        self.connack_latency = Latency()  # CONNECT read -> CONNACK sent (read by /metrics)
        self.puback_latency = Latency()  # QoS 1 PUBLISH read -> PUBACK sent
        self.keep_alive = KeepAliveWheel(self._loop)  # every connection's keep-alive deadline
        for plugin in self.plugins_manager.plugins:  # the plugins' handle on this broker (see "for plugins")
            bind = getattr(plugin, "bind_broker", None)
            if callable(bind):
                bind(self)

    # ------------------------------------------------------------------------------- for plugins
    #
    # What a plugin may use of the broker: a plugin that defines `bind_broker(broker)` is given it once
    # its constructor has run. Nothing else of amqtt's broker, handlers or plugin manager is for plugins.

    def connection(self, client_id: str) -> tuple[LeanSession, StrictHandler] | None:
        """The session of `client_id` and the handler of its latest connection (connected or not), or None
        when the broker holds no session for it."""
        entry: tuple[LeanSession, StrictHandler] | None = self._sessions.get(client_id)
        return entry

    def is_connected(self, session: Session) -> bool:
        return bool(session.transitions.state == "connected")

    def is_subscribed(self, session: Session, topic: str) -> bool:
        """Whether `session` holds a subscription matching `topic`."""
        return self.subscriber_qos(session, topic) is not None

    def subscriber_qos(self, session: Session, topic: str) -> int | None:
        """The QoS `session` would receive `topic` at through its own subscriptions, None if none match."""
        mine = _client_id(session)
        for subscription in self._subscriptions.match(topic):
            if _client_id(subscription.subscriber) == mine:
                return subscription.qos
        return None

    def deliver(self, session: Session, topic: str, payload: bytes, qos: int) -> bool:
        """Send `payload` on `topic` to `session`'s connection at `qos`, subscribed or not (QoS 1/2 stay in
        flight until acknowledged, and are sent again on a reconnect); False when it is not connected."""
        handler = self._handler_of(session)
        if handler is None or not self.is_connected(session):
            return False
        if qos == 0:
            self._send_qos0(handler, protocol.encode_publish(topic, payload), topic)
        elif not (qos == 1 and handler.send_qos1(topic, payload)):
            self._deliver(handler, topic, payload, qos)
        return True

    def pending(self, session: LeanSession) -> list[tuple[str, bytes]]:
        """(topic, payload) of what `session` has in flight (unacknowledged) or queued (while offline),
        oldest first; a message there is sent again on its own (a second copy would be a duplicate)."""
        held = [*session.inflight_out.values(), *session.retained_messages]
        return [(str(message.topic), bytes(message.data)) for message in held]

    def end_connection(self, handler: StrictHandler) -> None:
        """Close a client's connection at any point after it authenticated (for plugins: a device disabled,
        deleted or given a new secret); nothing it sent after this is handled."""
        handler.end()

    def close_client(self, client_id: str) -> bool:
        """`end_connection` for the connection of `client_id`; False when it has none open."""
        entry = self._sessions.get(client_id)
        if entry is None or not self.is_connected(entry[0]):
            return False
        entry[1].end()
        return True

    def find_plugin(self, kind: type[_P]) -> _P | None:
        """The first loaded plugin that is a `kind` (a class or a runtime-checkable protocol)."""
        for plugin in self.plugins_manager.plugins:
            if isinstance(plugin, kind):
                return plugin
        return None

    def create_offline_session(self, client_id: str) -> tuple[StrictHandler, LeanSession]:
        """A disconnected session (restored from SQLite, or made by a plugin through amqtt's context)."""
        session = LeanSession()
        session.client_id = client_id
        handler = StrictHandler(self.plugins_manager, self, self.limits, session)
        session.transitions.disconnect()
        self._went_offline(session)
        return handler, session

    def _handler_of(self, session: Session) -> StrictHandler | None:
        handler: StrictHandler | None = self._sessions.get(_client_id(session), (None, None))[1]
        return handler

    # ------------------------------------------------------------------------------- connections

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        """One connection, in its own task, from its first byte to its end. While the client is idle this task
        waits with two frames (this one and the reader's): what the connection needs before and after
        reading is in coroutines that have returned (`_open`) or not started yet (`_connection_over`)."""
        server = self._servers.get(listener_name)
        if not server:
            raise BrokerError(f"Invalid listener name '{listener_name}'")
        remote = writer.get_peer_info()
        if remote is None:
            await writer.close()
            return
        connect = await self._read_connect(listener_name, server, reader, writer, remote)
        if connect is None:
            return
        # amqtt's `Server.acquire_connection`, without the log line it formats (at info) for every connection
        if server.semaphore is not None:  # `max_connections` counts connected clients only
            await server.semaphore.acquire()
        server.conn_count += 1
        try:
            opened = await self._open(listener_name, reader, writer, connect, remote)
            if opened is not None:
                session, handler, ended = opened
                try:
                    await handler.run()  # the connection's reader, in this task, until the connection ends
                    await self._connection_over(session, handler)
                finally:
                    self._ended(session.client_id, ended)
        except (AMQTTError, MQTTError, NoDataError, OSError, asyncio.IncompleteReadError) as e:
            log.info("connection ended: %s", e or type(e).__name__)
        except Exception:  # a bug: logged, and the connection must not stay open
            log.exception("connection from %s:%s failed", *remote)
            protocol.abort(writer)
        finally:  # however the connection ended (amqtt leaked its place on OSError)
            server.conn_count -= 1
            if server.semaphore is not None:
                server.semaphore.release()

    async def _read_connect(
        self, listener_name: str, server: Any, reader: Any, writer: Any, remote: tuple[str, int]
    ) -> protocol.Connect | None:
        """The connection's CONNECT, or None when it was closed instead (after a CONNACK refusing it, or
        without one for a malformed CONNECT or another first packet, MQTT-3.1.4-1; at once either way).

        Until its CONNECT has arrived a socket is counted apart from the connected clients: a listener
        with `max_connections` holds at most that many such sockets, and one more closes the oldest, so
        sockets that never send a CONNECT cannot keep a client out until their `connect_timeout_s`."""
        waiting = self._pre_connect.get(listener_name)
        if waiting is None:
            waiting = self._pre_connect[listener_name] = {}
        limit = server.max_connections
        if limit > 0 and len(waiting) >= limit:
            oldest = next(iter(waiting))
            log.info(
                "listener %r: %d connections without a CONNECT: closing the oldest", listener_name, limit
            )
            del waiting[oldest]
            protocol.abort(oldest)
        deadline = self.limits.connect_timeout_s
        waiting[writer] = self._loop.time()  # in the order they came: `_sweep_pre_connect` drops the late
        if self._pre_connect_sweep is None:
            self._arm_pre_connect_sweep()
        overdue = False
        try:
            try:
                return await protocol.read_connect(reader, self.limits)
            finally:
                overdue = waiting.pop(writer, 0.0) is None  # marked by the sweep, which dropped it
        except protocol.ConnectRefused as e:
            log.info("refused the CONNECT from %s with return code %d: %s", _peer(remote), e.return_code, e)
            with contextlib.suppress(Exception):
                writer.write(protocol.connack(e.return_code))
                await asyncio.wait_for(writer.drain(), deadline)
        except protocol.ProtocolViolation as e:
            log.info("closing the connection from %s: %s", _peer(remote), e)
        except (NoDataError, OSError, asyncio.IncompleteReadError):
            if overdue:
                log.info("closing the connection from %s: no CONNECT within %gs", _peer(remote), deadline)
            else:
                log.debug("the connection from %s ended before its CONNECT", _peer(remote))
        protocol.abort(writer)
        return None

    def _arm_pre_connect_sweep(self) -> None:
        period = min(PRE_CONNECT_SWEEP_S, self.limits.connect_timeout_s / 4)
        self._pre_connect_sweep = self._loop.call_later(period, self._sweep_pre_connect)

    def _sweep_pre_connect(self) -> None:
        """Drop the sockets that have waited `connect_timeout_s` for their CONNECT: the oldest first, from the
        head of each listener's table (one timer for the broker, not one per connection; a deadline is kept
        to within a quarter of itself, or `PRE_CONNECT_SWEEP_S`). A dropped socket's reader ends and finds
        it marked (None) in the table."""
        self._pre_connect_sweep = None
        cutoff = self._loop.time() - self.limits.connect_timeout_s
        left = False
        for waiting in self._pre_connect.values():
            late = []
            for writer, arrived in waiting.items():
                if arrived is None:
                    continue  # dropped already; its reader has not taken it out yet
                if arrived > cutoff:
                    left = True
                    break
                late.append(writer)
            for writer in late:
                waiting[writer] = None
                protocol.abort(writer)
        if left:
            self._arm_pre_connect_sweep()

    def _incoming_session(
        self, connect: protocol.Connect, writer: Any, remote: tuple[str, int]
    ) -> LeanSession:
        """The session of an accepted CONNECT, filled as amqtt's `init_from_connect` fills it."""
        session = LeanSession()
        session.client_id = connect.client_id or gen_client_id()
        session.clean_session = connect.clean_session
        will = connect.will
        session.will_flag = will is not None
        if will is not None:
            session.will_topic, session.will_message = will.topic, will.message
            session.will_qos, session.will_retain = will.qos, will.retain
        session.username, session.password = connect.username, connect.password
        session.remote_address, session.remote_port = remote
        session.ssl_object = writer.get_ssl_info()
        session.keep_alive = reader_timeout(connect.keep_alive)
        return session

    async def _open(
        self, listener_name: str, reader: Any, writer: Any, connect: protocol.Connect, remote: tuple[str, int]
    ) -> tuple[LeanSession, StrictHandler, asyncio.Future[None]] | None:
        """Authenticate the CONNECT and answer it; for an accepted one, the session (resumed or new), its
        handler (started: what was in flight is resent, what was queued is sent) and the future done once
        the connection is over (`_ended`); None when it was refused (and closed)."""
        incoming = self._incoming_session(connect, writer, remote)
        handler = StrictHandler(self.plugins_manager, self, self.limits)
        incoming.parent = 0
        started = self._loop.time()
        if not await self._authenticate(incoming, self.listeners_config[listener_name]):
            # Refused before any existing session is touched (amqtt deleted or rewrote the victim's).
            handler.attach(incoming, reader, writer)
            await handler.mqtt_connack_authorize(False)
            await writer.close()
            return None
        incoming.authenticated_since = started  # credentials read no earlier than this (loop time)
        incoming.client_id = client_id = self._session_key(incoming)
        await self._end_live_connection(client_id)
        session = self._resume_or_start(incoming)
        if self._persistent(session):
            self._store.save_session(client_id, session.username)  # type: ignore[union-attr]
        ended: asyncio.Future[None] = self._loop.create_future()
        self._connection_ended[client_id] = ended
        try:
            session.transitions.connect()
            handler.attach(session, reader, writer)
            self._sessions[client_id] = (session, handler)
            await handler.mqtt_connack_authorize(True)
            self.connack_latency.observe(self._loop.time() - started)
            # What was in flight before this connection is resent when the handler starts; what plugins
            # send from their connected handler (an OTA notice) goes out once, now.
            handler.resend = list(session.inflight_out.values())
            await self._fire(BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=session)
            await handler.start()  # also resends what the session had in flight (MQTT-4.4.0-1)
            self._send_queued(session, handler)
        except BaseException:
            self._ended(client_id, ended)
            raise
        return session, handler, ended

    def _ended(self, client_id: str, ended: asyncio.Future[None]) -> None:
        """The connection of `client_id` whose end `ended` tells is over (a later one may be live already)."""
        if not ended.done():
            ended.set_result(None)
        if self._connection_ended.get(client_id) is ended:
            del self._connection_ended[client_id]

    async def _end_live_connection(self, client_id: str) -> None:
        """MQTT-3.1.4-2: close the connection already using this client id, and wait until it has ended."""
        live = self._sessions.get(client_id)
        ended = self._connection_ended.get(client_id)
        if live is None or ended is None or live[0].transitions.state != "connected":
            return
        log.info("client %r connected again: closing its older connection", client_id[:96])
        live[1].end()
        try:
            await asyncio.wait_for(asyncio.shield(ended), TAKEOVER_WAIT_S)
        except TimeoutError:
            log.warning("the older connection of %r did not end within %gs", client_id[:96], TAKEOVER_WAIT_S)

    def _session_key(self, incoming: Session) -> str:
        """The key of the session `incoming` may use: a session, its queued messages, its subscriptions and
        its Will belong to the identity that authenticated (the username). A client id is free text in
        Aliyun's protocol and easy to guess, so when a session of another identity holds it, this identity
        gets a session of its own under `<client id>\\0<username>` (NUL cannot come from the wire), which
        it keeps finding on later connections. Nothing of the other identity's session is touched: it is
        not resumed, not discarded and its live connection is not taken over."""
        raw, owner = str(incoming.client_id), _owner(incoming)
        apart = f"{raw}\x00{owner}"
        if apart in self._sessions:
            return apart
        held = self._sessions.get(raw)
        if held is None or _owner(held[0]) == owner:
            return raw
        log.info(
            "client id %r is held by another identity: %r gets a session of its own",
            raw[:96],
            owner[:80],
        )
        return apart

    def _resume_or_start(self, incoming: LeanSession) -> LeanSession:
        client_id = incoming.client_id
        existing = self._sessions.get(client_id)
        # A clean session is never resumed (MQTT-3.1.2-6): a clean-session-0 connection that takes over a
        # live clean-session-1 one starts empty too, with session-present 0 (MQTT-3.2.2-2).
        if incoming.clean_session or existing is None or existing[0].clean_session:
            if existing is not None:
                self._drop_session(client_id)
            return incoming
        session: LeanSession = existing[0]
        for name in (
            "will_flag",
            "will_message",
            "will_topic",
            "will_qos",
            "will_retain",
            "keep_alive",
            "authenticated_since",
        ):
            setattr(session, name, getattr(incoming, name))
        session.username, session.password = incoming.username, incoming.password
        session.parent = 1
        return session

    def _drop_session(self, client_id: str) -> None:
        session = self._sessions.pop(client_id, (None, None))[0]
        if session is not None:
            self._subscriptions.remove_all(session)
            session.clear_queues()
            if self._store is not None and not session.clean_session:
                self._store.delete_session(client_id)

    def _persistent(self, session: Session) -> bool:
        """Whether `session` is kept in SQLite: clean session 0 and not anonymous."""
        return self._store is not None and not session.clean_session and not session.is_anonymous

    async def _cleanup_session(self, client_id: str) -> None:
        """A session ended for good (expired, or the broker stops: then it stays saved)."""
        entry = self._sessions.get(client_id)
        await super()._cleanup_session(client_id)
        if entry is not None and not self._stopping and self._persistent(entry[0]):
            self._store.delete_session(client_id)  # type: ignore[union-attr]

    async def _delete_session(self, client_id: str) -> None:
        self._drop_session(client_id)

    def _went_offline(self, session: Session) -> None:
        """`session` has just been disconnected: when it expires, if it does. A clean or anonymous one
        is not kept at all (amqtt's rule; a clean one is normally dropped with its connection already); a
        persistent one is kept `session_expiry_interval` seconds (None: for good) after its client left."""
        left = session.last_disconnect_time
        if session.clean_session or session.is_anonymous:
            due = 0.0
        else:
            expiry = self.config.get("session_expiry_interval")
            if expiry is None:
                return
            due = (time.time() if left is None else float(left)) + expiry
        heapq.heappush(self._expiring, (due, next(self._expiring_n), _client_id(session), session, left))

    async def _session_monitor(self) -> None:
        """amqtt's session expiry, once every `EXPIRY_CHECK_S`: the sessions due by now, and no other."""
        while True:
            await self._expire_sessions(time.time())
            await asyncio.sleep(EXPIRY_CHECK_S)

    async def _expire_sessions(self, now: float) -> None:
        expiring = self._expiring
        while expiring and expiring[0][0] <= now:
            _, _, client_id, session, left = heapq.heappop(expiring)
            entry = self._sessions.get(client_id)
            if (
                entry is None
                or entry[0] is not session
                or session.transitions.state != "disconnected"
                or session.last_disconnect_time != left
            ):
                continue  # dropped, replaced, or connected since (due again from its next disconnect)
            if not (session.clean_session or session.is_anonymous):
                log.info("session of %r expired: its client left %s ago", client_id[:96], _ago(session, now))
            await self._cleanup_session(client_id)

    async def _authenticate(self, session: Any, listener: Any) -> bool:
        """amqtt's rule (every authentication plugin that answers yes or no says yes, and at least one
        answers), asked of each plugin in turn in this task: amqtt started a task per plugin per CONNECT."""
        answers = []
        for plugin in self.plugins_manager._auth_plugins:
            check = getattr(plugin, "authenticate", None)
            if check is not None:
                answer = await check(session=session)
                if answer is not None:
                    answers.append(answer)
        if not answers or not all(answers):
            return False
        if not session.will_flag:
            return True
        topic = str(session.will_topic)  # well-formed: `protocol.parse_connect` checked it
        if topic.startswith("$"):  # the broker's topics (MQTT-4.7.2-1): no client publishes there
            log.warning("refused CONNECT of %r: Will topic %r is the broker's", _who(session), topic[:128])
            return False
        if not await self._topic_filtering(session, topic=topic, action=Action.PUBLISH):
            log.warning("dropped the Will of %r: it may not publish to %r", _who(session), topic[:128])
            session.will_flag = False
        return True

    # ------------------------------------------------------------------------------- subscriptions

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        topic_filter, qos = subscription
        problem = filter_problem(topic_filter)  # MQTT-4.7.1-2, MQTT-4.7.1-3, MQTT-4.7.3-1, MQTT-4.7.3-2
        if problem is not None:
            error = InvalidTopicFilter(topic_filter[:128], problem)
            log.info("client %r: subscription to %r refused: %s", _who(session), topic_filter[:128], error)
            return _REFUSED
        if not await self._topic_filtering(session, topic_filter, Action.SUBSCRIBE):
            return _REFUSED
        max_qos = self.config.get("max-qos", qos)
        qos = min(qos, max_qos if isinstance(max_qos, int) else qos)
        try:
            self._subscriptions.add(topic_filter, session, qos)  # a repeat replaces the QoS (MQTT-3.8.4-3)
        except (InvalidTopicFilter, ValueError) as e:
            log.info("client %r: subscription to %r refused: %s", _who(session), topic_filter[:128], e)
            return _REFUSED
        if self._persistent(session):
            self._store.add_subscription(session.client_id, topic_filter, qos)  # type: ignore[union-attr]
        return qos

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        if not self._subscriptions.remove(a_filter, session):
            return 0
        if self._persistent(session):
            self._store.remove_subscription(session.client_id, a_filter)  # type: ignore[union-attr]
        return 1

    async def _del_all_subscriptions(self, session: Session) -> None:
        self._subscriptions.remove_all(session)

    # ------------------------------------------------------------------------------------ routing

    async def on_publish(self, session: Session, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """A PUBLISH from `session`, called by its reader before the PUBACK/PUBCOMP is sent."""
        message = IncomingApplicationMessage(None, topic, qos, payload, retain)
        await self._fire(BrokerEvents.MESSAGE_RECEIVED, client_id=session.client_id, message=message)
        if topic.startswith("$"):
            log.info(
                "client %r may not publish to %r ($ topics are the broker's)", _who(session), topic[:128]
            )
            return
        if not await self._topic_filtering(session, topic, Action.PUBLISH):
            log.info("client %r may not publish to %r", _who(session), topic[:128])
            return
        await self._fire(BrokerEvents.MESSAGE_BROADCAST, client_id=session.client_id, message=message)
        await self._route(topic, payload, qos)
        if retain:
            await self.retain_message(session, topic, payload, qos)

    async def on_subscribe(self, handler: Any, packet_id: int, filters: list[tuple[str, int]]) -> None:
        session = handler.session
        codes = [await self.add_subscription(subscription, session) for subscription in filters]
        await handler.mqtt_acknowledge_subscription(packet_id, codes)
        for (topic_filter, _), code in zip(filters, codes, strict=True):
            if code != _REFUSED:
                await self._fire(
                    BrokerEvents.CLIENT_SUBSCRIBED, client_id=session.client_id, topic=topic_filter, qos=code
                )
                await self._publish_retained_messages_for_subscription((topic_filter, code), session)

    async def on_unsubscribe(self, handler: Any, packet_id: int, filters: list[str]) -> None:
        session = handler.session
        for topic_filter in filters:
            self._del_subscription(topic_filter, session)
            await self._fire(
                BrokerEvents.CLIENT_UNSUBSCRIBED, client_id=session.client_id, topic=topic_filter
            )
        await handler.mqtt_acknowledge_unsubscription(packet_id)

    async def _connection_over(self, client_session: Session, handler: StrictHandler) -> None:
        """After the reader stopped: the Will of an abnormal end, the handler stopped, the plugins told, a
        clean session dropped. (amqtt's `_client_message_loop` did this with the reader's wait in its frame.)"""
        if not handler.clean_disconnect and client_session.will_flag:  # MQTT-3.1.2-8: an abnormal end
            await self._route(client_session.will_topic, client_session.will_message, client_session.will_qos)
            if client_session.will_retain:
                await self.retain_message(
                    client_session,
                    client_session.will_topic,
                    client_session.will_message,
                    client_session.will_qos,
                )
        await self._stop_handler(handler)
        client_session.transitions.disconnect()
        if not client_session.clean_session:  # a clean one is dropped below, with its connection
            self._went_offline(client_session)
        if self._persistent(client_session):
            self._store.session_left(client_session.client_id)  # type: ignore[union-attr]
        await self._fire(
            BrokerEvents.CLIENT_DISCONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )
        if client_session.clean_session:  # MQTT-3.1.2-6: a clean session ends with its connection
            entry = self._sessions.get(client_session.client_id)
            if entry is not None and entry[0] is client_session:
                self._drop_session(client_session.client_id)

    async def _fire(self, event: Any, **kwargs: Any) -> None:
        """Call the plugins' handlers of `event` in this task (amqtt starts a task per handler per event)."""
        for callback in self.plugins_manager._event_plugin_callbacks.get(event, ()):
            try:
                await callback(**kwargs)
            except Exception as e:
                log.warning("a plugin failed on %s: %s: %s", event, type(e).__name__, e)
                log.debug("plugin failure", exc_info=True)

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """amqtt's topic check (every topic plugin must say yes), without a task per plugin per message."""
        if not self.plugins_manager.is_topic_filtering_enabled():
            return True
        for plugin in self.plugins_manager._topic_plugins:
            check = getattr(plugin, "topic_filtering", None)
            if check is not None and not await check(session=session, topic=topic, action=action):
                return False
        return True

    async def _broadcast_message(
        self, session: Session | None, topic: str | None, data: bytes | None, force_qos: int | None = None
    ) -> None:
        """Route at once (the Will, the broker's and plugins' own messages): no queue, no task."""
        if topic:
            await self._route(topic, data or b"", force_qos)

    async def _route(self, topic: str, data: bytes, published_qos: int | None) -> None:
        """Send `data` to every subscriber of `topic` once, at min(published QoS, granted QoS); None: the
        broker's own message, sent at the granted QoS."""
        qos0: bytes | None = None
        for target, granted in self._subscriptions.match(topic):
            qos = granted if published_qos is None else min(published_qos, granted)
            if not await self._topic_filtering(target, topic, Action.RECEIVE):
                continue
            if target.transitions.state != "connected":
                if qos and not target.clean_session and not target.is_anonymous:
                    self._queue_offline(target, topic, data, qos)
                continue
            handler = self._handler_of(target)
            if handler is None:
                continue
            if qos:
                if qos == 1 and handler.send_qos1(topic, data):
                    self.delivered_count += 1
                elif handler.queue_full():
                    self._dropped(f"client {_who(target)!r}: outgoing queue full")  # nothing started for it
                else:
                    self._deliver(handler, topic, data, qos)  # QoS 2, or queued behind a full window
                continue
            if qos0 is None:
                qos0 = protocol.encode_publish(topic, data)
            self._send_qos0(handler, qos0, topic)

    def _send_qos0(self, handler: Any, packet: bytes, topic: str) -> None:
        """QoS 0 goes straight to the socket; a client that reads too slowly loses QoS 0 messages (counted),
        as MQTT allows, rather than growing the broker's memory."""
        transport = protocol.transport_of(handler.writer)
        if transport is None:  # another kind of writer (amqtt's external listeners): drained per message
            self._deliver(handler, topic, packet, 0, raw=True)
            return
        if transport.is_closing():
            return
        if protocol.write_buffer_size(handler.writer, transport) > self.limits.max_write_buffer:
            self.dropped_count += 1
            if self.dropped_count % 1000 == 1:
                log.warning(
                    "client %r reads too slowly: QoS 0 messages dropped (%d so far)",
                    _who(handler.session),
                    self.dropped_count,
                )
            return
        handler.writer.write(packet)
        self.delivered_count += 1

    def _deliver(
        self, handler: Any, topic: str, data: bytes, qos: int, retain: bool = False, raw: bool = False
    ) -> None:
        self.delivered_count += 1
        if raw:  # an encoded QoS 0 packet for a writer that is not a plain stream
            task = asyncio.ensure_future(_write_and_drain(handler.writer, data))
        else:
            task = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=retain))
        self._deliveries.add(task)
        task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[Any]) -> None:
        self._deliveries.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, protocol.QueueFull):
            self._dropped(str(error))
        elif error is not None:
            log.debug("a delivery ended early: %s: %s", type(error).__name__, error)

    def _dropped(self, why: str) -> None:
        """A QoS 1/2 message dropped at a full outgoing queue: counted, one log line per thousand."""
        self.dropped_count += 1
        if self.dropped_count % 1000 == 1:
            log.warning("%s: message dropped (%d dropped so far)", why, self.dropped_count)

    def _queue_offline(self, session: Session, topic: str, data: bytes, qos: int) -> None:
        queue = session.retained_messages
        if queue.qsize() >= self.limits.max_queued_messages:
            log.warning(
                "client %r is offline with %d messages queued: message to %r dropped",
                _who(session),
                queue.qsize(),
                topic[:128],
            )
            return
        queue.put_nowait(RetainedApplicationMessage(None, topic, data, qos))
        if self._persistent(session):
            self._store.queue_message(session.client_id, topic, data, qos)  # type: ignore[union-attr]

    def _send_queued(self, session: Session, handler: Any) -> None:
        """What was queued while the session was offline, in order, without waiting for acknowledgements.
        The saved copies of these and of the restored in-flight messages are dropped: the connection holds
        them now."""
        queue = session.retained_messages
        while not queue.empty():
            message = queue.get_nowait()
            self._deliver(handler, message.topic, message.data, message.qos or QOS_0)
        if session.parent and self._persistent(session):  # a resumed session
            self._store.messages_taken(session.client_id)  # type: ignore[union-attr]

    async def retain_message(
        self, source_session: Any, topic_name: str | None, data: bytes | None, qos: int | None = None
    ) -> None:
        """amqtt's retained-message table, kept in SQLite as well (restored at start)."""
        await super().retain_message(source_session, topic_name, data, qos)
        if self._store is None or topic_name is None:
            return
        if data:
            self._store.retain(topic_name, bytes(data), qos or QOS_0)
        else:  # an empty retained message removes the topic's (MQTT-3.3.1-10)
            self._store.forget_retained(topic_name)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter, qos = subscription
        matching = matching_retained(topic_filter, self._retained_messages)
        if not matching or topic_filter not in self._subscriptions.filters_of(session):
            return  # nothing retained for it, or another client's filter: not this session's to receive
        handler = self._handler_of(session)
        if handler is None:
            return
        for _, retained in matching:
            if await self._topic_filtering(session, topic=retained.topic, action=Action.RECEIVE):
                self._deliver(
                    handler, retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                )

    # ------------------------------------------------------------------------------- lifecycle

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        if listener_type != ListenerType.WS:
            return await super()._create_server_instance(
                listener_name, listener_type, address, port, ssl_context
            )

        async def connected(reader: websocket.WebSocketReader, writer: websocket.WebSocketWriter) -> None:
            await self._client_connected(listener_name, reader, writer)

        server = await websocket.serve(connected, address, port, ssl_context, self.limits.max_packet_size)
        host, bound = next(iter(server.sockets)).getsockname()[:2]
        scheme = "wss" if ssl_context is not None else "ws"
        log.info("mqtt over websockets listening on %s://%s:%d%s", scheme, host, bound, websocket.PATH)
        return server

    async def _start_listeners(self) -> None:
        await self._restore_sessions()  # before the first client can connect
        await super()._start_listeners()

    async def _restore_sessions(self) -> None:
        if self._store is None:
            return
        saved = await self._store.open()
        for topic, payload, qos in saved.retained:
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, payload, qos)
        for stored in saved.sessions:
            handler, session = self.create_offline_session(stored.client_id)
            session.clean_session = False
            session.username = stored.username
            session.last_disconnect_time = int(stored.seen_at)
            self._went_offline(session)  # expires from when its client left, before the restart
            self._sessions[stored.client_id] = (session, handler)
            for topic_filter, qos in stored.subscriptions:
                self._subscriptions.add(topic_filter, session, qos)
            for topic, payload, qos in stored.messages:
                session.retained_messages.put_nowait(RetainedApplicationMessage(None, topic, payload, qos))
            for sent in stored.in_flight:  # resent on reconnect with DUP and the same packet id
                message = OutgoingApplicationMessage(
                    sent.packet_id, sent.topic, sent.qos, sent.payload, False
                )
                message.publish_packet = protocol.encode_publish(
                    sent.topic, sent.payload, sent.qos, sent.packet_id, dup=True
                )
                if sent.received:
                    message.pubrec_packet = PubrecPacket.build(sent.packet_id)
                session.inflight_out[sent.packet_id] = message
        if saved.sessions or saved.retained:
            log.info(
                "restored %d persistent MQTT session(s) and %d retained message(s) from %s",
                len(saved.sessions),
                len(saved.retained),
                self._store.path,
            )

    async def shutdown(self) -> None:
        self._stopping = True
        if self._pre_connect_sweep is not None:
            self._pre_connect_sweep.cancel()
            self._pre_connect_sweep = None
        if self._store is not None:
            # What persistent sessions (connected, or gone since) had not acknowledged yet is delivered
            # after the restart.
            for client_id, (session, _) in list(self._sessions.items()):
                if self._persistent(session):
                    if session.transitions.state == "connected":  # its expiry counts from this stop
                        self._store.session_left(client_id)
                    for message in list(session.inflight_out.values()):
                        self._store.save_in_flight(
                            client_id,
                            InFlight(
                                message.packet_id,
                                message.topic,
                                bytes(message.data),
                                message.qos,
                                message.pubrec_packet is not None,
                            ),
                        )
        for task in list(self._deliveries):
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        await super().shutdown()
        self.keep_alive.close()
        if self._store is not None:
            await self._store.close()

"""`StrictHandler`: the broker side of one MQTT connection, amqtt's `BrokerProtocolHandler` subclassed (the
broker builds one per connection; amqtt's own class is left as it is).

The reader (`run`, in the connection's task) reads each packet whole by its remaining length, up to the broker's
`max_packet_size`, checks it against MQTT 3.1.1 (`broker.protocol`) and hands it to the broker, its
`Router`, in its own task: a message is routed before its PUBACK/PUBCOMP is sent (no queue, no task per
packet), so a client that disconnects right after publishing loses nothing it was told was received. A
violation closes the connection with one log line (MQTT-4.8.0-1), never a traceback.

Keep-alive (MQTT-3.1.2-24): a client silent for one and a half keep-alive periods (the broker sets the
session's `keep_alive` to that, `reader_timeout`) has its connection closed, which ends the session as an
abnormal disconnect (the Will is published). amqtt waited and did nothing. The broker's
`broker.keepalive.KeepAliveWheel` holds every connection's deadline under one timer: the reader only notes
when it last heard the client, and the deadline, when due, is moved to the new due time if the client was
heard since. It is fair to a client when the broker is the one behind (its loop busy, say serving TLS
downloads): bytes from the client waiting unread (in the connection's stream buffer or the socket's
receive queue) count as heard, and a deadline looked at late gives the client that lateness again before
judging.

Outgoing QoS 1/2 messages stay in the session's in-flight table until they are acknowledged: amqtt
dropped them after a hard-coded 5 s, and on a disconnect, so an OTA notice in flight was lost. Here an
unacknowledged PUBLISH is sent again with DUP set every `retry_interval_s` while the client stays connected,
and on the reconnect of a persistent session (MQTT-4.4.0-1); at most `max_inflight_messages` are in flight
per session, and a client that stops acknowledging cannot make the broker queue more than
`max_queued_messages` behind them.

The amqtt names this class overrides, calls or writes are listed in tests/broker/test_amqtt_internals.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import struct
import termios
import time
from collections.abc import Awaitable
from types import MappingProxyType
from typing import Any, Protocol

from amqtt.errors import AMQTTError, ProtocolHandlerError
from amqtt.mqtt.connack import NOT_AUTHORIZED
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.packet import (
    DISCONNECT,
    PINGREQ,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBSCRIBE,
    UNSUBSCRIBE,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.manager import PluginManager
from amqtt.session import OUTGOING, IncomingApplicationMessage, OutgoingApplicationMessage

from broker.keepalive import KeepAliveWheel
from broker.latency import Latency
from broker.protocol import (
    PINGRESP_PACKET,
    UNSUBSCRIBE_FLAGS,
    Limits,
    ProtocolViolation,
    QueueFull,
    Window,
    abort,
    ack,
    acknowledged_id,
    check_header,
    check_publish,
    connack,
    encode_publish,
    fixed_header,
    parse_subscription,
    suback,
    transport_of,
)
from broker.session_state import NO_QUEUE, LeanSession

log = logging.getLogger("ota.broker")

NO_WAITERS: MappingProxyType[int, asyncio.Future[Any]] = MappingProxyType({})  # amqtt's waiters never used

GRACE = 1.5  # the reader waits GRACE x keep-alive for a client's next packet (MQTT-3.1.2-24)


def reader_timeout(keep_alive: int) -> float:
    """How long the reader waits for a client's next packet: 1.5 x its keep-alive (0: forever)."""
    return keep_alive * GRACE if keep_alive > 0 else 0


LATE_S = 1.0  # a keep-alive timer this late (past its due time) shows a busy loop, not a silent client
HANDLING = math.inf  # "heard" while the reader handles a packet: that time is not the client's silence


def unread_in_kernel(transport: asyncio.BaseTransport | None) -> int:
    """Bytes in the receive queue of the socket under `transport` (TCP, TLS or WebSocket), not yet read
    by the event loop (FIONREAD); 0 when there is no socket any more."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):  # closed meanwhile
        return 0
    return int(struct.unpack("i", raw)[0])


class Stream(Protocol):
    """What the reader reads a connection from (`broker.stream.MqttStream`, `broker.websocket.WebSocketReader`)."""

    @property
    def buffered(self) -> int: ...  # bytes received, not read yet

    def peek(self) -> bytes | bytearray: ...  # those bytes (valid until the next await)

    def take(self, n: int) -> bytes | None: ...  # n bytes if all there, without waiting

    def more(self) -> Awaitable[bool]: ...  # wait for more bytes; False at the end of the stream

    async def readexactly(self, n: int) -> bytes: ...  # or asyncio.IncompleteReadError


class Router(Protocol):
    """What the reader hands packets to (the broker)."""

    puback_latency: Latency  # QoS 1 PUBLISH read -> PUBACK written
    keep_alive: KeepAliveWheel  # the keep-alive deadlines of its connections

    async def on_publish(self, session: Any, topic: str, payload: bytes, qos: int, retain: bool) -> None: ...

    async def on_subscribe(self, handler: Any, packet_id: int, filters: list[tuple[str, int]]) -> None: ...

    async def on_unsubscribe(self, handler: Any, packet_id: int, filters: list[str]) -> None: ...


class ConnectionEnded(Exception):
    """The connection of a flow ended; its message stays in the session's in-flight table."""


_RETRY = object()


def _time_to_retry(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(_RETRY)


class _Qos1Flight:
    """One QoS 1 message in flight on a connection: an entry of the handler's in-flight table, no future and
    no timer of its own. The table is in the order of the last send; one timer per connection resends what
    has waited `retry_interval_s` (with DUP, encoded then), and the PUBACK, read by the reader, removes the
    entry and gives the window's place back."""

    __slots__ = ("finished", "message", "sent_at", "window")

    def __init__(
        self, window: Window, message: Any, finished: asyncio.Future[None] | None, sent_at: float
    ) -> None:
        self.window, self.message, self.finished, self.sent_at = window, message, finished, sent_at

    def over(self) -> None:
        """Acknowledged, or its connection ended (then the message stays in the session's in-flight table,
        sent again when the session reconnects): the place is given back, `finished` is set."""
        self.window.give()
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)


class StrictHandler(BrokerProtocolHandler):  # type: ignore[misc]
    # Its own state in slots: amqtt's handler already keeps about twenty attributes in its __dict__, and past
    # thirty keys CPython stops sharing an instance dict's keys among instances (296 bytes a handler became
    # 1,584, one per connected client).
    __slots__ = (
        "_closed",
        "_flows",
        "_heard",
        "_keep_alive_timer",
        "_qos1",
        "_reader_over",
        "_retry_timer",
        "_tasks",
        "clean_disconnect",
        "ending",
        "limits",
        "resend",
        "router",
    )

    # amqtt's attributes that never change here, as class attributes: one store fewer each per connection
    # and a smaller instance dict (an instance that sets one, as amqtt's disconnect handling does, gets its own)
    logger: Any = log
    _keepalive_task: Any = None  # amqtt's write timer: none in a broker
    _reader_ready: Any = None
    _reader_stopped: Any = None  # amqtt's reader's Event: no such reader here
    _puback_waiters: Any = NO_WAITERS  # QoS 1 in flight is in `_qos1`
    _pubrel_waiters: Any = NO_WAITERS  # the reader answers PUBREL itself
    _disconnect_waiter: Any = None
    # The reader routes SUBSCRIBE and UNSUBSCRIBE itself: amqtt's two queues for them are never used.
    _pending_subscriptions: Any = NO_QUEUE
    _pending_unsubscriptions: Any = NO_QUEUE

    def __init__(
        self, plugins_manager: PluginManager[Any], router: Router, limits: Limits, session: Any = None
    ) -> None:
        # amqtt's attributes, set here rather than by amqtt's __init__: it made an Event, a Lock, two Queues
        # and four dicts per connection that this handler never uses (tests/broker/test_amqtt_internals.py
        # checks that every attribute amqtt's handler has, this one has too). mypy sees only the slots.
        self.session: Any = None  # type: ignore[misc]
        if session is not None:
            self._init_session(session)
        self.reader: Any = None  # type: ignore[misc]
        self.writer: Any = None  # type: ignore[misc]
        self.plugins_manager: Any = plugins_manager  # type: ignore[misc]
        self._loop: Any = asyncio.get_running_loop()  # type: ignore[misc]
        self._reader_task: asyncio.Task[Any] | None = None  # type: ignore[misc]  # `run`'s task, while it reads
        self._pubrec_waiters: dict[int, asyncio.Future[Any]] = {}  # type: ignore[misc]  # outgoing QoS 2
        self._pubcomp_waiters: dict[int, asyncio.Future[Any]] = {}  # type: ignore[misc]
        self.router = router
        self.limits = limits
        self.ending = False  # `end` was called: nothing more the client sent is handled
        self.clean_disconnect = False  # the client sent DISCONNECT (its Will is not published)
        self.resend: list[OutgoingApplicationMessage] | None = None  # in flight before this connection
        self._closed: asyncio.Future[None] | None = None
        self._reader_over: asyncio.Future[None] | None = None  # done when the reader stops (made on demand)
        self._heard = 0.0  # loop time the reader last heard the client (HANDLING while it handles a packet)
        self._keep_alive_timer: int | None = None  # its slot in the broker's KeepAliveWheel while armed
        self._flows: set[asyncio.Task[None]] | None = None  # redeliveries running (made when one starts)
        self._tasks: set[asyncio.Future[Any]] | None = None  # closes started by `end` (made when one starts)
        self._qos1: dict[int, _Qos1Flight] = {}  # QoS 1 messages in flight, in the order of their last send
        self._retry_timer: asyncio.TimerHandle | None = None

    # amqtt's `_send_packet` (a QoS 0 message through `mqtt_publish`) writes under this lock; a write here is
    # whole and never interleaves with another, so one lock-less stand-in serves every connection.
    _write_lock = contextlib.nullcontext()

    def _init_session(self, session: Any) -> None:
        """amqtt's, without the LoggerAdapter it made per connection (the broker's log lines name the client)."""
        if not session:
            raise AMQTTError("Session cannot be None")
        self.session = session
        self.keepalive_timeout: Any = session.keep_alive if session.keep_alive > 0 else None  # type: ignore[misc]

    # ------------------------------------------------------------------------------------ the reader

    async def start(self) -> None:
        """Resend what the session had in flight; `run` then reads. (amqtt's started a reader task, with two
        Events, 1.5 KB a connection, and a write-timeout timer that does nothing in a broker.)"""
        if not self._is_attached():
            raise ProtocolHandlerError("Handler is not attached to a stream")
        await self._retry_deliveries()

    async def run(self) -> None:
        """Read and handle what the client sends until the connection ends, in the calling task (the
        connection's own: no task of its own per connection, and no frame under it while it waits)."""
        self._reader_task = asyncio.current_task(self._loop)  # type: ignore[misc]  # amqtt's attribute: while reading
        session = self.session
        assert session is not None
        stream: Stream = self.reader
        who = str(session.client_id)[:96]
        loop = self._loop
        self._heard = loop.time()
        if session.keep_alive > 0:
            self._keep_alive_timer = self.router.keep_alive.arm(self, self._heard + session.keep_alive)
        try:
            while not self.ending and not self.clean_disconnect:
                header = fixed_header(stream.peek())
                if header is None:
                    if await stream.more():
                        continue
                    if stream.buffered:
                        log.debug("client %r: connection closed in the middle of a packet", who)
                    break  # EOF
                if self.ending:
                    break  # `end` was called: what the client sent after that is not handled
                self._heard = HANDLING
                packet_type, flags, length, size = header
                if packet_type == UNSUBSCRIBE and flags == 0 and self._aliyun_sdk():
                    flags = UNSUBSCRIBE_FLAGS  # Aliyun Link SDK C 4.0/4.1 send 0xA0: tolerated from its clients only
                check_header(packet_type, flags, length, self.limits)  # before the body is waited for
                stream.take(size)
                body = (stream.take(length) or await stream.readexactly(length)) if length else b""
                await self._handle(packet_type, flags, body)
                self._heard = loop.time()
        except asyncio.CancelledError:
            pass
        except ProtocolViolation as e:
            log.warning("closing the connection of %r: %s", who, e)
        except asyncio.IncompleteReadError:
            log.debug("client %r: connection closed in the middle of a packet", who)
        except OSError as e:
            log.debug("client %r: connection lost: %s", who, e)
        except Exception as e:  # amqtt's decoders raise many kinds; none may leave a traceback per client
            log.warning("closing the connection of %r: undecodable packet (%s: %s)", who, type(e).__name__, e)
        finally:
            self._reading_ended()
            await self.handle_connection_closed()
            await self.stop()

    def _reading_ended(self) -> None:
        self._reader_task = None  # type: ignore[misc]  # `stop` cancels the reader only while it reads
        over, self._reader_over = self._reader_over, None
        if over is not None and not over.done():
            over.set_result(None)
        if self._keep_alive_timer is not None:
            self.router.keep_alive.disarm(self, self._keep_alive_timer)
            self._keep_alive_timer = None

    async def _handle(self, packet_type: int, flags: int, body: bytes) -> None:
        limits = self.limits
        session = self.session
        if packet_type == PUBLISH:
            topic, packet_id, at = check_publish(flags, body)
            qos, retain = (flags >> 1) & 0x3, bool(flags & 0x1)
            if qos < QOS_2:
                read_at = time.perf_counter()
                await self.router.on_publish(session, topic, body[at:], qos, retain)
                if qos:
                    self.write(ack(0x40, packet_id))  # PUBACK once routed
                    self.router.puback_latency.observe(time.perf_counter() - read_at)
                return
            if packet_id not in session.inflight_in:  # else a DUP: PUBREC again, route once (MQTT-4.3.3)
                if len(session.inflight_in) >= limits.max_incoming_qos2:
                    raise ProtocolViolation(
                        f"more than max_incoming_qos2 ({limits.max_incoming_qos2}) QoS 2 messages unreleased"
                    )
                session.inflight_in[packet_id] = IncomingApplicationMessage(
                    packet_id, topic, QOS_2, body[at:], retain
                )
            self.write(ack(0x50, packet_id))
            return
        if packet_type in (SUBSCRIBE, UNSUBSCRIBE):
            packet_id, filters = parse_subscription(packet_type, body)
            if packet_type == SUBSCRIBE:
                await self.router.on_subscribe(self, packet_id, filters)
            else:
                await self.router.on_unsubscribe(self, packet_id, [f for f, _ in filters])
            return
        if packet_type in (PUBACK, PUBREC, PUBCOMP):
            packet_id = acknowledged_id(packet_type, body)
            if packet_type == PUBACK:  # every QoS 1 message in flight is in the table
                flight = self._qos1.pop(packet_id, None)
                if flight is not None:
                    session.inflight_out.pop(packet_id, None)
                    flight.over()
                return
            waiters = self._pubrec_waiters if packet_type == PUBREC else self._pubcomp_waiters
            waiter = waiters.get(packet_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(packet_id)
        elif packet_type == PUBREL:
            packet_id = acknowledged_id(packet_type, body)
            message = session.inflight_in.pop(packet_id, None)
            if message is not None:
                await self.router.on_publish(session, message.topic, message.data, QOS_2, message.retain)
            self.write(ack(0x70, packet_id))  # PUBCOMP, also for an id already released
        elif packet_type == PINGREQ:
            self.write(PINGRESP_PACKET)
        elif packet_type == DISCONNECT:
            self.clean_disconnect = True
            await self.handle_disconnect(DisconnectPacket())

    def _aliyun_sdk(self) -> bool:
        """Whether this client logged in the way Aliyun's device SDKs do (a clientId of the form
        `<id>|securemode=..,...|`). Link SDK C 4.0 and 4.1 send UNSUBSCRIBE with flags 0 (MQTT 3.1.1 says
        0x2, MQTT-3.10.1-1) after every MQTT download; Aliyun's platform takes it, so the broker does for
        these clients, and stays strict with every other."""
        client_id = str(getattr(self.session, "client_id", "") or "")
        parts = client_id.split("|")
        return len(parts) >= 3 and "securemode=" in parts[1]

    def _keep_alive_due(self, due: float) -> None:
        """The keep-alive deadline, looked at by the broker's `KeepAliveWheel` at `due`: re-armed at the
        client's new due time if it was heard since, or if bytes it sent wait unread on the broker's side
        (then it did speak: it is the broker that is behind), or if it is looked at late (the loop was busy:
        the client gets that lateness again). Only a client silent for the whole period is closed; the
        deadline stays armed until the reader ends, so a close that has not ended the connection a period
        later is tried again."""
        session = self.session
        if self._keep_alive_timer is None or session is None:
            return  # the reader has ended
        loop = self._loop
        now = loop.time()
        period = session.keep_alive
        late = now - due
        if self._heard + period > now:
            again = now + period if self._heard == HANDLING else self._heard + period
        elif self._unread_bytes():
            self._heard = now
            again = now + period
        elif late > LATE_S:
            again = now + late
        else:
            self.handle_read_timeout()
            again = now + period
        self._keep_alive_timer = self.router.keep_alive.arm(self, again)

    def _unread_bytes(self) -> int:
        """Bytes from the client waiting on the broker's side, not read yet by the reader: in the
        connection's buffer and in the socket's receive queue."""
        waiting = self.reader.buffered if self.reader is not None else 0
        if self.writer is not None:
            waiting += unread_in_kernel(transport_of(self.writer))
        return waiting

    def handle_read_timeout(self) -> None:
        """Nothing from the client for 1.5 x its keep-alive: close (EOF ends the reader and the session)."""
        session = self.session
        log.info(
            "client %r sent nothing for %gs (1.5 x keep-alive): closing its connection",
            str(session.client_id)[:96] if session else "?",
            session.keep_alive if session else 0,
        )
        if self.writer is not None:
            self._track(asyncio.ensure_future(self.writer.close()))

    # ----------------------------------------------------------------------------- the connection

    def write(self, data: bytes) -> None:
        """Queue bytes on the connection without waiting (each write is whole, so writes never interleave)."""
        writer = self.writer
        if writer is not None:
            writer.write(data)

    async def mqtt_connack_authorize(self, authorize: bool) -> None:
        """CONNACK: accepted (session present when the session was resumed), or refused as not authorized."""
        session = self.session
        if session is None:
            raise AMQTTError("Session is not initialized!")
        self.write(connack(0 if authorize else NOT_AUTHORIZED, bool(session.parent) and authorize))

    async def mqtt_acknowledge_subscription(self, packet_id: int, return_codes: list[int]) -> None:
        self.write(suback(packet_id, return_codes))

    async def mqtt_acknowledge_unsubscription(self, packet_id: int) -> None:
        self.write(ack(0xB0, packet_id))

    def _stop_waiters(self) -> None:
        """Cancel the outgoing QoS 2 flows' waiters (the only ones this handler makes)."""
        for waiters in (self._pubrec_waiters, self._pubcomp_waiters):
            for waiter in waiters.values():
                if not waiter.done():
                    waiter.cancel()

    def end(self) -> None:
        """Close the connection now, at any point after its CONNECT was read (before the CONNACK, before the
        reader started, or while it runs): packets the client sent and the reader has not handled yet are
        not handled, and the connection then ends as on EOF (the Will, if any, is published)."""
        self.ending = True
        if self.writer is not None:
            abort(self.writer)

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done once the connection has stopped."""
        if self._closed is None:
            self._closed = self._loop.create_future()
        return self._closed

    async def stop(self) -> None:
        """Stop the connection's flows and its reader (waiting for the reader to end when called from another
        task), then close the connection; what was in flight stays in the session."""
        if not self.closed.done():
            self.closed.set_result(None)
        for task in list(self._flows or ()):
            task.cancel()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        flights, self._qos1 = self._qos1, {}
        for flight in flights.values():  # left in the session's in-flight table for the next connection
            flight.over()
        self._stop_waiters()
        reader = self._reader_task  # the connection's task, while it reads
        if reader is not None and reader is not asyncio.current_task(self._loop):
            if self._reader_over is None:
                self._reader_over = self._loop.create_future()
            over = self._reader_over
            reader.cancel()
            await asyncio.shield(over)  # the reader stops; the connection's task then ends it
        if self.writer is not None:
            with contextlib.suppress(OSError, TimeoutError):
                await self.writer.close()

    def _track(self, task: asyncio.Future[Any]) -> None:
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------- outgoing QoS 1 and 2 flows

    def _window(self) -> Window:
        session: LeanSession = self.session
        if session.window is None:
            session.window = Window(self.limits.max_inflight_messages)
        return session.window

    async def _handle_qos1_message_flow(self, message: Any) -> None:
        if message.direction == OUTGOING:
            await self._outgoing_flow(message)
        else:
            await super()._handle_qos1_message_flow(message)

    async def _handle_qos2_message_flow(self, message: Any) -> None:
        if message.direction == OUTGOING:
            await self._outgoing_flow(message)
        else:
            await super()._handle_qos2_message_flow(message)

    async def _retry_deliveries(self) -> None:
        """On (re)connect, send unacknowledged messages again in their order, without holding up the
        connection: each flow runs on its own until acknowledged or the connection ends (MQTT-4.4.0-1)."""
        session = self.session
        pending = self.resend  # what the broker saw in flight before this connection
        if pending is None:
            pending = list(session.inflight_out.values())  # in the order they were first sent
        if not pending:
            return
        log.info(
            "client %r: resending %d unacknowledged message(s)", str(session.client_id)[:96], len(pending)
        )
        if self._flows is None:
            self._flows = set()
        for message in pending:
            task = asyncio.create_task(self._outgoing_flow(message))
            self._flows.add(task)
            task.add_done_callback(self._flow_done)

    def _flow_done(self, task: asyncio.Task[None]) -> None:
        if self._flows is not None:
            self._flows.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("redelivery ended: %s", task.exception())

    def _who(self) -> str:
        return str(getattr(self.session, "client_id", "?"))[:96]

    async def _await_ack(self, waiters: dict[int, asyncio.Future[Any]], packet_id: int, resend: bytes) -> Any:
        """Wait for the acknowledgement of `packet_id`, sending `resend` again every retry interval."""
        loop = self._loop
        try:
            while True:
                if self.closed.done():
                    raise ConnectionEnded
                waiter: asyncio.Future[Any] = loop.create_future()
                waiters[packet_id] = waiter  # amqtt's stop() cancels every waiter of the connection
                timer = loop.call_later(self.limits.retry_interval_s, _time_to_retry, waiter)
                try:
                    result = await waiter
                except asyncio.CancelledError:
                    if waiter.cancelled():
                        raise ConnectionEnded from None
                    raise
                finally:
                    timer.cancel()
                if result is not _RETRY:
                    return result
                log.info("client %r: packet %d not acknowledged, sending it again", self._who(), packet_id)
                self.write(resend)
        finally:
            waiters.pop(packet_id, None)

    async def _acquire(self, window: Window) -> None:
        """A place in the session's in-flight window, or `ConnectionEnded` if the connection goes first."""
        session: LeanSession = self.session
        if window.take():
            return
        if session.waiting >= self.limits.max_queued_messages:
            raise QueueFull(f"client {str(session.client_id)[:96]!r}: outgoing queue full")
        session.waiting += 1
        place: asyncio.Future[Any] = self._loop.create_future()
        window.waiters.append(place)
        closed: asyncio.Future[Any] = self.closed
        try:
            await asyncio.wait({place, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            session.waiting -= 1
            if not place.done():
                place.cancel()  # give() skips it
        if place.cancelled():
            raise ConnectionEnded
        if closed.done():
            window.give()
            raise ConnectionEnded

    async def _outgoing_flow(self, message: Any) -> None:
        """QoS 1/2 PUBLISH to a client: the message leaves the session's in-flight table only when it is
        acknowledged; a disconnect leaves it there for redelivery with DUP (MQTT-4.4.0-1)."""
        session = self.session
        window = self._window()
        try:
            await self._acquire(window)
        except ConnectionEnded:
            session.inflight_out.setdefault(message.packet_id, message)  # redelivered on reconnect
            return
        if message.qos == QOS_1:
            finished: asyncio.Future[None] = self._loop.create_future()
            self._send_in_window(window, message, finished)  # gives the place back itself
            await finished
            return
        session.inflight_out[message.packet_id] = message
        packet_id = message.packet_id
        try:
            if message.pubrec_packet is None:
                self.write(_sending(message))
                message.pubrec_packet = await self._await_ack(self._pubrec_waiters, packet_id, _dup(message))
            pubrel = ack(0x62, packet_id)
            message.pubrel_packet = pubrel
            self.write(pubrel)
            message.pubcomp_packet = await self._await_ack(self._pubcomp_waiters, packet_id, pubrel)
            session.inflight_out.pop(message.packet_id, None)
        except ConnectionEnded:
            pass  # stays in flight: sent again when the session reconnects
        finally:
            window.give()

    def send_qos1(self, topic: str, data: bytes) -> bool:
        """Send a QoS 1 PUBLISH at once when the session's window has room, without a task per message;
        False (nothing done) when the caller must queue it through `mqtt_publish` instead."""
        session = self.session
        if session is None or self.closed.done():
            return False
        window = self._window()
        if not window.take():
            return False
        try:
            packet_id = session.next_packet_id
        except Exception:
            window.give()
            return False
        self._send_in_window(window, OutgoingApplicationMessage(packet_id, topic, QOS_1, data, False))
        return True

    def _send_in_window(
        self, window: Window, message: Any, finished: asyncio.Future[None] | None = None
    ) -> None:
        """Send a QoS 1 message holding a place in the window, as an entry of the connection's in-flight table
        (see `_Qos1Flight`): it stays in flight until acknowledged, is sent again with DUP every retry
        interval, and is left in flight for redelivery when the connection ends; then the place is given
        back and `finished` is set."""
        self.session.inflight_out[message.packet_id] = message
        self.write(_sending(message))
        loop = self._loop
        self._qos1[message.packet_id] = _Qos1Flight(window, message, finished, loop.time())
        if self._retry_timer is None:
            self._retry_timer = loop.call_later(self.limits.retry_interval_s, self._resend_due)

    def _resend_due(self) -> None:
        """Send again, with DUP, each QoS 1 message unacknowledged for `retry_interval_s`, then wait for the
        next one due. Re-armed lazily: a timer that finds nothing due (its message was acknowledged) just
        waits for the oldest left."""
        self._retry_timer = None
        flights = self._qos1
        if not flights or self.closed.done():
            return
        loop = self._loop
        now, interval = loop.time(), self.limits.retry_interval_s
        due: list[int] = []
        for packet_id, flight in flights.items():
            if flight.sent_at + interval > now:
                break
            due.append(packet_id)
        for packet_id in due:
            flight = flights.pop(packet_id)
            log.info("client %r: packet %d not acknowledged, sending it again", self._who(), packet_id)
            self.write(_dup(flight.message))
            flight.sent_at = now
            flights[packet_id] = flight  # to the end: the table stays in the order of the last send
        oldest = next(iter(flights.values()))
        self._retry_timer = loop.call_at(oldest.sent_at + interval, self._resend_due)

    def queue_full(self) -> bool:
        """Whether a QoS 1/2 message to this client would be dropped now: its in-flight window is full and
        as many messages wait for a place as `max_queued_messages` allows (`_acquire` would raise
        `QueueFull`). The broker then drops it without starting anything."""
        session: LeanSession | None = self.session
        if session is None:
            return False
        window = self._window()
        return (
            window.free <= 0 or bool(window.waiters)
        ) and session.waiting >= self.limits.max_queued_messages


def _sending(message: Any) -> bytes:
    """The PUBLISH of an outgoing QoS 1/2 `message` as sent now: with DUP if it was sent before, and marked
    sent, so later sends carry DUP (MQTT-3.3.1-1)."""
    packet = encode_publish(
        message.topic,
        message.data,
        message.qos,
        message.packet_id,
        dup=message.publish_packet is not None,
        retain=bool(message.retain),
    )
    if message.publish_packet is None:
        message.publish_packet = packet
    return packet


def _dup(message: Any) -> bytes:
    """The PUBLISH of a `message` sent before, again: DUP set (MQTT-3.3.1-1), encoded only when needed."""
    return encode_publish(
        message.topic, message.data, message.qos, message.packet_id, dup=True, retain=bool(message.retain)
    )

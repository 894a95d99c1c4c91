"""MQTT on the asyncio loop: one paho-mqtt client per device link, driven by the loop's reader/writer
callbacks, sharing one connect thread pool (`Hub`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from simulator.model import ClientMissing, SimulationOptions

try:
    import paho.mqtt.client as mqtt  # type: ignore[import-untyped]  # paho-mqtt 1.x ships no type information
except ModuleNotFoundError as e:  # the `simulator` extra, not a dependency of the broker
    raise ClientMissing(
        "the simulator needs paho-mqtt, which the broker does not install: pip install 'ota-broker[simulator]'"
    ) from e

REPLY_TIMEOUT_S = 10.0  # CONNACK, SUBACK, PUBACK
KEEPALIVE_S = 60
CONNECT_THREADS = 4


# ------------------------------------------------------------------------------ MQTT on the asyncio loop


class ConnectionLost(Exception):
    """The MQTT connection closed while waiting for an answer."""


class LoginRefused(Exception):
    """The broker answered CONNACK with a non-zero return code."""

    def __init__(self, rc: int) -> None:
        super().__init__(f"login refused (CONNACK {rc}: {mqtt.connack_string(rc)})")
        self.rc = rc


@dataclass(frozen=True, slots=True)
class Login:
    client_id: str
    username: str | None
    password: str | None


_CLOSED_BEFORE_CONNACK = -1


class Hub:
    """What the MQTT links of one process share: the loop, the connect thread pool, the TLS context, and
    the once-a-second keep-alive pass over every open link."""

    def __init__(self, options: SimulationOptions) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.options = options
        self.https = options.ssl_context()
        self.tls = self.https if options.tls else None
        self.connected = 0  # links with an accepted CONNACK
        self.executor = ThreadPoolExecutor(CONNECT_THREADS, thread_name_prefix="simulator-connect")
        self.links: set[Link] = set()
        self._misc = asyncio.create_task(self._keepalive())

    def in_loop(self, fn: Callable[..., object], *args: Any) -> None:
        """Run `fn` on the loop's thread: now if called there, else as soon as the loop can."""
        if threading.get_ident() == self.loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for link in list(self.links):
                link.misc()

    async def aclose(self) -> None:
        self._misc.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._misc
        await asyncio.gather(*(link.close() for link in list(self.links)))
        self.executor.shutdown(wait=True)


class Link:
    """One MQTT connection of one device: a paho client driven by the hub's loop."""

    def __init__(
        self,
        hub: Hub,
        login: Login,
        on_message: Callable[[str, bytes], None],
        on_lost: Callable[[Link], None],
    ) -> None:
        self.hub = hub
        self._on_message = on_message
        self._on_lost = on_lost
        client = mqtt.Client(
            client_id=login.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        if login.username is not None:
            client.username_pw_set(login.username, login.password)
        if hub.tls is not None:
            client.tls_set_context(hub.tls)
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.on_connect = self._connack
        client.on_disconnect = self._disconnected
        client.on_publish = self._puback
        client.on_subscribe = self._suback
        client.on_message = self._message
        self.client = client
        self._sock: Any = None  # the socket registered with the loop
        self._writing = False
        self._connack_future: asyncio.Future[int] = hub.loop.create_future()
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self.connected = False
        self.closed = asyncio.Event()
        self._closing = False

    # paho's socket callbacks: register the socket with the loop (from the connect thread: via the loop)

    def _socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._add_reader, sock)

    def _add_reader(self, sock: Any) -> None:
        self._sock = sock
        self.hub.links.add(self)
        self.hub.loop.add_reader(sock, self._readable)

    def _socket_close(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._forget, sock)

    def _forget(self, sock: Any) -> None:
        if self._sock is sock:
            self.hub.loop.remove_reader(sock)
            if self._writing:
                self.hub.loop.remove_writer(sock)
                self._writing = False
            self._sock = None
        self.hub.links.discard(self)
        self._gone()

    def _register_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self.hub.in_loop(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        if self._sock is sock and not self._writing:
            self._writing = True
            self.hub.loop.add_writer(sock, self.client.loop_write)

    def _unregister_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if self._sock is sock and self._writing:
            self._writing = False
            self.hub.loop.remove_writer(sock)

    def _readable(self) -> None:
        sock = self._sock
        rc = self.client.loop_read()
        # Records TLS already decrypted wake no reader: drain them while the socket stays the same.
        while rc == mqtt.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and self._sock is sock:
            if not sock.pending():
                break
            rc = self.client.loop_read()

    def misc(self) -> None:
        if self._sock is not None:
            self.client.loop_misc()

    # paho's protocol callbacks (always on the loop's thread: they run inside loop_read/loop_write)

    def _connack(self, _client: Any, _userdata: Any, _flags: Any, rc: int) -> None:
        if rc == 0 and not self.connected:
            self.connected = True
            self.hub.connected += 1
        if not self._connack_future.done():
            self._connack_future.set_result(rc)

    def _disconnected(self, _client: Any, _userdata: Any, _rc: int) -> None:
        self._down()

    def _down(self) -> None:
        """The connection is over (paho reports it, or its socket closed): fail what waits on it, once."""
        for future in self._acks.values():
            if not future.done():
                future.set_exception(ConnectionLost("the connection closed"))
        self._acks.clear()
        if not self._connack_future.done():
            self._connack_future.set_result(_CLOSED_BEFORE_CONNACK)
        if self.connected:
            self.connected = False
            self.hub.connected -= 1
            if not self._closing:
                self._on_lost(self)

    def _gone(self) -> None:
        self._down()
        self.closed.set()

    def _puback(self, _client: Any, _userdata: Any, mid: int) -> None:
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(None)

    def _suback(self, _client: Any, _userdata: Any, mid: int, granted: Any) -> None:
        future = self._acks.pop(mid, None)
        if future is not None and not future.done():
            future.set_result(tuple(granted))

    def _message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._on_message(str(message.topic), bytes(message.payload))

    # what a device does with it

    async def connect(self) -> None:
        """TCP (and TLS) connect on the hub's thread pool, then wait for CONNACK; raises LoginRefused,
        OSError, ssl.SSLError or TimeoutError."""
        options = self.hub.options
        pending = self.hub.loop.run_in_executor(
            self.hub.executor, self.client.connect, options.host, options.port, KEEPALIVE_S
        )
        try:
            await asyncio.shield(pending)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await pending  # the thread finishes its connect (bounded by paho's 5 s); then close
            await self.close()
            raise
        try:
            rc = await asyncio.wait_for(asyncio.shield(self._connack_future), REPLY_TIMEOUT_S)
        except BaseException:
            await self.close()
            raise
        if rc == _CLOSED_BEFORE_CONNACK:
            await self.close()
            raise ConnectionLost("the connection closed before CONNACK")
        if rc != 0:
            await self.close()
            raise LoginRefused(rc)

    async def subscribe(self, topic: str) -> int:
        rc, mid = self.client.subscribe(topic, qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"subscribe: {mqtt.error_string(rc)}")
        granted: tuple[int, ...] = await self._answer(mid)
        return granted[0] if granted else 0x80

    async def publish(self, topic: str, doc: dict[str, Any]) -> None:
        """Publish with QoS 1 and wait for the PUBACK."""
        info = self.client.publish(topic, json.dumps(doc), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"publish: {mqtt.error_string(info.rc)}")
        await self._answer(info.mid)

    async def _answer(self, mid: int) -> Any:
        if not self.connected:
            raise ConnectionLost("not connected")
        future: asyncio.Future[Any] = self.hub.loop.create_future()
        self._acks[mid] = future
        try:
            return await asyncio.wait_for(future, REPLY_TIMEOUT_S)
        finally:
            self._acks.pop(mid, None)

    async def close(self, grace: float = 2.0) -> None:
        """DISCONNECT and wait for the socket to close; after `grace` seconds, close it without ceremony."""
        self._closing = True
        if self._sock is None:
            self._gone()
            return
        if self.connected:
            self.client.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closed.wait(), grace)
        sock = self._sock
        if sock is not None:
            self._forget(sock)
            sock.close()


# ------------------------------------------------------------------------------------------- devices

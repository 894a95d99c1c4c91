"""MQTT over WebSockets (MQTT 3.1.1 section 6) and secure WebSockets: a real WebSocket MQTT client
(paho-mqtt, `transport="websockets"`, path /mqtt) exchanges QoS 0, 1 and 2 messages both ways with a TCP
client, and a WebSocket connection gets the same protocol checks and authentication as a TCP one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from argon2 import PasswordHasher
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

from broker import app as broker_app
from tests.broker import rawmqtt as mq
from tests.support import Tls, broker_config, eventually

AT_ONCE_S = 1.0


@pytest.fixture
async def running(tmp_path: Path, tls: Tls) -> AsyncIterator[broker_app.RunningBroker]:
    """A broker in device-secret mode with an account, a TCP, a WebSocket and a secure WebSocket
    listener, all on 127.0.0.1 port 0."""
    config = broker_config(tmp_path / "data", tls, auth_mode="device-secret")
    config["plugins"]["plugins.device_auth.plugin.DeviceAuthPlugin"] = {
        "accounts": {
            "app": {"password_hash": PasswordHasher().hash("pw"), "publish": ["ws/#"], "subscribe": ["ws/#"]}
        }
    }
    config["listeners"]["ws"] = {"type": "ws", "bind": "127.0.0.1:0"}
    config["listeners"]["wss"] = {
        "type": "ws",
        "bind": "127.0.0.1:0",
        "ssl": True,
        "certfile": str(tls.cert_file),
        "keyfile": str(tls.key_file),
    }
    started = await broker_app.start(config)
    try:
        yield started
    finally:
        await started.stop()


def _port(running: broker_app.RunningBroker, listener: str) -> int:
    return int(next(iter(running.broker._servers[listener].instance.sockets)).getsockname()[1])


class Client:
    """A paho-mqtt 1.x client over TCP or WebSockets that records (topic, payload, QoS) received."""

    def __init__(self, client_id: str, transport: str = "tcp", tls: Tls | None = None) -> None:
        self.client = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311, transport=transport)
        self.client.username_pw_set("app", "pw")
        if transport == "websockets":
            self.client.ws_set_options(path="/mqtt")
        if tls is not None:
            self.client.tls_set_context(tls.client_context())
        self.received: list[tuple[str, bytes, int]] = []
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self.client.on_connect = lambda _c, _u, _f, rc: self._connected.set() if rc == 0 else None
        self.client.on_message = self._on_message

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((message.topic, bytes(message.payload), message.qos))

    async def connect(self, port: int) -> Client:
        # paho's connect does the WebSocket (and TLS) handshake itself, blocking: off the broker's loop
        await asyncio.to_thread(self.client.connect, "127.0.0.1", port, 30)
        self.client.loop_start()
        await eventually(self._connected.is_set, 5, "CONNACK")
        return self

    async def subscribe(self, topic: str, qos: int) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=qos)
        await eventually(done.is_set, 5, "SUBACK")

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish and wait until the broker acknowledged it (PUBACK, PUBCOMP; sent for QoS 0)."""
        info = self.client.publish(topic, payload, qos=qos)
        await eventually(info.is_published, 5, f"QoS {qos} publish acknowledged")

    def messages(self) -> list[tuple[str, bytes, int]]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("listener", ["ws", "wss"])
async def test_qos_0_1_2_both_ways_over_websockets(
    running: broker_app.RunningBroker, tls: Tls, listener: str
) -> None:
    """A WebSocket MQTT client (subprotocol mqtt, path /mqtt; over TLS for wss) has its QoS 0, 1 and 2
    PUBLISHes acknowledged and routed to a TCP subscriber, and receives the TCP client's at QoS 0, 1 and 2
    (MQTT 6.0; MQTT-4.3.2, MQTT-4.3.3)."""
    web = Client(f"web-{listener}", "websockets", tls if listener == "wss" else None)
    tcp = Client(f"tcp-{listener}")
    try:
        await web.connect(_port(running, listener))
        await tcp.connect(running.mqtt_address[1])
        await web.subscribe("ws/in", 2)
        await tcp.subscribe("ws/out", 2)
        for qos in (0, 1, 2):
            await web.publish("ws/out", b"from web %d" % qos, qos)
            await tcp.publish("ws/in", b"from tcp %d" % qos, qos)
        expected_out = [("ws/out", b"from web %d" % q, q) for q in (0, 1, 2)]
        expected_in = [("ws/in", b"from tcp %d" % q, q) for q in (0, 1, 2)]
        await eventually(lambda: tcp.messages() == expected_out, 5, "the web client's messages over TCP")
        await eventually(lambda: web.messages() == expected_in, 5, "the TCP client's messages over WS")
    finally:
        web.close()
        tcp.close()


async def _ws(running: broker_app.RunningBroker, path: str = "/mqtt", mqtt_subprotocol: bool = True) -> Any:
    """A raw WebSocket connection to the ws listener (offering the mqtt subprotocol, or none)."""
    url = f"ws://127.0.0.1:{_port(running, 'ws')}{path}"
    return ws_connect(url, subprotocols=[Subprotocol("mqtt")] if mqtt_subprotocol else None, open_timeout=5)


async def _closed(connection: Any) -> bytes:
    """Everything the broker sends until it closes the WebSocket (within AT_ONCE_S)."""
    received = b""
    try:
        async with asyncio.timeout(AT_ONCE_S):
            while True:
                received += await connection.recv()
    except ConnectionClosed:
        return received


async def test_websocket_gets_the_same_connect_checks_and_authentication(
    running: broker_app.RunningBroker,
) -> None:
    """Over WebSockets as over TCP: a first packet other than CONNECT closes at once (MQTT-3.1.0-1), an
    MQTT 5 CONNECT gets return code 1 (MQTT-3.1.2-2), a wrong password return code 5, a text frame closes
    the connection (MQTT-6.0.0-1), and a valid login is served."""
    async with await _ws(running) as connection:
        await connection.send(mq.pingreq())
        assert await _closed(connection) == b""
    async with await _ws(running) as connection:
        await connection.send(mq.raw_connect(0x02, mq.string("v5"), level=5, properties=b"\x21\x00\x10"))
        assert await _closed(connection) == b"\x20\x02\x00\x01"
    async with await _ws(running) as connection:
        await connection.send(mq.connect("bad", username="app", password="wrong"))
        assert await _closed(connection) == b"\x20\x02\x00\x05"
    async with await _ws(running) as connection:
        await connection.send(mq.connect("good", username="app", password="pw"))
        assert await asyncio.wait_for(connection.recv(), 5) == b"\x20\x02\x00\x00"
        await connection.send(mq.subscribe(1, ("ws/#", 1)))
        assert await asyncio.wait_for(connection.recv(), 5) == b"\x90\x03\x00\x01\x01"
        await connection.send("a text frame")
        assert await _closed(connection) == b""


async def test_websocket_is_served_at_mqtt_with_the_mqtt_subprotocol(
    running: broker_app.RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """The WebSocket listener answers only at /mqtt (404 elsewhere) and only to a client offering the mqtt
    subprotocol (400 otherwise); a refused handshake is a log line, not a traceback."""
    for path, offer, status in (("/", True, 404), ("/other", True, 404), ("/mqtt", False, 400)):
        with pytest.raises(InvalidStatus) as refused:
            async with await _ws(running, path=path, mqtt_subprotocol=offer):
                pass
        assert refused.value.response.status_code == status, (path, offer)
    assert not [r for r in caplog.records if r.exc_info]

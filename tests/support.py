"""Shared test helpers: an in-process broker on 127.0.0.1 port 0, real MQTT devices (paho-mqtt 1.x,
the same library Aliyun's Python SDK uses), HTTPS downloads with trustme certificates, API calls.

Every wait here is bounded in time and stops by itself; everything talks to loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import trustme
from multidict import CIMultiDict

from broker import app as broker_app
from plugins.ota.settings import PLUGIN_KEY

TOKEN = "test-admin-token"
WAIT_S = 10.0


async def eventually(check: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    """Poll `check` (sync or async) until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@dataclass
class Tls:
    """A trustme CA and a server certificate for 127.0.0.1 and localhost, written to files."""

    ca: trustme.CA
    cert_file: Path
    key_file: Path

    @classmethod
    def make(cls, directory: Path) -> Tls:
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        cert_file, key_file = directory / "server.pem", directory / "server.key"
        server.private_key_pem.write_to_path(str(key_file))
        cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
        return cls(ca, cert_file, key_file)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    @property
    def ca_pem(self) -> str:
        return self.ca.cert_pem.bytes().decode()


def broker_config(data_dir: Path, tls: Tls | None, **ota: Any) -> dict[str, Any]:
    plugin: dict[str, Any] = {
        "data_dir": str(data_dir),
        "https_bind": "127.0.0.1:0",
        "public_url": "https://127.0.0.1:0",
        "admin_bind": "127.0.0.1:0",
        "admin_token": TOKEN,
        "mqtts_bind": "",
        "tick_seconds": 0.2,
        "auth_mode": "open",
    }
    if tls is not None:
        plugin |= {"tls_cert": str(tls.cert_file), "tls_key": str(tls.key_file)}
    plugin |= ota
    return {
        "listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}},
        "plugins": {
            "plugins.device_auth.plugin.DeviceAuthPlugin": {},
            PLUGIN_KEY: plugin,
        },
    }


def secure_config(data_dir: Path, tls: Tls) -> dict[str, Any]:
    """`broker_config` in `device-secret` mode with an MQTT-over-TLS listener on 127.0.0.1:0 too."""
    config = broker_config(data_dir, tls, auth_mode="device-secret")
    config["listeners"]["tls"] = {
        "type": "tcp",
        "bind": "127.0.0.1:0",
        "ssl": True,
        "certfile": str(tls.cert_file),
        "keyfile": str(tls.key_file),
    }
    return config


@dataclass
class Env:
    """A running in-process broker and the clients that talk to it."""

    running: broker_app.RunningBroker
    tls: Tls
    http: aiohttp.ClientSession
    devices: list[Device] = field(default_factory=list)

    @property
    def mqtt_port(self) -> int:
        return self.running.mqtt_address[1]

    @property
    def admin(self) -> str:
        host, port = self.running.admin_address
        return f"http://{host}:{port}/api/v1"

    @property
    def service(self) -> Any:
        return self.running.plugin.service

    def device(self, pk: str, dn: str, **kwargs: Any) -> Device:
        d = Device(self.mqtt_port, pk, dn, **kwargs)
        self.devices.append(d)
        return d

    async def api(self, method: str, path: str, expect: int | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})}
        async with self.http.request(method, self.admin + path, headers=headers, **kwargs) as r:
            body = await r.read()
            doc = json.loads(body) if body else None
            if expect is not None:
                assert r.status == expect, f"{method} {path}: {r.status} {doc}"
            return doc

    async def find(self, path: str) -> Any:
        """GET `path`: the answer, or None when it is 404."""
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.http.get(self.admin + path, headers=headers) as r:
            if r.status == 404:
                return None
            assert r.status == 200, f"GET {path}: {r.status} {await r.text()}"
            return await r.json()

    async def upload(
        self, data: bytes, product_key: str = "pk", version: str = "2.0.0", **fields: str
    ) -> Any:
        form = aiohttp.FormData()
        form.add_field("product_key", product_key)
        form.add_field("version", version)
        for k, v in fields.items():
            form.add_field(k, v)
        # a stream: aiohttp warns (an error here) about large bodies given as bytes
        form.add_field("file", io.BytesIO(data), filename="fw.bin", content_type="application/octet-stream")
        return await self.api("POST", "/firmware", expect=201, data=form)

    async def job(self, firmware_id: int, devices: list[str], **options: Any) -> Any:
        body = {"firmware_id": firmware_id, "type": "static", "devices": devices, **options}
        return await self.api("POST", "/jobs", expect=201, json=body)

    async def tasks(self, job_id: int) -> dict[str, Any]:
        return {t["device"]: t for t in await self.api("GET", f"/jobs/{job_id}/tasks", expect=200)}

    async def task_state(
        self, job_id: int, device: str, state: str, timeout: float = WAIT_S
    ) -> dict[str, Any]:
        async def check() -> Any:
            task = (await self.tasks(job_id)).get(device)
            return task if task and task["state"] == state else None

        return await eventually(check, timeout, f"task of {device} in job {job_id} to be {state}")  # type: ignore[no-any-return]

    async def download(
        self, url: str, headers: dict[str, str] | None = None
    ) -> tuple[int, CIMultiDict[str], bytes]:
        """GET `url` over HTTPS trusting the test CA: status, headers (case-insensitive) and body."""
        async with self.http.get(url, ssl=self.tls.client_context(), headers=headers or {}) as r:
            return r.status, r.headers.copy(), await r.read()


@contextlib.asynccontextmanager
async def started(config: dict[str, Any], tls: Tls) -> AsyncIterator[Env]:
    """A broker started in this process from `config`, and an HTTP client; stopped (and its devices
    disconnected) on the way out."""
    running = await broker_app.start(config)
    async with aiohttp.ClientSession() as http:
        e = Env(running, tls, http)
        try:
            yield e
        finally:
            for d in e.devices:
                d.disconnect()
            await running.stop()


class Device:
    """A device on a real MQTT connection (paho-mqtt 1.x, its own network thread)."""

    def __init__(
        self,
        port: int,
        pk: str,
        dn: str,
        *,
        client_id: str | None = None,
        username: str | None = None,
        clean_session: bool = True,
    ) -> None:
        self.pk, self.dn, self.port = pk, dn, port
        self.ref = f"{pk}/{dn}"
        self.client = mqtt.Client(
            client_id=client_id or f"{pk}.{dn}", clean_session=clean_session, protocol=mqtt.MQTTv311
        )
        if username is not None:
            self.client.username_pw_set(username, "x")
        self._lock = threading.Lock()
        self.received: list[tuple[str, dict[str, Any]]] = []
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        self.client.on_connect = lambda *_a: self._connected.set()
        self._next_id = 1

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = {"raw": msg.payload}
        with self._lock:
            self.received.append((msg.topic, doc))

    async def connect(self) -> Device:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        await eventually(self._connected.is_set, what=f"{self.ref} to connect")
        return self

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    async def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        await eventually(done.is_set, what=f"{self.ref} SUBACK")

    async def publish(self, topic: str, payload: bytes | str | dict[str, Any], qos: int = 1) -> None:
        """Publish and wait (without blocking the event loop the broker runs on) until it is acknowledged."""
        data = json.dumps(payload) if isinstance(payload, dict) else payload
        info = self.client.publish(topic, data, qos=qos)
        await eventually(info.is_published, what=f"{self.ref} publish on {topic} to be acknowledged")

    def request_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def inform(self, version: str, module: str | None = None) -> None:
        params = {"version": version} | ({"module": module} if module else {})
        await self.publish(
            f"/ota/device/inform/{self.pk}/{self.dn}", {"id": self.request_id(), "params": params}
        )

    async def progress(self, step: str, desc: str = "", module: str | None = None) -> None:
        params = {"step": step, "desc": desc} | ({"module": module} if module else {})
        await self.publish(
            f"/ota/device/progress/{self.pk}/{self.dn}", {"id": self.request_id(), "params": params}
        )

    async def pull(self, module: str | None = None, request_id: Any = 7) -> None:
        params = {"module": module} if module else {}
        await self.publish(
            f"/sys/{self.pk}/{self.dn}/thing/ota/firmware/get", {"id": request_id, "params": params}
        )

    @property
    def upgrade_topic(self) -> str:
        return f"/ota/device/upgrade/{self.pk}/{self.dn}"

    def messages(self, topic: str) -> list[dict[str, Any]]:
        with self._lock:
            return [doc for t, doc in self.received if t == topic]

    async def wait_messages(
        self, topic: str, count: int = 1, timeout: float = WAIT_S
    ) -> list[dict[str, Any]]:
        await eventually(
            lambda: len(self.messages(topic)) >= count, timeout, f"{count} message(s) on {topic}"
        )
        return self.messages(topic)

    async def notices(self, count: int = 1) -> list[dict[str, Any]]:
        return await self.wait_messages(self.upgrade_topic, count)


async def reporting(env: Env, name: str, **kwargs: Any) -> Device:
    """A connected device `pk/<name>` whose version 1.0.0 the broker has recorded."""
    d = await env.device("pk", name, **kwargs).connect()
    await d.inform("1.0.0")

    async def recorded() -> bool:
        found = await env.find(f"/devices/pk/{name}")
        return found is not None and found["modules"].get("default") == "1.0.0"

    await eventually(recorded, what=f"pk/{name} to be recorded")
    return d

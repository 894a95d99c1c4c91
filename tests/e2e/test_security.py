"""Security end to end: a real broker in `device-secret` mode on 127.0.0.1:0 with real
paho devices that sign their CONNECT the way Aliyun's SDKs do, an application account, and the HTTPS
download endpoint under abuse (concurrent downloads, slow-loris)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from argon2 import PasswordHasher

from broker import app as broker_app
from plugins.device_auth.signing import login_for
from plugins.ota.core.topics import DeviceRef
from tests.broker.rawmqtt import RawClient
from tests.broker.rawmqtt import connect as raw_connect
from tests.broker.rawmqtt import publish as raw_publish
from tests.support import Device, Env, Tls, broker_config, eventually

AUTH_KEY = "plugins.device_auth.plugin.DeviceAuthPlugin"
DASH_PASSWORD = "dash-pw"  # the test account's password
FIRMWARE = os.urandom(300_000)
REFUSED = 5  # CONNACK "not authorized"
SUB_REFUSED = 0x80


@functools.cache
def dash_hash() -> str:
    return PasswordHasher().hash(DASH_PASSWORD)


@contextlib.asynccontextmanager
async def secure_broker(data_dir: Path, tls: Tls, **auth: Any) -> AsyncIterator[Env]:
    """A broker in device-secret mode with the "dash" account; `auth` adds DeviceAuthPlugin settings."""
    config = broker_config(
        data_dir,
        tls,
        auth_mode="device-secret",
        http_header_timeout_s=0.5,
        max_downloads_per_device=1,
        progress_burst=5,
        progress_per_second=1,
    )
    config["plugins"][AUTH_KEY] = {
        "accounts": {
            "dash": {
                "password_hash": dash_hash(),
                "publish": ["/apps/dash/+"],
                "subscribe": ["/ota/device/progress/+/+", "/apps/+"],
            }
        },
        **auth,
    }
    running = await broker_app.start(config)
    # The admin API closes idle keep-alive connections after http_header_timeout_s (0.5 s): never reuse one.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        e = Env(running, tls, http)
        try:
            yield e
        finally:
            for d in e.devices:
                await asyncio.to_thread(d.disconnect)
            await running.stop()


@pytest.fixture
async def secure(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A real broker in device-secret mode (timestamps not checked, as by default)."""
    async with secure_broker(tmp_path / "data", tls) as e:
        yield e


@pytest.fixture
async def skewed(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A real broker in device-secret mode that refuses CONNECT timestamps more than 300 s off."""
    async with secure_broker(tmp_path / "data", tls, max_timestamp_skew_s=300) as e:
        yield e


class Peer(Device):
    """A paho client that sends exactly the given CONNECT fields and never reconnects by itself, so one
    call to `attempt` is one CONNECT and a connection the server closes stays closed."""

    def __init__(
        self,
        port: int,
        pk: str,
        dn: str,
        client_id: str,
        username: str,
        password: str,
        clean_session: bool = True,
    ) -> None:
        super().__init__(port, pk, dn, client_id=client_id, username=username)
        self.client = mqtt.Client(
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(username, password)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.rc: int | None = None
        self.closed = threading.Event()

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, rc: int) -> None:
        self.rc = rc
        self._connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _rc: int) -> None:
        self.closed.set()

    async def attempt(self) -> int:
        """Connect once and answer the CONNACK's return code (0 accepted, 5 not authorized)."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        await eventually(lambda: self.rc is not None, what=f"CONNACK for {self.ref}")
        assert self.rc is not None
        return self.rc

    async def connect(self) -> Peer:
        rc = await self.attempt()
        assert rc == 0, f"{self.ref} refused with CONNACK {rc}"
        return self

    async def granted(self, topic_filter: str) -> int:
        """SUBSCRIBE with QoS 1 and answer the granted QoS (128 when refused)."""
        granted: list[int] = []
        self.client.on_subscribe = lambda _c, _u, _mid, qos: granted.extend(qos)
        self.client.subscribe(topic_filter, qos=1)
        await eventually(lambda: granted, what=f"SUBACK for {topic_filter}")
        return granted[0]

    async def gone(self) -> None:
        """Wait until the server has closed this connection."""
        await eventually(self.closed.is_set, what=f"the connection of {self.ref} to be closed")


def peer(
    env: Env, pk: str, dn: str, client_id: str, username: str, password: str, clean_session: bool = True
) -> Peer:
    p = Peer(env.mqtt_port, pk, dn, client_id, username, password, clean_session)
    env.devices.append(p)
    return p


def signed(env: Env, pk: str, dn: str, secret: str, clean_session: bool = True, **how: Any) -> Peer:
    """A device that logs in as `pk/dn` signing with `secret` (login_for's keywords: client_id_part,
    method, timestamp...)."""
    login = login_for(DeviceRef(pk, dn), secret, **how)
    return peer(env, pk, dn, login.client_id, login.username, login.password, clean_session)


async def register(env: Env, pk: str, dn: str, secret: str | None = None) -> str:
    body = {"product_key": pk, "device_name": dn} | ({"device_secret": secret} if secret else {})
    created = await env.api("POST", "/devices", expect=201, json=body)
    assert created["device_secret"]
    if secret:
        assert created["device_secret"] == secret
    return str(created["device_secret"])


async def online(env: Env, pk: str, dn: str, version: str = "1.0.0") -> Peer:
    """A registered, signed-in device whose `version` the broker has recorded."""
    secret = await register(env, pk, dn)
    d = await signed(env, pk, dn, secret).connect()
    await d.inform(version)
    await recorded(env, d.ref, version)
    return d


async def recorded(env: Env, ref: str, version: str) -> None:
    async def check() -> bool:
        found = await env.find(f"/devices/{ref}")
        return found is not None and found["modules"].get("default") == version

    await eventually(check, what=f"{ref} recorded at {version}")


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ota.auth" and r.getMessage().startswith("refused CONNECT")
    ]


def now_ms(offset_s: float = 0.0) -> str:
    return str(int((time.time() + offset_s) * 1000))


# ------------------------------------------------------------------------------------------- 1. login


async def test_signed_device_logs_in_and_upgrades(secure: Env) -> None:
    """Correct hmacsha256/hmacsha1 signatures, with or without timestamp, log in; the device gets its notice
    without subscribing and completes download, progress and new version."""
    env = secure
    secret = await register(env, "pk", "d1", "s3cret-of-device-d1")
    variants: list[dict[str, Any]] = [
        {"method": "hmacsha256"},
        {"method": "hmacsha256", "timestamp": now_ms()},
        {"method": "hmacsha1"},
        {"method": "hmacsha1", "timestamp": now_ms()},
    ]
    for how in variants:
        p = signed(env, "pk", "d1", secret, **how)
        assert await p.attempt() == 0, how
        await asyncio.to_thread(p.disconnect)
    login = login_for(DeviceRef("pk", "d1"), secret, method="hmacsha1", client_id_part="upper")
    upper = peer(env, "pk", "d1", login.client_id, login.username, login.password.upper())
    assert await upper.attempt() == 0, "hex is compared without regard to case"
    await asyncio.to_thread(upper.disconnect)

    d = await signed(env, "pk", "d1", secret, timestamp=now_ms()).connect()
    await d.inform("1.0.0")
    await recorded(env, "pk/d1", "1.0.0")
    fw = await env.upload(FIRMWARE, version="2.0.0")
    job = await env.job(fw["id"], ["pk/d1"])
    [notice] = await d.notices()  # never subscribed: auto-delivered to the authenticated session
    data = notice["data"]
    assert data["version"] == "2.0.0" and data["md5"] == fw["md5"]
    status, _, body = await env.download(data["url"])
    assert status == 200 and body == FIRMWARE
    await d.progress("50", "downloading")
    await env.task_state(job["id"], "pk/d1", "in_progress")
    await d.inform("2.0.0")
    task = await env.task_state(job["id"], "pk/d1", "succeeded")
    assert task["attempts"] == 1


# ------------------------------------------------------------------------------------------ 2. refusals


async def test_bad_logins_are_refused_and_logged_once(secure: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Wrong or foreign secret, unknown or disabled device, malformed clientId and a username naming another
    device: CONNACK 5 and one log line naming the reason, never the secret or the password."""
    env = secure
    caplog.set_level(logging.WARNING, logger="ota.auth")
    secret_a = await register(env, "pk", "a", "secret-of-device-a")
    secret_b = await register(env, "pk", "b", "secret-of-device-b")
    secret_c = await register(env, "pk", "c", "secret-of-device-c")
    await env.api("PATCH", "/devices/pk/c", expect=200, json={"enabled": False})
    a = DeviceRef("pk", "a")
    good_a = login_for(a, secret_a)
    cases = [
        ("wrong secret", login_for(a, "not-the-secret"), "pk", "a", "bad signature"),
        ("another device's secret", login_for(a, secret_b), "pk", "a", "bad signature"),
        ("unknown device", login_for(DeviceRef("pk", "ghost"), "whatever"), "pk", "ghost", "unknown device"),
        ("disabled device", login_for(DeviceRef("pk", "c"), secret_c), "pk", "c", "device disabled"),
    ]
    attempts = [
        (what, login.client_id, login.username, login.password, pk, dn, reason)
        for what, login, pk, dn, reason in cases
    ]
    attempts += [
        ("malformed clientId", "pk.a", good_a.username, good_a.password, "pk", "a", "malformed clientId"),
        ("B's username, A's password", good_a.client_id, "b&pk", good_a.password, "pk", "b", "bad signature"),
    ]
    secrets = [secret_a, secret_b, secret_c]
    for what, client_id, username, password, pk, dn, reason in attempts:
        caplog.clear()
        p = peer(env, pk, dn, client_id, username, password)
        assert await p.attempt() == REFUSED, what
        lines = refusals(caplog)
        assert len(lines) == 1, (what, lines)
        assert reason in lines[0], (what, lines[0])
        for hidden in [*secrets, password]:
            assert hidden not in lines[0], (what, lines[0])
        await asyncio.to_thread(p.disconnect)

    # The real device A is not locked out by any of this.
    assert await signed(env, "pk", "a", secret_a).attempt() == 0


# -------------------------------------------------------------------------------------------- 3. replay


async def test_replayed_connect_is_accepted_without_timestamp_window(secure: Env) -> None:
    """An exact copy of A's CONNECT from another connection is accepted: Aliyun's timestamp is optional and
    unchecked by default, so a password captured on plain TCP can be replayed; hence TLS is recommended."""
    env = secure
    secret = await register(env, "pk", "a")
    login = login_for(DeviceRef("pk", "a"), secret, timestamp=now_ms(-86_400))
    first = await peer(env, "pk", "a", login.client_id, login.username, login.password).connect()
    replay = peer(env, "pk", "a", login.client_id, login.username, login.password)
    assert await replay.attempt() == 0
    assert first.rc == 0


async def test_timestamp_window_refuses_stale_logins(skewed: Env, caplog: pytest.LogCaptureFixture) -> None:
    """With max_timestamp_skew_s = 300, a correctly signed login whose timestamp is an hour off, or missing,
    is refused ("timestamp missing or outside the allowed window"); a fresh one (ms or s) is accepted."""
    env = skewed
    caplog.set_level(logging.WARNING, logger="ota.auth")
    secret = await register(env, "pk", "a")
    stale = signed(env, "pk", "a", secret, timestamp=now_ms(-3600), client_id_part="stale")
    assert await stale.attempt() == REFUSED
    [line] = refusals(caplog)
    assert "timestamp missing or outside the allowed window" in line and secret not in line
    future = signed(env, "pk", "a", secret, timestamp=now_ms(+3600), client_id_part="future")
    assert await future.attempt() == REFUSED
    bare = signed(env, "pk", "a", secret, client_id_part="bare")
    assert await bare.attempt() == REFUSED
    fresh = signed(env, "pk", "a", secret, timestamp=now_ms(), client_id_part="fresh")
    assert await fresh.attempt() == 0
    seconds = signed(env, "pk", "a", secret, timestamp=str(int(time.time())), client_id_part="secs")
    assert await seconds.attempt() == 0


# -------------------------------------------------------------------------- 4. disable, rotate, delete


async def test_disable_rotate_and_delete(secure: Env) -> None:
    """Disabling closes the device's connection and refuses its logins until re-enabled; a new secret closes
    the connection and only the new secret works; a device with an unfinished task cannot be deleted."""
    env = secure
    secret = await register(env, "pk", "a")
    a = await signed(env, "pk", "a", secret).connect()

    doc = await env.api("PATCH", "/devices/pk/a", expect=200, json={"enabled": False})
    assert doc["enabled"] is False
    await a.gone()
    assert await signed(env, "pk", "a", secret).attempt() == REFUSED
    await env.api("PATCH", "/devices/pk/a", expect=200, json={"enabled": True})
    a = await signed(env, "pk", "a", secret).connect()

    rotated = await env.api("POST", "/devices/pk/a/secret", expect=200)
    new_secret = rotated["device_secret"]
    assert new_secret and new_secret != secret
    await a.gone()
    assert await signed(env, "pk", "a", secret).attempt() == REFUSED
    a = await signed(env, "pk", "a", new_secret).connect()
    await a.inform("1.0.0")
    await recorded(env, "pk/a", "1.0.0")

    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/a"])
    await a.notices()
    refused = await env.api("DELETE", "/devices/pk/a", expect=409)
    assert refused["error"]
    assert await env.find("/devices/pk/a") is not None
    assert not a.closed.is_set()

    await env.api("POST", f"/jobs/{job['id']}/cancel", expect=200)
    await env.api("DELETE", "/devices/pk/a", expect=204)
    await a.gone()
    assert await signed(env, "pk", "a", new_secret).attempt() == REFUSED


# ----------------------------------------------------------------------------------------- 5. isolation


async def test_devices_are_isolated(secure: Env) -> None:
    """Device A cannot publish as B (B's version and task stay as they were), cannot subscribe to B's or
    everyone's notices, cannot forge a notice on its own upgrade topic and never receives B's notice."""
    env = secure
    a = await online(env, "pk", "a")
    b = await online(env, "pk", "b")

    assert await a.granted(a.upgrade_topic) == 1  # its own notices: allowed
    for topic_filter in (b.upgrade_topic, "/ota/device/upgrade/+/+", "#", "/sys/pk/b/#"):
        assert await a.granted(topic_filter) == SUB_REFUSED, topic_filter

    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/b"])
    await b.notices()
    before = (await env.tasks(job["id"]))["pk/b"]
    assert before["state"] == "notified"

    rejected = env.service.rejected["foreign_publish"]
    await a.publish("/ota/device/inform/pk/b", {"id": 1, "params": {"version": "2.0.0"}})
    await a.publish("/ota/device/progress/pk/b", {"id": 2, "params": {"step": "50", "desc": "forged"}})
    await eventually(
        lambda: env.service.rejected["foreign_publish"] >= rejected + 2, what="A's forged publishes refused"
    )
    # A's own publish after them is handled, so theirs have been too.
    await a.inform("1.0.1")
    await recorded(env, "pk/a", "1.0.1")
    assert (await env.find("/devices/pk/b"))["modules"] == {"default": "1.0.0"}
    after = (await env.tasks(job["id"]))["pk/b"]
    assert (after["state"], after["progress"], after["desc"]) == (
        before["state"],
        before["progress"],
        before["desc"],
    )

    forged = {"code": "1000", "message": "success", "id": 1, "data": {"url": "https://evil/x"}}
    await a.publish(a.upgrade_topic, forged)
    await a.pull(request_id=99)  # handled after the forged notice on the same connection
    await a.wait_messages("/sys/pk/a/thing/ota/firmware/get_reply")
    await asyncio.sleep(0.2)
    assert a.messages(a.upgrade_topic) == [], "A's forged notice was delivered"
    assert a.messages(b.upgrade_topic) == [], "A received B's notice"
    assert len(b.messages(b.upgrade_topic)) == 1


# ------------------------------------------------------- 5b. one clientId, several connections


async def test_refused_connect_reusing_a_client_id_leaves_the_device_alone(secure: Env) -> None:
    """A CONNECT refused for a bad signature that reuses a connected device's clientId (Aliyun clientIds are
    predictable, e.g. `pk.dn|securemode=3,signmethod=hmacsha256|`) does not take over the device's session:
    the device stays online and still gets its upgrade notice."""
    env = secure
    a = await online(env, "pk", "a")
    forged = login_for(DeviceRef("pk", "a"), "a-guessed-secret")  # the same clientId as `a`, wrong password
    evil = peer(env, "pk", "a", forged.client_id, forged.username, forged.password)
    assert await evil.attempt() == REFUSED

    fw = await env.upload(FIRMWARE)
    await env.job(fw["id"], ["pk/a"])
    await a.notices()
    assert not a.closed.is_set()
    assert (await env.find("/devices/pk/a"))["online"] is True


async def test_newest_connection_with_the_same_client_id_is_the_device_session(secure: Env) -> None:
    """A device that logs in again with the same clientId while its old connection lingers (NAT timeout,
    network switch, or a replayed CONNECT) is served on the new connection: the old one is closed
    (MQTT 3.1.1 [MQTT-3.1.4-2]) and the new one gets the notice after the old one is gone."""
    env = secure
    secret = await register(env, "pk", "a")
    login = login_for(DeviceRef("pk", "a"), secret)
    old = await peer(env, "pk", "a", login.client_id, login.username, login.password).connect()
    await old.inform("1.0.0")
    await recorded(env, "pk/a", "1.0.0")
    new = await peer(env, "pk", "a", login.client_id, login.username, login.password).connect()
    try:
        await eventually(old.closed.is_set, timeout=2.0, what="the older connection to be closed")
        old_closed = True
    except AssertionError:
        old_closed = False
    await asyncio.to_thread(old.disconnect)  # the lingering connection finally goes away

    fw = await env.upload(FIRMWARE)
    await env.job(fw["id"], ["pk/a"])
    await new.notices()
    assert (await env.find("/devices/pk/a"))["online"] is True
    assert old_closed, "the older connection with the same clientId was left open"


async def test_a_client_id_held_by_another_device_is_kept_apart(secure: Env) -> None:
    """Device B logging in with its own secret but device A's clientId (clean session 0 or 1) gets a session
    of its own: it never receives A's queued notice, A's stored session is neither resumed nor discarded,
    and an online A is not taken over; A still gets its session and its notice."""
    env = secure
    a_secret, b_secret = await register(env, "pk", "a"), await register(env, "pk", "b")
    a = await signed(env, "pk", "a", a_secret, clean_session=False).connect()
    await a.subscribe(a.upgrade_topic)
    await a.inform("1.0.0")
    await recorded(env, "pk/a", "1.0.0")
    await asyncio.to_thread(a.disconnect)

    async def a_offline() -> bool:
        return (await env.find("/devices/pk/a"))["online"] is False

    await eventually(a_offline, what="A to be offline")
    fw = await env.upload(FIRMWARE)
    await env.job(fw["id"], ["pk/a"])  # A's notice waits in its stored session

    for clean in (False, True):
        b = await signed(env, "pk", "b", b_secret, clean_session=clean, client_id_part="pk.a").connect()
        await b.subscribe(b.upgrade_topic)
        await asyncio.sleep(0.3)
        assert b.received == [], f"B (clean session {clean}) received A's messages: {b.received}"
        assert not b.closed.is_set()
        await asyncio.to_thread(b.disconnect)

    a = await signed(env, "pk", "a", a_secret, clean_session=False).connect()
    notices = await a.notices()
    assert notices[0]["data"]["version"] == "2.0.0"
    held = await signed(env, "pk", "b", b_secret, client_id_part="pk.a").connect()
    await asyncio.sleep(0.3)
    assert not a.closed.is_set(), "B took over A's live connection"
    assert held.received == []
    assert (await env.find("/devices/pk/a"))["online"] is True


async def test_a_live_connection_is_taken_over_only_by_the_same_device(secure: Env) -> None:
    """MQTT-3.1.4-2 applies within one identity: A's second connection with its clientId closes the first,
    while B's connections with A's clientId never close A's (however often B tries)."""
    env = secure
    a_secret, b_secret = await register(env, "pk", "a"), await register(env, "pk", "b")
    a = await signed(env, "pk", "a", a_secret).connect()
    for _ in range(3):
        b = await signed(env, "pk", "b", b_secret, client_id_part="pk.a").connect()
        await asyncio.sleep(0.1)
        assert not a.closed.is_set()
        assert not b.closed.is_set()
    again = await signed(env, "pk", "a", a_secret).connect()
    await a.gone()
    assert not again.closed.is_set()


@pytest.mark.parametrize("change", ["disable", "rotate", "delete"])
async def test_credentials_changed_while_a_device_logs_in_close_that_connection(
    secure: Env, change: str
) -> None:
    """A login that read the device's credentials just before the operator disabled it, gave it a new secret
    or deleted it is closed once it completes, and what it sent at once (a version report in the same
    segment as its CONNECT) is not recorded."""
    env = secure
    secret = await register(env, "pk", "a")
    plugin = env.running.plugin
    read = plugin.device_login
    changed = asyncio.Event()

    async def change_after_reading(device: DeviceRef) -> tuple[str, bool] | None:
        found = await read(device)
        if not changed.is_set():  # the operator acts between this login's read and its CONNACK
            changed.set()
            ref = "/devices/pk/a"
            if change == "disable":
                await env.api("PATCH", ref, expect=200, json={"enabled": False})
            elif change == "rotate":
                await env.api("POST", f"{ref}/secret", expect=200)
            else:
                await env.api("DELETE", ref, expect=204)
        return found

    plugin.device_login = change_after_reading
    login = login_for(DeviceRef("pk", "a"), secret)
    report = json.dumps({"id": 1, "params": {"version": "9.9.9"}}).encode()
    async with RawClient.open(env.mqtt_port) as raw:
        await raw.send(
            raw_connect(login.client_id, username=login.username, password=login.password)
            + raw_publish("/ota/device/inform/pk/a", report, qos=1, packet_id=1)
        )
        assert await raw.closed(), "the connection that logged in with stale credentials stayed open"
    assert changed.is_set()
    found = await env.find("/devices/pk/a")
    assert found is None or found["modules"].get("default") != "9.9.9"


# ------------------------------------------------------------------------------- 6. application account


async def test_application_account(secure: Env, caplog: pytest.LogCaptureFixture) -> None:
    """The "dash" account logs in with its password, may watch device progress within its pattern only and
    publish only under /apps/dash/+; a wrong password is refused and logged with the account's name."""
    env = secure
    caplog.set_level(logging.WARNING, logger="ota.auth")
    d = await online(env, "pk", "d")
    dash = await peer(env, "apps", "dash", "dash-1", "dash", DASH_PASSWORD).connect()

    assert await dash.granted("/ota/device/progress/+/+") == 1
    assert await dash.granted("/ota/device/progress/#") == SUB_REFUSED
    assert await dash.granted("/ota/device/upgrade/+/+") == SUB_REFUSED
    assert await dash.granted("/apps/+") == 1

    await d.progress("42", "watched")
    [seen] = await dash.wait_messages("/ota/device/progress/pk/d")
    assert seen["params"]["step"] == "42"

    rejected = env.service.rejected["foreign_publish"]
    await dash.publish("/apps/other", {"x": 1})  # outside /apps/dash/+; dash would receive it via /apps/+
    await dash.publish("/ota/device/inform/pk/d", {"id": 1, "params": {"version": "6.6.6"}})
    await eventually(lambda: env.service.rejected["foreign_publish"] > rejected, what="dash's inform refused")
    await asyncio.sleep(0.2)
    assert dash.messages("/apps/other") == []
    assert (await env.find("/devices/pk/d"))["modules"] == {"default": "1.0.0"}

    caplog.clear()
    wrong = peer(env, "apps", "dash", "dash-2", "dash", "not-the-password")
    assert await wrong.attempt() == REFUSED
    [line] = refusals(caplog)
    assert "'dash'" in line and "bad account password" in line
    assert "not-the-password" not in line and DASH_PASSWORD not in line


# ------------------------------------------------------------------------------------ 7. progress flood


async def test_progress_flood_is_rate_limited(secure: Env, caplog: pytest.LogCaptureFixture) -> None:
    """50 quick progress reports: at most about burst + rate·t are accepted, one warning is logged, and another
    device's upgrade completes meanwhile."""
    env = secure
    caplog.set_level(logging.WARNING, logger="ota.service")
    f = await online(env, "pk", "flood")
    g = await online(env, "pk", "good")
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/flood", "pk/good"])
    await f.notices()
    await g.notices()
    limited = env.service.rejected["progress_rate_limited"]

    async def flood() -> float:
        start = time.monotonic()
        infos = [
            f.client.publish(
                f"/ota/device/progress/{f.pk}/{f.dn}",
                json.dumps({"id": i, "params": {"step": str(i), "desc": "flood"}}),
                qos=1,
            )
            for i in range(1, 51)
        ]
        await eventually(lambda: all(i.is_published() for i in infos), what="50 progress reports acked")
        return time.monotonic() - start

    async def upgrade() -> None:
        await g.progress("30", "downloading")
        await g.progress("100", "flashing")
        await g.inform("2.0.0")
        await env.task_state(job["id"], "pk/good", "succeeded")

    elapsed, _ = await asyncio.gather(flood(), upgrade())
    allowed = 5 + 1 * elapsed + 2  # burst + rate·t, and slack for handling after the last ack
    await eventually(
        lambda: env.service.rejected["progress_rate_limited"] - limited >= 50 - allowed,
        what=f"at most {allowed:.1f} of 50 progress reports accepted",
    )
    dropped = env.service.rejected["progress_rate_limited"] - limited
    assert dropped <= 50 - 5, "the burst itself must be accepted"
    warnings = [r.getMessage() for r in caplog.records if "progress_rate_limited" in r.getMessage()]
    assert len(warnings) == 1 and "pk/flood" in warnings[0], warnings
    assert (await env.tasks(job["id"]))["pk/flood"]["state"] == "in_progress"


# ------------------------------------------------------------------------------------------ 8. downloads


async def test_download_limits_and_slow_loris(secure: Env) -> None:
    """A second concurrent download by the same device gets 429; a client that never finishes its request
    head is disconnected after ~0.5 s; a normal download still works."""
    env = secure
    big = os.urandom(24 * 1024 * 1024)  # far more than the socket buffers: the first download stays open
    d = await online(env, "pk", "d")
    fw = await env.upload(big)
    await env.job(fw["id"], ["pk/d"])
    [notice] = await d.notices()
    url = notice["data"]["url"]

    async with env.http.get(url, ssl=env.tls.client_context()) as first:
        assert first.status == 200
        assert await first.content.read(65536)
        status, headers, body = await env.download(url)
        assert status == 429, status
        assert len(body) < 1000 and "Retry-After" in headers
        first.close()

    async def downloads_again() -> bool:
        status, _, body = await env.download(url)
        return status == 200 and body == big

    await eventually(downloads_again, what="a download once the first one is gone")

    host, port = env.running.https_address
    reader, writer = await asyncio.open_connection(host, port, ssl=env.tls.client_context())
    try:
        writer.write(b"GET /firmware/1 HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await writer.drain()
        start = time.monotonic()
        try:
            data = await asyncio.wait_for(reader.read(65536), 5)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        except TimeoutError:
            pytest.fail("a client that never completes its request head was not disconnected within 5 s")
        elapsed = time.monotonic() - start
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    assert data == b""
    assert elapsed < 0.5 + 2.0, elapsed

    status, headers, body = await env.download(url)
    assert status == 200 and body == big and headers["Content-Length"] == str(len(big))


# ---------------------------------------------------------------------------------------- 9. CSV import


async def test_csv_import(secure: Env) -> None:
    """A CSV import creates the new devices (answering their secrets), counts existing ones, names the bad and
    duplicate lines; an imported device logs in with its secret."""
    env = secure
    await register(env, "pk", "existing")
    csv_text = "\n".join(
        [
            "product_key,device_name,device_secret",  # 1: header
            "pk,new1",  # 2: a generated secret
            "pk,new2,own-secret-of-new2",  # 3: its own secret
            "pk,existing",  # 4: already registered
            "just-one-cell",  # 5: malformed
            "pk,new1",  # 6: duplicate
        ]
    )
    doc = await env.api(
        "POST",
        "/devices/import",
        expect=200,
        data=csv_text.encode(),
        headers={"Content-Type": "text/csv"},
    )
    created = {c["device_name"]: c for c in doc["created"]}
    assert set(created) == {"new1", "new2"}
    assert created["new2"]["device_secret"] == "own-secret-of-new2"
    assert created["new1"]["device_secret"] and created["new1"]["product_key"] == "pk"
    assert doc["existing"] == 1
    assert sorted(e["line"] for e in doc["errors"]) == [5, 6]
    assert all(e["message"] for e in doc["errors"])

    for dn in ("new1", "new2"):
        d = signed(env, "pk", dn, created[dn]["device_secret"])
        assert await d.attempt() == 0, dn
        assert await signed(env, "pk", dn, "a-wrong-secret", client_id_part=f"x{dn}").attempt() == REFUSED


async def test_a_slow_reader_gets_the_whole_firmware(secure: Env, caplog: pytest.LogCaptureFixture) -> None:
    """A device that reads its download slowly (a small receive window, a few KB at a time) for much longer
    than the request-head deadline gets every byte: the deadline for its next request starts once it has
    read the response, and only a client that stops reading altogether is cut off."""
    env = secure  # http_header_timeout_s = 0.5
    data = os.urandom(3 * 1024 * 1024)
    d = await online(env, "pk", "slow")
    fw = await env.upload(data)
    await env.job(fw["id"], ["pk/slow"])
    [notice] = await d.notices()
    url = notice["data"]["url"]
    host, port = env.running.https_address
    path = url.split(f":{port}", 1)[1] if f":{port}" in url else "/" + url.split("/", 3)[3]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect((host, port))
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=env.tls.client_context(), server_hostname="127.0.0.1"
    )
    received = bytearray()
    started = time.monotonic()
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        while len(received) < len(data) and time.monotonic() - started < 60:
            chunk = await asyncio.wait_for(reader.read(16384), 5)
            if not chunk:
                break
            received += chunk
            await asyncio.sleep(0.01)  # about 1.5 MB/s: several seconds, many head deadlines
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    assert time.monotonic() - started > 1.0  # the deadline (0.5 s) passed several times meanwhile
    assert bytes(received) == data
    assert not [r for r in caplog.records if "no complete request" in r.getMessage()]

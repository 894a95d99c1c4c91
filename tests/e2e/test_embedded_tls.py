"""Aliyun's C SDKs against the default listeners: their mbedtls offers TLS 1.2 with four static-RSA AES-CBC
suites and RSA signatures only, verifies against the generated `data/tls/ca.crt`, and their iotkit-embedded
v3 HTTP client takes everything between `://` and the first `/` as the host name."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from broker import app as broker_app
from broker.config import Loaded, prepare
from plugins.device_auth.signing import login_for
from plugins.ota.core.topics import DeviceRef
from tests.support import Device, Env, Tls, broker_config, eventually

SDK_SUITES = ("AES128-SHA256", "AES256-SHA256", "AES128-SHA", "AES256-SHA")
SDK_SIGALGS = "RSA+SHA256:RSA+SHA384:RSA+SHA512:RSA+SHA1"
FIRMWARE = bytes(range(256)) * 300  # spans several TLS records

Start = Callable[..., Awaitable[Env]]


def sdk_client(ca: Path) -> ssl.SSLContext:
    """What the C SDKs' mbedtls offers, as far as Python's ssl can say it (not the signature algorithms)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(":".join(SDK_SUITES))
    ctx.load_verify_locations(ca)
    return ctx


def iotkit_host(url: str) -> str:
    """The host name iotkit-embedded v3's HTTP client resolves: everything between `://` and the first `/`."""
    return url.split("://", 1)[1].split("/", 1)[0]


@pytest.fixture
async def start(tmp_path: Path, tls: Tls) -> AsyncIterator[Start]:
    """Start a broker with generated TLS material, MQTT/TLS on, device-secret logins; stopped at the end."""
    envs: list[Env] = []
    async with aiohttp.ClientSession() as http:

        async def starter(**ota: Any) -> Env:
            raw = broker_config(tmp_path / "data", None, auth_mode="device-secret", mqtts_bind="127.0.0.1:0")
            raw["plugins"]["plugins.ota.plugin.OtaPlugin"] |= ota
            config, _ = prepare(Loaded("test", raw), env={})
            env = Env(await broker_app.start(config), tls, http)
            envs.append(env)
            return env

        try:
            yield starter
        finally:
            for env in envs:
                for d in env.devices:
                    d.disconnect()
                await env.running.stop()


def ca_of(env: Env) -> Path:
    return Path(env.running.plugin.settings.data_dir) / "tls" / "ca.crt"


async def sdk_device(env: Env, name: str) -> Device:
    """A registered device logging in over MQTT/TLS as a C-SDK device does (securemode=2), version 1.0.0."""
    created = await env.api("POST", "/devices", expect=201, json={"product_key": "pk", "device_name": name})
    login = login_for(DeviceRef("pk", name), created["device_secret"], securemode=2)
    assert env.running.mqtts_address is not None
    d = Device(env.running.mqtts_address[1], "pk", name, client_id=login.client_id)
    env.devices.append(d)
    d.client.username_pw_set(login.username, login.password)
    d.client.tls_set_context(sdk_client(ca_of(env)))
    d.client.connect_async("127.0.0.1", env.running.mqtts_address[1], keepalive=30)
    d.client.loop_start()
    await eventually(d.client.is_connected, what=f"pk/{name} to connect over TLS")
    await d.inform("1.0.0")

    async def recorded() -> bool:
        found = await env.find(f"/devices/pk/{name}")
        return found is not None and found["modules"].get("default") == "1.0.0"

    await eventually(recorded, what=f"pk/{name} to be recorded")
    return d


async def notice_url(env: Env, d: Device) -> str:
    fw = await env.upload(FIRMWARE, version="2.0.0")
    await env.job(fw["id"], [d.ref])
    [notice] = await d.notices()
    url = str(notice["data"]["url"])
    assert len(url) <= 256
    return url


async def s_client(port: int, ca: Path) -> tuple[int, str]:
    """`openssl s_client` offering exactly the SDKs' protocol, suites and signature algorithms."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
        "-cipher", ":".join(SDK_SUITES), "-sigalgs", SDK_SIGALGS,
        "-CAfile", str(ca), "-verify_return_error", "-verify_ip", "127.0.0.1",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(20):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


def listener_ports(env: Env) -> dict[str, int]:
    assert env.running.mqtts_address is not None
    return {"mqtt/tls": env.running.mqtts_address[1], "https": env.running.https_address[1]}


async def test_sdk_client_logs_in_and_downloads_with_the_default_profile(start: Start) -> None:
    """Default listeners: an mbedtls-like client verifies data/tls/ca.crt, logs in signed, downloads the firmware."""
    env = await start()
    d = await sdk_device(env, "dev1")
    assert d.client.socket().cipher()[0] in SDK_SUITES
    url = await notice_url(env, d)
    async with env.http.get(url, ssl=sdk_client(ca_of(env))) as r:  # the client can agree on nothing else
        assert r.status == 200 and await r.read() == FIRMWARE


@pytest.mark.parametrize("listener", ["mqtt/tls", "https"])
async def test_openssl_with_exactly_the_sdk_offer_completes_a_verified_handshake(
    start: Start, listener: str
) -> None:
    """`openssl s_client -tls1_2 -cipher <the four> -sigalgs RSA+...` gets a suite and verifies the chain."""
    env = await start()
    code, out = await s_client(listener_ports(env)[listener], ca_of(env))
    assert code == 0, out
    assert "Verify return code: 0 (ok)" in out, out
    assert any(f"Cipher is {s}" in out for s in SDK_SUITES), out


@pytest.mark.parametrize("listener", ["mqtt/tls", "https"])
async def test_modern_profile_refuses_the_sdk_offer_and_logs_it(
    start: Start, listener: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With tls_profile modern the same client gets no session on either listener, and the refusal is logged."""
    env = await start(tls_profile="modern")
    port = listener_ports(env)[listener]
    with pytest.raises(
        (ssl.SSLError, ConnectionResetError)
    ):  # asyncio closes without sending the alert: a reset or an SSL error
        async with asyncio.timeout(10):
            await asyncio.open_connection("127.0.0.1", port, ssl=sdk_client(ca_of(env)))
    code, out = await s_client(port, ca_of(env))
    assert code != 0 and "Cipher is (NONE)" in out, out

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "tls handshake failed" in r.getMessage()]

    await eventually(lambda: len(refusals()) >= 2, what="the refusals to be logged")
    assert all("127.0.0.1:" in line and "no shared cipher" in line for line in refusals()), refusals()


async def test_url_without_port_is_what_iotkit_v3_resolves(start: Start) -> None:
    """public_url without a port: download URLs name none, and iotkit v3's host (up to the first /) resolves."""
    env = await start(public_url="https://127.0.0.1")
    d = await sdk_device(env, "dev1")
    url = await notice_url(env, d)
    assert urlsplit(url).port is None and url.startswith("https://127.0.0.1/firmware/")
    host = iotkit_host(url)
    assert socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)


async def test_public_url_naming_443_yields_urls_without_it(start: Start) -> None:
    """The default port is never named: public_url https://host:443 gives download URLs https://host/..."""
    env = await start(public_url="https://127.0.0.1:443")
    d = await sdk_device(env, "dev1")
    url = await notice_url(env, d)
    assert iotkit_host(url) == "127.0.0.1" and urlsplit(url).port is None


async def test_download_on_443_as_iotkit_v3_parses_it(start: Start) -> None:
    """Deployment as documented (HTTPS on 443, public_url without port): an iotkit-v3-parsed URL downloads."""
    try:
        env = await start(https_bind="127.0.0.1:443", public_url="https://127.0.0.1")
    except broker_app.StartError as e:
        pytest.skip(f"cannot bind 127.0.0.1:443 here: {e}")
    d = await sdk_device(env, "dev1")
    url = await notice_url(env, d)
    host = iotkit_host(url)
    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
    async with env.http.get(f"https://{host}{path}", ssl=sdk_client(ca_of(env))) as r:
        assert r.status == 200 and await r.read() == FIRMWARE

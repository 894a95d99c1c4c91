"""The HTTP hooks an external MQTT broker asks who may connect and which topics a client may use, tested
by their documented contracts (EMQX 5's HTTP authentication and authorization, mosquitto-go-auth's HTTP
backend in each of its parameter and response modes) against a real broker in device-secret mode: the
same devices, secrets, accounts and topic rules decide as on the embedded broker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plugins.device_auth.signing import login_for
from plugins.ota.core.topics import DeviceRef
from plugins.ota.settings import PLUGIN_KEY
from tests.e2e.test_security import DASH_PASSWORD, register, secure_broker
from tests.support import Env, Tls, broker_config, started

SECRET = "0123456789abcdef0123456789abcdef"


@pytest.fixture
async def env(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    async with secure_broker(tmp_path / "data", tls) as e:
        await register(e, "pk", "dev1", SECRET)
        await register(e, "pk", "dev2", SECRET)
        yield e


def base(env: Env, token: str | None = None) -> str:
    host, port = env.running.admin_address
    if token is None:
        token = (env.running.plugin.settings.data_dir / "broker-auth.token").read_text().strip()
    return f"http://{host}:{port}/broker-auth/{token}"


async def call(
    env: Env, path: str, fields: dict[str, Any], *, how: str = "json", token: str | None = None
) -> tuple[int, str, Any]:
    """The request a broker makes: a JSON body (EMQX's default, go-auth's json mode), a form body, or a
    GET with the fields in the query string. Status, body text, and the body as JSON when it is."""
    url = base(env, token) + path
    if how == "json":
        request = env.http.post(url, json=fields)
    elif how == "form":
        request = env.http.post(url, data={k: str(v) for k, v in fields.items()})
    else:
        request = env.http.get(url, params={k: str(v) for k, v in fields.items()})
    async with request as r:
        text = await r.text()
        doc = await r.json(content_type=None) if r.content_type == "application/json" else None
        return r.status, text, doc


def device_login(dn: str, secret: str = SECRET) -> dict[str, str]:
    example = login_for(DeviceRef("pk", dn), secret)
    return {"clientid": example.client_id, "username": example.username, "password": example.password}


# ------------------------------------------------------------------------------------ EMQX authn


@pytest.mark.parametrize("how", ["json", "form", "get"])
async def test_emqx_authn_allows_a_device_signature_and_an_account(env: Env, how: str) -> None:
    status, _, doc = await call(env, "/emqx/authn", device_login("dev1") | {"peerhost": "10.0.0.5"}, how=how)
    assert status == 200
    assert doc == {"result": "allow", "is_superuser": False}
    dash = {"clientid": "dash-1", "username": "dash", "password": DASH_PASSWORD}
    assert (await call(env, "/emqx/authn", dash, how=how))[2] == {"result": "allow", "is_superuser": False}


@pytest.mark.parametrize(
    "fields",
    [
        device_login("dev1", "f" * 32),  # wrong secret
        device_login("nobody"),  # not registered
        {"clientid": "x", "username": "dash", "password": "wrong"},  # an account's wrong password
        {"clientid": "x", "username": "someone", "password": "pw"},  # neither a device nor an account
        {"clientid": "x"},  # no credentials at all
    ],
)
async def test_emqx_authn_denies_what_the_embedded_broker_refuses(env: Env, fields: dict[str, str]) -> None:
    status, _, doc = await call(env, "/emqx/authn", fields)
    assert (status, doc) == (200, {"result": "deny", "is_superuser": False})


async def test_emqx_authn_follows_the_registry(env: Env) -> None:
    """A disabled device is denied from then on, an enabled one allowed again: no cache in between."""
    await env.api("PATCH", "/devices/pk/dev1", expect=200, json={"enabled": False})
    assert (await call(env, "/emqx/authn", device_login("dev1")))[2]["result"] == "deny"
    await env.api("PATCH", "/devices/pk/dev1", expect=200, json={"enabled": True})
    assert (await call(env, "/emqx/authn", device_login("dev1")))[2]["result"] == "allow"


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"clientid": {"a": 1}}', b"{}"],
)
async def test_emqx_authn_denies_a_malformed_request_and_says_why(
    env: Env, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A request the broker's body template got wrong is denied (EMQX would take another status as
    `ignore` and ask the next authenticator) and logged with the reason."""
    caplog.set_level(logging.WARNING, "ota.auth")
    headers = {"Content-Type": "application/json"}
    async with env.http.post(base(env) + "/emqx/authn", data=body, headers=headers) as r:
        assert r.status == 200
        assert await r.json() == {"result": "deny", "is_superuser": False}
    assert any("emqx authn request" in m and "check the broker's settings" in m for m in caplog.messages)


async def test_a_wrong_token_is_refused_before_anything_is_checked(env: Env) -> None:
    for path in ("/emqx/authn", "/emqx/authz", "/go-auth/json/user", "/go-auth/status/acl"):
        status, _, doc = await call(env, path, device_login("dev1"), token="wrong-token")
        assert status == 401, path
        assert "token" in doc["error"]
    # the admin token does not open them either, nor do they open the admin API
    async with env.http.post(base(env, "x") + "/emqx/authn", json=device_login("dev1")) as r:
        assert r.status == 401
    async with env.http.get(env.admin + "/devices") as r:
        assert r.status == 401


async def test_many_wrong_account_passwords_through_the_hook_are_throttled(env: Env) -> None:
    """The hook's logins share the embedded broker's throttle: a burst of wrong passwords ends in refusals
    without an argon2 check, and then the right password is refused too for a while."""
    wrong = {"clientid": "x", "username": "dash", "password": "nope", "peerhost": "10.1.1.1"}
    answers = await asyncio.gather(*(call(env, "/emqx/authn", wrong) for _ in range(12)))
    assert all(doc["result"] == "deny" for _, _, doc in answers)
    right = wrong | {"password": DASH_PASSWORD}
    assert (await call(env, "/emqx/authn", right))[2]["result"] == "deny"


# ------------------------------------------------------------------------------------ EMQX authz

ALLOWED = [
    ("publish", "/ota/device/inform/pk/dev1"),
    ("publish", "/ota/device/progress/pk/dev1"),
    ("subscribe", "/ota/device/upgrade/pk/dev1"),
    ("publish", "/sys/pk/dev1/thing/ota/firmware/get"),
]
DENIED = [
    ("publish", "/ota/device/inform/pk/dev2"),  # another device's topic
    ("publish", "/ota/device/upgrade/pk/dev1"),  # a server-to-device topic
    ("subscribe", "/ota/device/upgrade/pk/+"),  # every device's notices
    ("subscribe", "#"),
]


@pytest.mark.parametrize(("action", "topic"), ALLOWED)
async def test_emqx_authz_allows_a_device_its_own_topics(env: Env, action: str, topic: str) -> None:
    fields = {"clientid": "c", "username": "dev1&pk", "topic": topic, "action": action}
    assert (await call(env, "/emqx/authz", fields))[2] == {"result": "allow"}


@pytest.mark.parametrize(("action", "topic"), DENIED)
async def test_emqx_authz_denies_a_device_anything_else(env: Env, action: str, topic: str) -> None:
    fields = {"clientid": "c", "username": "dev1&pk", "topic": topic, "action": action}
    assert (await call(env, "/emqx/authz", fields))[2] == {"result": "deny"}


async def test_emqx_authz_follows_an_accounts_patterns(env: Env) -> None:
    def ask(action: str, topic: str) -> dict[str, str]:
        return {"clientid": "c", "username": "dash", "topic": topic, "action": action}

    assert (await call(env, "/emqx/authz", ask("subscribe", "/ota/device/progress/+/+")))[2][
        "result"
    ] == "allow"
    assert (await call(env, "/emqx/authz", ask("subscribe", "/ota/device/progress/#")))[2]["result"] == "deny"
    assert (await call(env, "/emqx/authz", ask("publish", "/apps/dash/x")))[2]["result"] == "allow"
    assert (await call(env, "/emqx/authz", ask("publish", "/apps/other/x")))[2]["result"] == "deny"


@pytest.mark.parametrize(
    "fields",
    [
        {"username": "dev1&pk", "topic": "t"},
        {"username": "dev1&pk", "action": "publish"},
        {"username": "dev1&pk", "topic": "/ota/device/inform/pk/dev1", "action": "all"},
    ],
)
async def test_emqx_authz_denies_a_request_without_topic_or_known_action(
    env: Env, fields: dict[str, str]
) -> None:
    assert (await call(env, "/emqx/authz", fields))[2] == {"result": "deny"}


# ------------------------------------------------------------------------------- mosquitto-go-auth


@pytest.mark.parametrize("params", ["json", "form"])
async def test_go_auth_user_in_each_response_mode(env: Env, params: str) -> None:
    good, bad = device_login("dev1"), device_login("dev1", "e" * 32)
    assert (await call(env, "/go-auth/status/user", good, how=params))[0] == 200
    assert (await call(env, "/go-auth/status/user", bad, how=params))[0] == 403
    status, text, _ = await call(env, "/go-auth/text/user", good, how=params)
    assert (status, text) == (200, "ok")
    status, text, _ = await call(env, "/go-auth/text/user", bad, how=params)
    assert status == 403 and text != "ok"
    assert (await call(env, "/go-auth/json/user", good, how=params))[2] == {"ok": True, "error": ""}
    status, _, doc = await call(env, "/go-auth/json/user", bad, how=params)
    assert status == 200 and doc["ok"] is False and doc["error"]


async def test_go_auth_has_no_superusers(env: Env) -> None:
    for username in ("dash", "dev1&pk"):
        assert (await call(env, "/go-auth/status/superuser", {"username": username}))[0] == 403
        assert (await call(env, "/go-auth/json/superuser", {"username": username}))[2]["ok"] is False


@pytest.mark.parametrize("params", ["json", "form"])
async def test_go_auth_acl_by_access_kind(env: Env, params: str) -> None:
    """acc 1 (a message delivered), 2 (a publish), 3 (both), 4 (a subscription), by the device's rules."""

    async def granted(topic: str, acc: int) -> bool:
        fields = {"username": "dev1&pk", "clientid": "c", "topic": topic, "acc": acc}
        status, _, doc = await call(env, "/go-auth/json/acl", fields, how=params)
        assert status == 200
        return bool(doc["ok"])

    assert await granted("/ota/device/upgrade/pk/dev1", 1)  # receives its notices
    assert not await granted("/ota/device/upgrade/pk/dev2", 1)
    assert await granted("/ota/device/inform/pk/dev1", 2)
    assert not await granted("/ota/device/upgrade/pk/dev1", 2)  # cannot forge its own notice
    assert await granted("/sys/pk/dev1/thing/x", 3)
    assert not await granted("/ota/device/upgrade/pk/dev1", 3)  # receive yes, publish no: not both
    assert await granted("/ota/device/upgrade/pk/dev1", 4)
    assert not await granted("#", 4)


@pytest.mark.parametrize("acc", ["0", "5", "read", ""])
async def test_go_auth_acl_denies_an_access_it_does_not_know(env: Env, acc: str) -> None:
    fields = {"username": "dev1&pk", "clientid": "c", "topic": "/ota/device/inform/pk/dev1", "acc": acc}
    assert (await call(env, "/go-auth/status/acl", fields))[0] == 403


async def test_go_auth_refuses_an_unknown_response_mode(env: Env) -> None:
    async with env.http.post(base(env) + "/go-auth/xml/user", json=device_login("dev1")) as r:
        assert r.status in (401, 404)


async def test_a_body_over_the_limit_is_denied(env: Env) -> None:
    big = device_login("dev1") | {"padding": "x" * 20_000}
    assert (await call(env, "/emqx/authn", big))[2]["result"] == "deny"
    assert (await call(env, "/go-auth/status/user", big))[0] == 403


async def test_in_open_mode_the_hooks_allow_everything(tmp_path: Path, tls: Tls) -> None:
    """As the embedded broker does in open mode (labs): any login, any topic."""
    async with started(broker_config(tmp_path / "data", tls), tls) as e:
        assert (await call(e, "/emqx/authn", {"clientid": "x", "username": "anyone"}))[2]["result"] == "allow"
        fields = {"username": "anyone", "topic": "#", "action": "subscribe"}
        assert (await call(e, "/emqx/authz", fields))[2]["result"] == "allow"


async def test_without_the_device_auth_plugin_there_are_no_hooks(tmp_path: Path, tls: Tls) -> None:
    config = broker_config(tmp_path / "data", tls)
    config["plugins"] = {PLUGIN_KEY: config["plugins"][PLUGIN_KEY]}
    async with started(config, tls) as e:
        host, port = e.running.admin_address
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"http://{host}:{port}/broker-auth/x/emqx/authn", json={}) as r,
        ):
            assert r.status in (401, 404)
        assert not (tmp_path / "data" / "broker-auth.token").exists()

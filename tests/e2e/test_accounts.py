"""Operator accounts end to end: roles enforced on every route of the API, API tokens that stop working the
moment they are revoked (or their account is disabled), the console's password sign-in with its cookie
rules, and an audit log entry for every change, made or refused (a real broker on 127.0.0.1:0)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from typing import Any

import aiohttp
from aiohttp import web
from typer.testing import CliRunner

from broker.cli import cli
from plugins.ota.core.accounts import Role
from plugins.ota.http import admin
from tests.support import TOKEN, Env, reporting

FIRMWARE = os.urandom(5_000)
PASSWORD = "correct horse battery"
FILL = {"pk": "pk", "dn": "nodev", "id": "999999", "name": "nobody", "asset": "app.js"}


async def call(env: Env, method: str, path: str, token: str | None, **kwargs: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    base = env.admin.removesuffix("/api/v1")
    async with env.http.request(method, base + path, headers=headers, **kwargs) as r:
        body = await r.read()
        try:
            return r.status, await r.json(content_type=None) if body else None
        except ValueError:
            return r.status, body


async def account_with_token(env: Env, name: str, role: str, password: str | None = None) -> str:
    body: dict[str, Any] = {"name": name, "role": role} | ({"password": password} if password else {})
    await env.api("POST", "/accounts", expect=201, json=body)
    issued = await env.api("POST", f"/accounts/{name}/tokens", expect=201, json={"label": "tests"})
    assert issued["token"].startswith("ota_") and issued["account"] == name
    return str(issued["token"])


def every_route() -> list[tuple[str, str, Any]]:
    app = web.Application()
    admin._add_routes(app.router)
    routes = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource is not None else ""
        routes.append(
            (route.method, re.sub(r"\{(\w+)(:[^}]*)?\}", lambda m: FILL[m.group(1)], path), route.handler)
        )
    return routes


async def test_every_route_asks_for_its_role(env: Env) -> None:
    """A viewer reads; an operator also runs firmware and jobs; an admin does everything: every route of the
    API answers 403 to a role below the one it needs, and does not to a role that has it."""
    tokens = {role: await account_with_token(env, f"an-{role.value}", role.value) for role in Role}
    routes = every_route()
    assert len(routes) > 40
    checked = 0
    for method, path, handler in routes:
        if handler in admin._PUBLIC:
            continue
        needed = admin.needed_role(
            handler, changes=method not in admin._READS and handler not in admin._NOT_CHANGES
        )
        for role, token in tokens.items():
            body = {} if method in ("POST", "PATCH") else None
            status, answer = await call(env, method, path, token, json=body)
            if role.allows(needed):
                assert status not in (401, 403), (method, path, role, status, answer)
            else:
                assert status == 403, (method, path, role, status, answer)
                assert f"needs the {needed.value} role" in answer["message"]
            checked += 1
    assert checked > 100
    # the viewer could not write anything: no device, firmware, job or account came of it
    assert await env.api("GET", "/devices", expect=200) == []
    assert await env.api("GET", "/jobs", expect=200) == []


async def test_a_revoked_token_or_a_disabled_account_stops_at_once(env: Env) -> None:
    token = await account_with_token(env, "ann", "operator")
    assert (await call(env, "GET", "/api/v1/whoami", token)) == (200, {"name": "ann", "role": "operator"})
    await env.api("PATCH", "/accounts/ann", expect=200, json={"role": "viewer"})  # a role change: at once
    assert (await call(env, "POST", "/api/v1/jobs", token, json={}))[0] == 403
    await env.api("PATCH", "/accounts/ann", expect=200, json={"disabled": True})
    assert (await call(env, "GET", "/api/v1/whoami", token))[0] == 401
    await env.api("PATCH", "/accounts/ann", expect=200, json={"disabled": False})
    assert (await call(env, "GET", "/api/v1/whoami", token))[0] == 200
    [listed] = await env.api("GET", "/accounts/ann/tokens", expect=200)
    await env.api("DELETE", f"/accounts/ann/tokens/{listed['id']}", expect=200)
    assert (await call(env, "GET", "/api/v1/whoami", token))[0] == 401  # the very next request
    shown = await env.api("GET", "/accounts/ann", expect=200)
    assert shown["tokens"][0]["revoked_at"] is not None and "token" not in shown["tokens"][0]
    await env.api("DELETE", "/accounts/ann", expect=204)
    assert (await call(env, "GET", "/api/v1/whoami", "ota_" + "x" * 43))[0] == 401
    # the bootstrap admin token keeps working, as the admin
    assert (await call(env, "GET", "/api/v1/whoami", TOKEN)) == (
        200,
        {"name": "admin-token", "role": "admin"},
    )
    # bad input is named
    for body, field in (
        ({"name": "Bad Name", "role": "viewer"}, "name"),
        ({"name": "admin-token", "role": "admin"}, "name"),
        ({"name": "zed", "role": "root"}, "role"),
        ({"name": "zed", "role": "viewer", "password": "short"}, "password"),
    ):
        answer = await env.api("POST", "/accounts", expect=422, json=body)
        assert answer["message"].startswith(f"{field}: "), answer
    await env.api("POST", "/accounts", expect=201, json={"name": "zed", "role": "viewer"})
    assert (await env.api("POST", "/accounts", expect=409, json={"name": "zed", "role": "viewer"}))["error"]


async def test_the_console_signs_in_with_a_password_and_a_cookie_alone_changes_nothing(env: Env) -> None:
    await env.api(
        "POST", "/accounts", expect=201, json={"name": "op", "role": "operator", "password": PASSWORD}
    )
    base = env.admin
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:  # an IP host
        async with browser.post(base + "/session", json={"name": "op", "password": "wrong password!"}) as r:
            assert r.status == 401
        async with browser.post(base + "/session", json={"name": "op", "password": PASSWORD}) as r:
            assert r.status == 200 and await r.json() == {"name": "op", "role": "operator"}
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "ota_session=" in cookie
        async with browser.get(base + "/whoami") as r:
            assert r.status == 200 and (await r.json())["name"] == "op"
        fw = await env.upload(FIRMWARE, version="2.0.0")
        # a change with the cookie alone (what a page of another site could make a browser send): refused
        async with browser.delete(base + f"/firmware/{fw['id']}") as r:
            assert r.status == 403 and "X-Requested-With" in (await r.json())["message"]
        async with browser.delete(
            base + f"/firmware/{fw['id']}", headers={"X-Requested-With": "ota-console"}
        ) as r:
            assert r.status == 204
        kept = {c.key: c.value for c in browser.cookie_jar}["ota_session"]  # a copy taken before signing out
        async with browser.delete(base + "/session") as r:
            assert r.status == 204
        async with browser.get(base + "/whoami") as r:
            assert r.status == 401
        browser.cookie_jar.update_cookies({"ota_session": kept})  # signing out ended it in the broker too
        async with browser.get(base + "/whoami") as r:
            assert r.status == 401
        # a new password ends the sessions made with the old one
        async with browser.post(base + "/session", json={"name": "op", "password": PASSWORD}) as r:
            assert r.status == 200
        await env.api("PATCH", "/accounts/op", expect=200, json={"password": PASSWORD + " 2"})
        async with browser.get(base + "/whoami") as r:
            assert r.status == 401
        # a forged cookie does not sign anyone in
        browser.cookie_jar.update_cookies({"ota_session": "b3B8OTk5OTk5OTk5OQ==.AAAA"})
        async with browser.get(base + "/whoami") as r:
            assert r.status == 401
        # a disabled account cannot sign in
        await env.api("PATCH", "/accounts/op", expect=200, json={"disabled": True})
        async with browser.post(base + "/session", json={"name": "op", "password": PASSWORD}) as r:
            assert r.status == 401
        # a guesser is held off: after a few wrong passwords the account is refused without a check
        answers = []
        for _ in range(7):
            async with browser.post(base + "/session", json={"name": "op", "password": "guess guess 1"}) as r:
                answers.append(r.status)
        assert answers[-1] == 429 and 401 in answers, answers


async def test_every_change_is_in_the_audit_log_with_who_what_and_from_where(env: Env) -> None:
    admin_token = await account_with_token(env, "root", "admin")
    viewer = await account_with_token(env, "watcher", "viewer")
    await reporting(env, "dev1")
    assert (
        await call(
            env, "POST", "/api/v1/devices", admin_token, json={"product_key": "pk", "device_name": "d2"}
        )
    )[0] == 201
    form = aiohttp.FormData()
    form.add_field("file", FIRMWARE, filename="fw.bin")
    form.add_field("product_key", "pk")
    form.add_field("version", "2.0.0")
    status, fw = await call(env, "POST", "/api/v1/firmware", admin_token, data=form)
    assert status == 201
    status, job = await call(
        env, "POST", "/api/v1/jobs", admin_token, json={"firmware_id": fw["id"], "devices": ["pk/dev1"]}
    )
    assert status == 201
    assert (await call(env, "POST", f"/api/v1/jobs/{job['id']}/cancel", admin_token, json={}))[0] == 200
    assert (await call(env, "POST", "/api/v1/jobs", viewer, json={"firmware_id": fw["id"]}))[0] == 403
    assert (await call(env, "POST", "/api/v1/jobs/preview", viewer, json={"firmware_id": fw["id"]}))[0] == 200
    assert (await call(env, "PATCH", "/api/v1/devices/pk/d2", admin_token, json={"enabled": False}))[0] == 200
    status, shown = await call(env, "GET", "/api/v1/devices/pk/d2/secret", admin_token)
    assert status == 200 and len(shown["device_secret"]) >= 16
    assert (await call(env, "DELETE", "/api/v1/devices/pk/d2", admin_token))[0] == 204

    entries = await env.api("GET", "/audit?limit=100", expect=200)
    seen = [(e["actor"], e["action"], e["target"], e["status"]) for e in reversed(entries)]
    mine = [s for s in seen if s[0] in ("root", "watcher")]
    assert mine == [
        ("root", "POST /api/v1/devices", "/api/v1/devices -> pk/d2", 201),
        ("root", "POST /api/v1/firmware", f"/api/v1/firmware -> id {fw['id']}", 201),
        ("root", "POST /api/v1/jobs", f"/api/v1/jobs -> id {job['id']}", 201),
        ("root", "POST /api/v1/jobs/{id}/cancel", f"/api/v1/jobs/{job['id']}/cancel", 200),
        ("watcher", "POST /api/v1/jobs", "/api/v1/jobs", 403),  # refused, and recorded
        ("root", "PATCH /api/v1/devices/{pk}/{dn}", "/api/v1/devices/pk/d2", 200),
        (
            "root",
            "GET /api/v1/devices/{pk}/{dn}/secret",
            "/api/v1/devices/pk/d2/secret",
            200,
        ),  # a read, audited
        ("root", "DELETE /api/v1/devices/{pk}/{dn}", "/api/v1/devices/pk/d2", 204),
    ], seen
    # the accounts made by the bootstrap token are in it too, and no read, preview or secret ever is
    assert ("admin-token", "POST /api/v1/accounts", "/api/v1/accounts -> name root", 201) in seen
    assert (
        "admin-token",
        "POST /api/v1/accounts/{name}/tokens",
        "/api/v1/accounts/root/tokens -> id 1",
        201,
    ) in seen
    assert not [s for s in seen if "preview" in s[1] or (s[1].startswith("GET") and "secret" not in s[1])]
    assert all(e["remote"] == "127.0.0.1" and e["at"] for e in entries)
    assert "ota_" not in str(entries)
    # only an admin reads it
    assert (await call(env, "GET", "/api/v1/audit", viewer))[0] == 403


async def test_the_cli_manages_accounts_tokens_and_reads_the_audit_log(env: Env) -> None:
    host, port = env.running.admin_address

    async def run(*args: str, token: str = TOKEN, given: str | None = None) -> Any:
        where = ["--admin-url", f"http://{host}:{port}", "--token", token]
        return await asyncio.to_thread(CliRunner().invoke, cli, [*args, *where], input=given)

    added = await run(
        "account", "add", "ops", "--role", "operator", "--password", given=f"{PASSWORD}\n{PASSWORD}\n"
    )
    assert added.exit_code == 0 and "account ops (operator) added" in added.output, added.output
    issued = await run("account", "token", "ops", "--label", "ci")
    found = re.search(r"token (\d+) of ops: (ota_\S+)", issued.output)
    assert issued.exit_code == 0 and found, issued.output
    ops_token = found.group(2)
    listed = await run("account", "list")
    assert re.search(r"ops .*operator .*yes", listed.output), listed.output
    refused = await run("account", "list", token=ops_token)  # an operator is not an admin
    assert refused.exit_code != 0 and "needs the admin role" in refused.output + str(
        refused.stderr_bytes or b""
    )
    audit = await run("account", "audit", "--json")
    assert audit.exit_code == 0
    assert {"POST /api/v1/accounts", "POST /api/v1/accounts/{name}/tokens"} <= {
        e["action"] for e in json.loads(audit.stdout)
    }
    revoked = await run("account", "revoke", "ops", found.group(1))
    assert revoked.exit_code == 0 and f"token {found.group(1)} of ops revoked" in revoked.output
    assert (await call(env, "GET", "/api/v1/whoami", ops_token))[0] == 401
    disabled = await run("account", "set", "ops", "--disable")
    assert disabled.exit_code == 0 and "disabled" in disabled.output
    nothing = await run("account", "set", "ops")
    assert nothing.exit_code != 0 and "nothing to change" in nothing.output

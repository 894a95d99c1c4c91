"""`/api/v1/accounts`, `/api/v1/audit`, `/api/v1/session`, `/api/v1/whoami`: operator accounts and their API
tokens, the audit log, and the console's sign-in with a password.

A browser signs in with `POST /session` and gets a cookie (`ota_session`: HttpOnly, SameSite=Strict,
Secure over HTTPS) holding the account's name and an expiry, signed with a key derived from the admin
token; each request checks that the account is still enabled and takes its role as it is now. A request
authenticated by that cookie that changes anything must also carry `X-Requested-With: ota-console`, a
header a page of another site cannot send without this API's consent (which it never gives): the cookie
alone never makes a change.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from aiohttp import web

from plugins.device_auth.throttle import LoginThrottle
from plugins.ota.core.accounts import Account, ApiToken, AuditEntry, Principal, account_name, role_of
from plugins.ota.core.errors import InvalidInput
from plugins.ota.http.inputs import int_path, json_object, ota_app, page_of, paged
from plugins.ota.http.views import iso

COOKIE = "ota_session"
SESSION_S = 12 * 3600
CSRF_HEADER = "X-Requested-With"
CSRF_VALUE = "ota-console"
PRINCIPAL = web.RequestKey("principal", Principal)
SESSION_KEY = web.AppKey("session_key", bytes)
THROTTLE = web.AppKey("sign_in_throttle", LoginThrottle)  # wrong passwords: fail2ban-style, as MQTT logins


def session_key(admin_token: str) -> bytes:
    return hashlib.sha256(b"ota-broker session\0" + admin_token.encode()).digest()


def session_cookie(key: bytes, name: str, epoch: int, now: float) -> str:
    body = f"{name}|{epoch}|{int(now + SESSION_S)}"
    mac = hmac.new(key, body.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(body.encode()).decode() + "." + base64.urlsafe_b64encode(mac).decode()


def session_of(key: bytes, cookie: str, now: float) -> tuple[str, int] | None:
    """The account a session cookie names and its session number, if its signature holds and it has not
    expired."""
    try:
        body_b64, mac_b64 = cookie.split(".", 1)
        body = base64.urlsafe_b64decode(body_b64.encode())
        mac = base64.urlsafe_b64decode(mac_b64.encode())
    except (ValueError, TypeError):
        return None
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        return None
    name, _, rest = body.decode(errors="replace").partition("|")
    epoch, _, expiry = rest.partition("|")
    if not epoch.isdigit() or not expiry.isdigit() or int(expiry) < now:
        return None
    return name, int(epoch)


def account_view(a: Account) -> dict[str, Any]:
    return {
        "name": a.name,
        "role": a.role.value,
        "disabled": a.disabled,
        "has_password": a.has_password,
        "created_at": iso(a.created_at),
    }


def token_view(t: ApiToken) -> dict[str, Any]:
    return {
        "id": t.id,
        "account": t.account,
        "label": t.label,
        "created_at": iso(t.created_at),
        "revoked_at": None if t.revoked_at is None else iso(t.revoked_at),
    }


def audit_view(e: AuditEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": iso(e.at),
        "actor": e.actor,
        "role": e.role,
        "action": e.action,
        "target": e.target,
        "status": e.status,
        "remote": e.remote,
    }


def _password(body: dict[str, Any]) -> str | None:
    password = body.get("password")
    if password is not None and (not isinstance(password, str) or len(password) > 1024):
        raise InvalidInput("password", "must be a string of at most 1024 characters")
    return password


async def list_accounts(request: web.Request) -> web.Response:
    page = page_of(request)
    listed = await ota_app(request).accounts.all()
    shown = listed[page.offset : page.offset + page.limit]
    return paged(request, page, [account_view(a) for a in shown], len(listed))


async def add_account(request: web.Request) -> web.Response:
    body = await json_object(request)
    account = await ota_app(request).accounts.add(
        account_name(body.get("name")), role_of(body.get("role", "viewer")), _password(body)
    )
    return web.json_response(account_view(account), status=201)


async def show_account(request: web.Request) -> web.Response:
    name = account_name(request.match_info["name"])
    service = ota_app(request)
    account = await service.accounts.get(name)
    tokens = await service.accounts.tokens(name)
    return web.json_response(account_view(account) | {"tokens": [token_view(t) for t in tokens]})


async def update_account(request: web.Request) -> web.Response:
    name = account_name(request.match_info["name"])
    body = await json_object(request)
    disabled = body.get("disabled")
    if disabled is not None and not isinstance(disabled, bool):
        raise InvalidInput("disabled", "must be true or false")
    role = None if body.get("role") is None else role_of(body["role"])
    account = await ota_app(request).accounts.update(
        name, role=role, password=_password(body), disabled=disabled
    )
    return web.json_response(account_view(account))


async def delete_account(request: web.Request) -> web.Response:
    await ota_app(request).accounts.delete(account_name(request.match_info["name"]))
    return web.Response(status=204)


async def issue_token(request: web.Request) -> web.Response:
    name = account_name(request.match_info["name"])
    body = await json_object(request) if request.can_read_body else {}
    label = body.get("label", "")
    if not isinstance(label, str) or len(label) > 128:
        raise InvalidInput("label", "must be a string of at most 128 characters")
    record, token = await ota_app(request).accounts.issue_token(name, label)
    return web.json_response(token_view(record) | {"token": token}, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    page = page_of(request)
    tokens = await ota_app(request).accounts.tokens(account_name(request.match_info["name"]))
    shown = tokens[page.offset : page.offset + page.limit]
    return paged(request, page, [token_view(t) for t in shown], len(tokens))


async def revoke_token(request: web.Request) -> web.Response:
    name = account_name(request.match_info["name"])
    token_id = int_path(request, "id")
    return web.json_response(token_view(await ota_app(request).accounts.revoke(name, token_id)))


async def audit_log(request: web.Request) -> web.Response:
    page = page_of(request)
    entries, total = await ota_app(request).accounts.audit_page(page.limit, page.offset)
    return paged(request, page, [audit_view(e) for e in entries], total)


async def whoami(request: web.Request) -> web.Response:
    who = request[PRINCIPAL]
    return web.json_response({"name": who.name, "role": who.role.value})


async def sign_in(request: web.Request) -> web.Response:
    body = await json_object(request)
    name, password = body.get("name"), body.get("password")
    if not isinstance(name, str) or not isinstance(password, str) or len(password) > 1024:
        raise InvalidInput("name", "name and password are both needed")
    throttle, address, now = request.app[THROTTLE], request.remote or "", time.monotonic()
    if throttle.refused(address, name, now):
        return web.json_response(
            {"error": "too_many_requests", "message": "too many wrong passwords: wait, then try again"},
            status=429,
        )
    who = await ota_app(request).accounts.sign_in(name, password)
    if who is None:
        throttle.failed(address, name, now)
        return web.json_response(
            {"error": "unauthorized", "message": "wrong name or password, or the account is disabled"},
            status=401,
        )
    throttle.succeeded(name)
    epoch = await ota_app(request).accounts.session_epoch(who.name) or 0
    response = web.json_response({"name": who.name, "role": who.role.value})
    response.set_cookie(
        COOKIE,
        session_cookie(request.app[SESSION_KEY], who.name, epoch, time.time()),
        max_age=SESSION_S,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def sign_out(request: web.Request) -> web.Response:
    """The session cookie is cleared, and the account's browser sessions end (a copy of the cookie kept
    elsewhere stops working too)."""
    cookie = request.cookies.get(COOKIE)
    session = session_of(request.app[SESSION_KEY], cookie, time.time()) if cookie else None
    if session is not None and await ota_app(request).accounts.by_session(*session) is not None:
        await ota_app(request).accounts.end_sessions(session[0])
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/")
    return response

"""HTTP endpoints an external MQTT broker calls to ask `Gate` who may connect and which topics each client
may use: EMQX's HTTP authentication and HTTP authorization, and mosquitto-go-auth's HTTP backend. Devices
keep logging in with Aliyun's signatures and stay inside their own topics, as on the embedded broker.

All of them live under `/broker-auth/<token>/`, where the token is the content of
`<data_dir>/broker-auth.token` (neither EMQX nor go-auth needs another header for it: mosquitto-go-auth
cannot send one). A wrong token gets 401; the broker's request is read from a JSON body, a form body or
the query string, whichever it sends.

- EMQX 5: `POST .../emqx/authn` with `clientid`, `username`, `password` (and `peerhost`) answers 200 with
  `{"result": "allow" | "deny", "is_superuser": false}`; `POST .../emqx/authz` with `username`, `topic` and
  `action` (`publish` or `subscribe`) answers `{"result": "allow" | "deny"}`. A request that lacks a
  field is denied, with a warning that names it (the body template is wrong): EMQX would take any other
  status as "ignore" and could let the next authenticator decide.
- mosquitto-go-auth: `.../go-auth/<mode>/user` (`username`, `password`, `clientid`), `.../superuser`
  (nobody is: every client's topics are checked) and `.../acl` (`username`, `clientid`, `topic`, `acc`:
  1 receive, 2 publish, 3 both, 4 subscribe), where `<mode>` is go-auth's `http_response_mode`: `status`
  (200 granted, 403 denied), `text` (the body `ok`, or 403) or `json` (`{"ok": bool, "error": ...}`).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from plugins.device_auth.gate import Access, Gate, Login

log = logging.getLogger("ota.auth")

PREFIX = "/broker-auth/{token}"
MAX_BODY = 16 * 1024  # a broker's auth request is a few fields
GATE: web.AppKey[Gate] = web.AppKey("broker_auth_gate", Gate)
TOKEN: web.AppKey[str] = web.AppKey("broker_auth_token", str)
EMQX_ACTIONS = {"publish": Access.PUBLISH, "subscribe": Access.SUBSCRIBE}
GO_AUTH_ACC = {
    1: (Access.RECEIVE,),
    2: (Access.PUBLISH,),
    3: (Access.RECEIVE, Access.PUBLISH),
    4: (Access.SUBSCRIBE,),
}
GO_AUTH_MODES = ("status", "text", "json")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ValueError):
    """A field the broker should have sent is missing or not understood."""


async def _params(request: web.Request) -> dict[str, Any]:
    """The fields of the broker's request: its JSON or form body (by content type), over the query string."""
    fields: dict[str, Any] = dict(request.query)
    if request.method == "GET" or not request.can_read_body:
        return fields
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise BadRequest(f"a body of {request.content_length} bytes (at most {MAX_BODY})")
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise BadRequest(f"a body over {MAX_BODY} bytes")
    if request.content_type == "application/x-www-form-urlencoded":
        try:
            fields |= dict(parse_qsl(raw.decode(), keep_blank_values=True))
        except UnicodeDecodeError as e:
            raise BadRequest("a form body that is not UTF-8") from e
        return fields
    try:
        doc = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"a body that is not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BadRequest("a JSON body that is not an object")
    return fields | doc


def _text(fields: Mapping[str, Any], name: str, *, required: bool = True) -> str | None:
    value = fields.get(name)
    if value is None:
        if required:
            raise BadRequest(f"no {name!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadRequest(f"{name!r} is not a string")
    return str(value)


def _login(fields: Mapping[str, Any], address: str) -> Login:
    return Login(
        _text(fields, "clientid") or "",
        _text(fields, "username", required=False),
        _text(fields, "password", required=False),
        address,
    )


def _authorized(request: web.Request) -> bool:
    return hmac.compare_digest(request.match_info.get("token", "").encode(), request.app[TOKEN].encode())


Decide = Callable[[web.Request, dict[str, Any]], Awaitable[bool]]
Answer = Callable[[web.Request, bool, str], web.StreamResponse]


def _hook(kind: str, answer: Answer, refusal: str) -> Callable[[Decide], Handler]:
    """A handler of one contract: the token checked, the request's fields read, the decision given in the
    contract's `answer` (`refusal` says why a "no" is one); a bad request is logged and refused."""

    def wrap(decide: Decide) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            if not _authorized(request):
                return web.json_response({"error": "unauthorized: wrong broker-auth token"}, status=401)
            try:
                allowed = await decide(request, await _params(request))
            except BadRequest as e:
                log.warning(
                    "%s request from %s refused: %s (check the broker's settings)", kind, request.remote, e
                )
                return answer(request, False, str(e))
            return answer(request, allowed, "" if allowed else refusal)

        handler.__name__ = decide.__name__
        return handler

    return wrap


def _emqx_authn(_request: web.Request, allowed: bool, _why: str) -> web.StreamResponse:
    return web.json_response({"result": "allow" if allowed else "deny", "is_superuser": False})


def _emqx_authz(_request: web.Request, allowed: bool, _why: str) -> web.StreamResponse:
    return web.json_response({"result": "allow" if allowed else "deny"})


def _go_auth(request: web.Request, granted: bool, why: str) -> web.StreamResponse:
    """In go-auth's `http_response_mode`, the path's `<mode>`."""
    mode = request.match_info.get("mode", "status")
    if mode == "json":
        return web.json_response({"ok": granted, "error": "" if granted else why or "denied"})
    if granted:
        return web.Response(text="ok")
    return web.Response(status=403, text=why or "denied")


# ----------------------------------------------------------------------------------------- EMQX


@_hook("emqx authn", _emqx_authn, "not authorized")
async def emqx_authn(request: web.Request, fields: dict[str, Any]) -> bool:
    return await request.app[GATE].login(_login(fields, _text(fields, "peerhost", required=False) or ""))


@_hook("emqx authz", _emqx_authz, "outside the client's topics")
async def emqx_authz(request: web.Request, fields: dict[str, Any]) -> bool:
    topic = _text(fields, "topic") or ""
    action = (_text(fields, "action") or "").lower()
    access = EMQX_ACTIONS.get(action)
    if access is None:
        raise BadRequest(f"action {action!r} (publish or subscribe)")
    return request.app[GATE].may(_text(fields, "username", required=False), topic, access)


# ----------------------------------------------------------------------------- mosquitto-go-auth


@_hook("go-auth user", _go_auth, "not authorized")
async def go_auth_user(request: web.Request, fields: dict[str, Any]) -> bool:
    login = _login(fields, request.remote or "")  # go-auth does not say where the client connects from
    return await request.app[GATE].login(login)


@_hook("go-auth superuser", _go_auth, "no superusers: every client's topics are checked")
async def go_auth_superuser(request: web.Request, fields: dict[str, Any]) -> bool:
    return False


@_hook("go-auth acl", _go_auth, "outside the client's topics")
async def go_auth_acl(request: web.Request, fields: dict[str, Any]) -> bool:
    topic = _text(fields, "topic") or ""
    acc = _text(fields, "acc") or ""
    accesses = GO_AUTH_ACC.get(int(acc)) if acc.isdigit() else None
    if accesses is None:
        raise BadRequest(f"acc {acc!r} (1 read, 2 write, 3 both, 4 subscribe)")
    gate, username = request.app[GATE], _text(fields, "username", required=False)
    return all(gate.may(username, topic, access) for access in accesses)


HANDLERS: tuple[Handler, ...] = (emqx_authn, emqx_authz, go_auth_user, go_auth_superuser, go_auth_acl)


def install(app: web.Application, gate: Gate, token: str) -> tuple[Handler, ...]:
    """Add the endpoints to `app` (they check their own token); the handlers, for the app's own auth to
    let through."""
    app[GATE] = gate
    app[TOKEN] = token
    r = app.router
    for method in ("POST", "GET"):
        r.add_route(method, f"{PREFIX}/emqx/authn", emqx_authn)
        r.add_route(method, f"{PREFIX}/emqx/authz", emqx_authz)
    modes = "{mode:" + "|".join(GO_AUTH_MODES) + "}"
    for method in ("POST", "GET", "PUT"):
        r.add_route(method, f"{PREFIX}/go-auth/{modes}/user", go_auth_user)
        r.add_route(method, f"{PREFIX}/go-auth/{modes}/superuser", go_auth_superuser)
        r.add_route(method, f"{PREFIX}/go-auth/{modes}/acl", go_auth_acl)
    return HANDLERS

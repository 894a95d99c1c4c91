"""The management REST API on aiohttp: `/api/v1`, JSON, bearer token; the console; Prometheus' `/metrics`.

This module builds the aiohttp application: its two middlewares (errors, plugins.ota.http.errors, and
the bearer-token check) and its one route table. The handlers live by resource beside it (`devices`,
`firmware`, `jobs`, `events`, `overview`, `health`, `console`) and talk to the app layer only; input is
validated there and answered with a 4xx naming the field.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from plugins.device_auth import hooks
from plugins.device_auth.gate import Gate
from plugins.device_auth.throttle import LoginThrottle
from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core.accounts import BOOTSTRAP, AuditEntry, Principal, Role
from plugins.ota.core.errors import OtaError
from plugins.ota.http import accounts, console, devices, events, firmware, health, jobs, overview
from plugins.ota.http.errors import Handler, error_response, errors, status_of
from plugins.ota.http.inputs import SERVICE
from plugins.ota.http.openapi import OPENAPI
from plugins.ota.metrics import OtaMetrics

log = logging.getLogger("ota.admin")


def admin_app(
    service: OtaApp,
    token: str,
    *,
    metrics: OtaMetrics | None = None,
    metrics_token: str | None = None,
    broker_auth: tuple[Gate, str] | None = None,
) -> web.Application:
    """The API under /api/v1, the console, and (given `metrics`) Prometheus' `GET /metrics`, which takes
    the admin token or the read-only `metrics_token`."""
    expected = f"Bearer {token}".encode()
    metrics_expected = f"Bearer {metrics_token}".encode() if metrics_token else None
    tickets = events.Tickets(token)
    key = accounts.session_key(token)

    async def principal(request: web.Request, matched: Any) -> tuple[Principal | None, bool]:
        """Who the request is from, and whether only its session cookie says so."""
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), expected):
            return Principal(BOOTSTRAP, Role.ADMIN), False
        if given.startswith("Bearer "):
            return await service.accounts.by_token(given[7:].strip()), False
        if matched is events.job_events and tickets.valid(
            request.query.get("ticket", ""), events.clock(request)
        ):
            return Principal("event-ticket", Role.VIEWER), False
        cookie = request.cookies.get(accounts.COOKIE)
        if cookie:
            session = accounts.session_of(key, cookie, time.time())
            if session is not None:
                return await service.accounts.by_session(*session), True
        return None, False

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Decided by the route matched, not by the path text: only these handlers are public.
        matched = request.match_info.handler
        if matched in _PUBLIC or matched in own_token:
            return await handler(request)
        if (
            matched is health.prometheus_metrics
            and metrics_expected is not None
            and hmac.compare_digest(request.headers.get("Authorization", "").encode(), metrics_expected)
        ):
            return await handler(request)
        who, by_cookie = await principal(request, matched)
        if who is None:
            return error_response(401, "unauthorized", "missing or wrong bearer token, or no session")
        request[accounts.PRINCIPAL] = who
        return await _guarded(service, request, handler, who, by_cookie=by_cookie)

    app = web.Application(middlewares=[errors, auth])
    app[accounts.SESSION_KEY] = key
    app[accounts.THROTTLE] = LoginThrottle()
    app[SERVICE] = service
    app[events.TICKETS] = tickets
    app[events.STREAMS] = events.Streams()
    app[console.CONSOLE] = console.assets()
    app.on_shutdown.append(events.end_streams)
    _add_routes(app.router)
    # An external MQTT broker's auth hooks, under /broker-auth/<their own token>/ (plugins.device_auth.hooks).
    own_token = hooks.install(app, *broker_auth) if broker_auth is not None else ()
    if metrics is not None:
        app[health.METRICS] = metrics
        app.router.add_get(
            "/metrics", health.prometheus_metrics
        )  # outside /api/v1: not in the OpenAPI document
    return app


def _add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/", console.console_root)
    r.add_get("/console/{asset:[^/]*}", console.console_asset)
    r.add_get("/api/v1/health", health.health)
    r.add_post("/api/v1/devices", devices.add_device)
    r.add_get("/api/v1/devices", devices.list_devices)
    r.add_post("/api/v1/devices/import", devices.import_devices)
    r.add_get("/api/v1/devices/{pk}/{dn}", devices.show_device)
    r.add_patch("/api/v1/devices/{pk}/{dn}", devices.update_device)
    r.add_delete("/api/v1/devices/{pk}/{dn}", devices.delete_device)
    r.add_post("/api/v1/devices/{pk}/{dn}/secret", devices.rotate_secret)
    r.add_get("/api/v1/devices/{pk}/{dn}/secret", devices.show_secret)
    r.add_post("/api/v1/firmware", firmware.add_firmware)
    r.add_get("/api/v1/firmware", firmware.list_firmware)
    r.add_get("/api/v1/firmware/{id}", firmware.show_firmware)
    r.add_delete("/api/v1/firmware/{id}", firmware.delete_firmware)
    r.add_post("/api/v1/jobs", jobs.create_job)
    r.add_post("/api/v1/jobs/preview", jobs.preview_job)
    r.add_get("/api/v1/jobs", jobs.list_jobs)
    r.add_get("/api/v1/jobs/{id}", jobs.show_job)
    r.add_get("/api/v1/jobs/{id}/tasks", jobs.job_tasks)
    r.add_get("/api/v1/jobs/{id}/timeline", jobs.job_timeline)
    r.add_get("/api/v1/jobs/{id}/report.csv", jobs.job_report)
    r.add_post("/api/v1/jobs/{id}/cancel", jobs.cancel_job)
    r.add_post("/api/v1/jobs/{id}/pause", jobs.pause_job)
    r.add_post("/api/v1/jobs/{id}/resume", jobs.resume_job)
    r.add_post("/api/v1/jobs/{id}/confirm", jobs.confirm_job)
    r.add_post("/api/v1/jobs/{id}/rerun", jobs.rerun_job)
    r.add_post("/api/v1/jobs/{id}/tasks/{pk}/{dn}/cancel", jobs.cancel_task)
    r.add_get("/api/v1/jobs/{id}/tasks/{pk}/{dn}/history", jobs.task_history)
    r.add_get("/api/v1/openapi.json", openapi)
    r.add_get("/api/v1/overview", overview.overview)
    r.add_get("/api/v1/overview/versions", overview.versions_over_time_view)
    r.add_post("/api/v1/tickets", events.issue_ticket)
    r.add_get("/api/v1/jobs/{id}/events", events.job_events)
    r.add_get("/api/v1/accounts", accounts.list_accounts)
    r.add_post("/api/v1/accounts", accounts.add_account)
    r.add_get("/api/v1/accounts/{name}", accounts.show_account)
    r.add_patch("/api/v1/accounts/{name}", accounts.update_account)
    r.add_delete("/api/v1/accounts/{name}", accounts.delete_account)
    r.add_get("/api/v1/accounts/{name}/tokens", accounts.list_tokens)
    r.add_post("/api/v1/accounts/{name}/tokens", accounts.issue_token)
    r.add_delete("/api/v1/accounts/{name}/tokens/{id}", accounts.revoke_token)
    r.add_get("/api/v1/audit", accounts.audit_log)
    r.add_get("/api/v1/whoami", accounts.whoami)
    r.add_post("/api/v1/session", accounts.sign_in)
    r.add_delete("/api/v1/session", accounts.sign_out)


async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


_PUBLIC: frozenset[Callable[..., Any]] = frozenset(
    {health.health, console.console_root, console.console_asset, accounts.sign_in, accounts.sign_out}
)
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
# Reads recorded in the audit log all the same: whoever saw a device's secret could act as the device.
_AUDITED_READS: frozenset[Callable[..., Any]] = frozenset({devices.show_secret})
# Requests that are not GETs and change nothing: not in the audit log, and no session-cookie header needed.
_NOT_CHANGES: frozenset[Callable[..., Any]] = frozenset({jobs.preview_job, events.issue_ticket})
# What each role may do beyond reading (a viewer reads everything but accounts and the audit log, and
# previews jobs): an operator runs firmware and jobs; an admin also manages devices, their secrets and
# accounts, and reads the audit log.
_OPERATOR: frozenset[Callable[..., Any]] = frozenset(
    {
        firmware.add_firmware,
        firmware.delete_firmware,
        jobs.create_job,
        jobs.cancel_job,
        jobs.pause_job,
        jobs.resume_job,
        jobs.confirm_job,
        jobs.rerun_job,
        jobs.cancel_task,
    }
)
_ADMIN: frozenset[Callable[..., Any]] = frozenset(
    {
        devices.add_device,
        devices.import_devices,
        devices.update_device,
        devices.delete_device,
        devices.rotate_secret,
        devices.show_secret,
        accounts.list_accounts,
        accounts.add_account,
        accounts.show_account,
        accounts.update_account,
        accounts.delete_account,
        accounts.list_tokens,
        accounts.issue_token,
        accounts.revoke_token,
        accounts.audit_log,
        health.prometheus_metrics,
    }
)


async def _guarded(
    service: OtaApp, request: web.Request, handler: Handler, who: Principal, *, by_cookie: bool
) -> web.StreamResponse:
    """The request handled if `who`'s role allows it (and, from the session cookie alone, a change carries
    the console's header); every change, made or refused, recorded in the audit log."""
    matched = request.match_info.handler
    changes = request.method not in _READS and matched not in _NOT_CHANGES
    needed = needed_role(matched, changes=changes)
    refusal = None
    if not who.role.allows(needed):
        refusal = f"{who.name} is {who.role.value}: this needs the {needed.value} role"
    elif by_cookie and changes and request.headers.get(accounts.CSRF_HEADER) != accounts.CSRF_VALUE:
        refusal = f"a change made with the session cookie needs the header {accounts.CSRF_HEADER}"
    response: web.StreamResponse | None = None
    status = 500  # what the errors middleware answers anything else with
    try:
        if refusal is not None:
            response = error_response(403, "forbidden", refusal)
        else:
            response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as e:
        status = e.status
        raise
    except OtaError as e:  # answered by the errors middleware, with this status
        status = status_of(e)
        raise
    finally:
        if changes or matched in _AUDITED_READS:
            await _audit(service, request, who, status, response)


def needed_role(handler: Any, *, changes: bool = False) -> Role:
    """The role a route's handler needs: the one it is listed under; else a viewer's to read, and an admin's
    to change anything (a route added later and not listed is closed, not open)."""
    if handler in _ADMIN:
        return Role.ADMIN
    if handler in _OPERATOR:
        return Role.OPERATOR
    return Role.ADMIN if changes else Role.VIEWER


async def _audit(
    service: OtaApp, request: web.Request, who: Principal, status: int, response: web.StreamResponse | None
) -> None:
    """Record a change (or a refused one) with who made it, from where, and what it made."""
    resource = request.match_info.route.resource
    action = f"{request.method} {resource.canonical if resource is not None else request.path}"
    target = request.path
    if status == 201 and isinstance(response, web.Response) and response.body is not None:
        made = _made(response.body)
        if made:
            target += f" -> {made}"
    try:
        await service.accounts.audit(
            AuditEntry(
                time.time(),
                who.name,
                who.role.value,
                action,
                target[:512],
                status,
                request.remote or "",
            )
        )
    except Exception:  # the change is made; a failed record is logged, not turned into an error
        log.exception("failed to record %s by %s in the audit log", action, who.name)


def _made(body: Any) -> str:
    """What a creation made, from its JSON answer: an id, a device, an account name."""
    try:
        doc = json.loads(bytes(body))
    except (TypeError, ValueError):
        return ""
    if not isinstance(doc, dict):
        return ""
    if "product_key" in doc and "device_name" in doc and "id" not in doc:
        return f"{doc['product_key']}/{doc['device_name']}"
    for key in ("id", "name"):
        if key in doc:
            return f"{key} {doc[key]}"
    return ""

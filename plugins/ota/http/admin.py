"""The management REST API on aiohttp: `/api/v1`, JSON, bearer token; the console; Prometheus' `/metrics`.

This module builds the aiohttp application: its two middlewares (errors, plugins.ota.http.errors, and
the bearer-token check) and its one route table. The handlers live by resource beside it (`devices`,
`firmware`, `jobs`, `events`, `overview`, `health`, `console`) and talk to the app layer only; input is
validated there and answered with a 4xx naming the field.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from aiohttp import web

from plugins.device_auth import hooks
from plugins.device_auth.gate import Gate
from plugins.ota.app.ota_app import OtaApp
from plugins.ota.http import console, devices, events, firmware, health, jobs, overview
from plugins.ota.http.errors import Handler, error_response, errors
from plugins.ota.http.inputs import SERVICE
from plugins.ota.http.openapi import OPENAPI
from plugins.ota.metrics import OtaMetrics


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

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Decided by the route matched, not by the path text: only these handlers are public.
        matched = request.match_info.handler
        if matched in _PUBLIC or matched in own_token:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, expected):
            return await handler(request)
        if (
            matched is health.prometheus_metrics
            and metrics_expected is not None
            and hmac.compare_digest(given, metrics_expected)
        ):
            return await handler(request)
        if matched is events.job_events and tickets.valid(
            request.query.get("ticket", ""), events.clock(request)
        ):
            return await handler(request)
        return error_response(401, "unauthorized", "missing or wrong bearer token")

    app = web.Application(middlewares=[errors, auth])
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
    r.add_post("/api/v1/firmware", firmware.add_firmware)
    r.add_get("/api/v1/firmware", firmware.list_firmware)
    r.add_get("/api/v1/firmware/{id}", firmware.show_firmware)
    r.add_delete("/api/v1/firmware/{id}", firmware.delete_firmware)
    r.add_post("/api/v1/jobs", jobs.create_job)
    r.add_post("/api/v1/jobs/preview", jobs.preview_job)
    r.add_get("/api/v1/jobs", jobs.list_jobs)
    r.add_get("/api/v1/jobs/{id}", jobs.show_job)
    r.add_get("/api/v1/jobs/{id}/tasks", jobs.job_tasks)
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
    r.add_post("/api/v1/tickets", events.issue_ticket)
    r.add_get("/api/v1/jobs/{id}/events", events.job_events)


async def openapi(_request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


_PUBLIC: frozenset[Callable[..., Any]] = frozenset(
    {health.health, console.console_root, console.console_asset}
)

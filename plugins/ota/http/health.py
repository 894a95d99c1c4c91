"""The unauthenticated liveness answer, and Prometheus' `GET /metrics` (outside /api/v1)."""

from __future__ import annotations

from aiohttp import web

from plugins.ota.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from plugins.ota.metrics import OtaMetrics


async def health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


METRICS = web.AppKey("metrics", OtaMetrics)


async def prometheus_metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this broker's metrics (plugins.ota.metrics)."""
    body = await request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

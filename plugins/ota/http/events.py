"""A job's live view: short-lived tickets (`POST /api/v1/tickets`) and the server-sent event stream
`GET /api/v1/jobs/{id}/events` they open."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from plugins.ota.app.ota_app import OtaApp
from plugins.ota.core import machine
from plugins.ota.core.model import JobRecord, JobState, JobType
from plugins.ota.http.errors import error_response
from plugins.ota.http.inputs import SERVICE, int_path, ota_app
from plugins.ota.http.views import iso, job_view, task_view

log = logging.getLogger("ota.api")

TICKET_TTL_S = 60.0
_STREAM_INTERVAL_S = 0.5
_STREAM_KEEPALIVE_S = 15.0
_STREAM_MAX_S = 30 * 60.0
_STREAM_MAX = 64
_STREAM_TASKS_MAX = 1000


class Tickets:
    """Short-lived tickets for the event stream: EventSource cannot send an Authorization header, and
    the admin token must not travel in URLs (they end up in logs and history). A ticket is
    `<expiry>.<HMAC(key, "events:<expiry>")>` with a key derived from the admin token, so it needs no
    storage, dies with a token change, opens nothing but `GET /jobs/{id}/events`, and only within
    `TICKET_TTL_S` seconds of its issue (an open stream outlives it; a reconnect needs a fresh one)."""

    def __init__(self, token: str) -> None:
        self._key = hmac.new(token.encode(), b"ota-broker events ticket", hashlib.sha256).digest()

    def _mac(self, expiry: int) -> str:
        return hmac.new(self._key, f"events:{expiry}".encode(), hashlib.sha256).hexdigest()

    def issue(self, now: float) -> tuple[str, int]:
        expiry = int(now + TICKET_TTL_S)
        return f"{expiry}.{self._mac(expiry)}", expiry

    def valid(self, ticket: str, now: float) -> bool:
        expiry_text, _, mac = ticket.partition(".")
        if not expiry_text.isdigit() or len(expiry_text) > 12:
            return False
        expiry = int(expiry_text)
        return now <= expiry <= now + TICKET_TTL_S + 1 and hmac.compare_digest(
            mac.encode(), self._mac(expiry).encode()
        )


@dataclass
class Streams:
    """The open event streams; `closing` is set when the listener shuts down so they end at once."""

    open: int = 0
    closing: asyncio.Event | None = None

    def closing_event(self) -> asyncio.Event:
        if self.closing is None:
            self.closing = asyncio.Event()
        return self.closing


TICKETS = web.AppKey("tickets", Tickets)
STREAMS = web.AppKey("streams", Streams)


async def end_streams(app: web.Application) -> None:
    app[STREAMS].closing_event().set()


def clock(request: web.Request) -> float:
    service: OtaApp | None = request.app[SERVICE]
    return service.clock() if service is not None else time.time()


async def issue_ticket(request: web.Request) -> web.Response:
    ticket, expiry = request.app[TICKETS].issue(clock(request))
    return web.json_response(
        {"ticket": ticket, "expires_at": iso(expiry), "scope": "GET /api/v1/jobs/{id}/events"}, status=201
    )


def _job_final(job: JobRecord, now: float) -> bool:
    state = machine.job_state(job.stored_state, job.counts, schedule_at=job.schedule_at, now=now)
    return state is JobState.CANCELLED or (state is JobState.COMPLETED and job.type is not JobType.DYNAMIC)


async def job_events(request: web.Request) -> web.StreamResponse:
    """`text/event-stream` of one job: an `event: snapshot` (the job and its tasks) whenever something
    changed, checked every 0.5 s; a comment every 15 s keeps proxies from closing an idle stream. It
    ends (`event: end`) when the job is final (a static or verify job completed, any job cancelled),
    after 30 minutes (the client reconnects), when the client leaves or the listener shuts down."""
    service = ota_app(request)
    job_id = int_path(request)
    await service.jobs.get(job_id)  # 404 before the stream starts
    streams = request.app[STREAMS]
    if streams.open >= _STREAM_MAX:
        return error_response(
            503, "too_many_streams", f"at most {_STREAM_MAX} event streams at a time; retry later"
        )
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-store",
            "X-Accel-Buffering": "no",
        }
    )
    streams.open += 1
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        await _stream_job(request, response, service, job_id, streams.closing_event())
    except ConnectionError:
        pass  # the client left
    except Exception:
        log.exception("event stream of job %s failed", job_id)
    finally:
        streams.open -= 1
    return response


async def _stream_job(
    request: web.Request,
    response: web.StreamResponse,
    service: OtaApp,
    job_id: int,
    closing: asyncio.Event,
) -> None:
    """Write snapshots until the job is final (then `event: end`, and the client stops), or until the
    client leaves, the listener shuts down or the stream is 30 minutes old (no `end`: the client
    reconnects)."""
    started = last_write = time.monotonic()
    last_seen: object = None
    while not closing.is_set() and time.monotonic() - started < _STREAM_MAX_S:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        now = service.clock()
        job = await service.jobs.find(job_id)
        if job is None:
            break
        tasks = await service.jobs.tasks_in_states(job_id, None)
        view = job_view(job, now, service.admission.waiting)
        seen = (
            (
                view["state"],
                view["pause_reason"],
                view["counts"],
                view["current_phase"],
                view["waiting_for_capacity"],
                job.updated_at,
            ),
            [(t.id, t.rev) for t in tasks],
        )
        if seen != last_seen:
            last_seen = seen
            snapshot = {
                "job": view,
                "tasks": [task_view(t) for t in tasks[:_STREAM_TASKS_MAX]],
                "tasks_total": len(tasks),
                "at": iso(now),
            }
            await response.write(f"event: snapshot\ndata: {json.dumps(snapshot)}\n\n".encode())
            last_write = time.monotonic()
        elif time.monotonic() - last_write >= _STREAM_KEEPALIVE_S:
            await response.write(b": keep-alive\n\n")
            last_write = time.monotonic()
        if _job_final(job, now):
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing.wait(), _STREAM_INTERVAL_S)
    else:
        return
    await response.write(b"event: end\ndata: {}\n\n")


# ------------------------------------------------------------------------------------------ console

"""Every error the API answers with, as `{"error": code, "message": text}`, and the one table that maps the
OTA error root's leaves (plugins.ota.core.errors) to HTTP statuses.

The `errors` middleware answers each failure of a handler: an `OtaError` by `STATUS_OF`, aiohttp's HTTP
exceptions by their own status, a client that left or sent a malformed body with a 400, and anything
else with a 500 that never carries a traceback (the traceback goes to the log).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import ClientPayloadError, web

from firmware_store.server import BodyStalled
from plugins.ota.core.errors import Conflict, InvalidInput, NotFound, OtaError

log = logging.getLogger("ota.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATUS_OF: dict[type[OtaError], int] = {OtaError: 400, NotFound: 404, Conflict: 409, InvalidInput: 422}


def status_of(error: OtaError) -> int:
    """The status of `error`: that of its nearest class in `STATUS_OF` (the root's, 400, at worst)."""
    return next(STATUS_OF[c] for c in type(error).__mro__ if c in STATUS_OF)


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except OtaError as e:
        return error_response(status_of(e), e.code, e.message)
    except web.HTTPException as e:
        if e.status >= 400:
            return error_response(e.status, e.reason.lower().replace(" ", "_"), e.text or e.reason)
        raise
    except ConnectionError as e:  # the client left (or stalled, BodyStalled) before its body was in
        if not isinstance(e, BodyStalled):  # the deadline logged that one
            log.info(
                "%s %s from %s: the client went away before the whole body arrived",
                request.method,
                request.path,
                request.remote,
            )
        return error_response(400, "incomplete_body", "the connection ended before the whole body arrived")
    except ClientPayloadError as e:
        return error_response(400, "bad_body", f"the body is malformed: {str(e)[:120]}")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal", "internal error; see the broker's log")

"""The OpenAPI 3.1 document of the management API, served at `/api/v1/openapi.json`.

A test checks that every route the API registers is described here and nothing else is.
"""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    ok: str = "200",
    answer: dict[str, Any] | None = None,
    body: dict[str, Any] | None = None,
    *,
    errors: tuple[str, ...] = ("401", "404", "422"),
) -> dict[str, Any]:
    responses: dict[str, Any] = {ok: {"description": "success", **(_json(answer) if answer else {})}}
    for code in errors:
        responses[code] = {"description": "error", **_json(_ref("Error"))}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, **body}
    return op


_PK_DN = [
    {"name": "pk", "in": "path", "required": True, "schema": {"type": "string"}},
    {"name": "dn", "in": "path", "required": True, "schema": {"type": "string"}},
]
_ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]
_NAME = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
_LIST = {"type": "array", "items": {}}
_PAGE = [
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000},
        "description": "Items per page",
    },
    {
        "name": "offset",
        "in": "query",
        "schema": {"type": "integer", "minimum": 0, "default": 0},
        "description": "Items to skip",
    },
]
_PAGE_HEADERS = {
    "X-Total-Count": {"description": "How many items the whole list holds", "schema": {"type": "integer"}},
    "Link": {
        "description": 'While more items follow: `<...?limit=&offset=>; rel="next"`, the next page',
        "schema": {"type": "string"},
    },
}


def _list(summary: str, item: str, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A paged list: a JSON array of `item`, one page at a time (`limit`, `offset`), with its total in
    `X-Total-Count` and the next page in `Link`."""
    op = _op(summary, answer={"type": "array", "items": _ref(item)})
    op["parameters"] = [*(params or []), *_PAGE]
    op["responses"]["200"]["headers"] = _PAGE_HEADERS
    op["description"] = (
        "Paged: at most `limit` items from `offset`; `X-Total-Count` is the size of the whole list and, "
        'while more follow, `Link: <...>; rel="next"` is the URL of the next page.'
    )
    return op


def _query(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "schema": {"type": "string"}} for n in names]


_EVENTS: dict[str, Any] = _op("Live job: server-sent events", errors=("401", "404", "503"))
_EVENTS["responses"]["200"]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
_EVENTS["description"] = (
    "`event: snapshot` with `{job, tasks, tasks_total, at}` whenever the job or one of its tasks changed "
    "(checked every 0.5 s; at most 1000 tasks listed); `event: end` when the job is final (a static or "
    "verify job completed, any job cancelled). A comment every 15 s keeps an idle stream open; a stream "
    "ends after 30 minutes. Authenticate with the bearer token, or (EventSource cannot send headers) with "
    "`?ticket=` from POST /tickets."
)
_EVENTS["security"] = [{"bearer": []}, {"ticket": []}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "ota-broker management API", "version": "1"},
    "servers": [{"url": "/api/v1"}],
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "ticket": {
                "type": "apiKey",
                "in": "query",
                "name": "ticket",
                "description": "From POST /tickets; valid 60 s, only for GET /jobs/{id}/events (EventSource "
                "cannot send headers)",
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            },
            "Device": {
                "type": "object",
                "properties": {
                    "product_key": {"type": "string"},
                    "device_name": {"type": "string"},
                    "enabled": {"type": "boolean"},
                    "online": {"type": "boolean"},
                    "last_seen": {"type": ["string", "null"], "format": "date-time"},
                    "modules": {"type": "object", "additionalProperties": {"type": "string"}},
                    "groups": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "PATCH: replaced whole",
                    },
                },
            },
            "Firmware": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "product_key": {"type": "string"},
                    "module": {"type": "string"},
                    "version": {"type": "string"},
                    "src_version": {"type": ["string", "null"]},
                    "size": {"type": "integer"},
                    "md5": {"type": "string"},
                    "sha256": {"type": "string"},
                    "sign_method": {"enum": ["Md5", "SHA256"]},
                    "sign": {"type": "string"},
                    "status": {
                        "enum": ["unverified", "verifying", "verified", "verify_failed", "no_verify_needed"]
                    },
                },
            },
            "JobRequest": {
                "type": "object",
                "required": ["firmware_id"],
                "properties": {
                    "firmware_id": {"type": "integer"},
                    "type": {"enum": ["static", "dynamic", "verify"]},
                    "devices": {"type": "array", "items": {"type": "string", "description": "pk/dn"}},
                    "src_versions": {"type": "array", "items": {"type": "string"}},
                    "gray_percent": {"type": "number"},
                    "overwrite": {"type": "boolean"},
                    "force": {"type": "boolean"},
                    "need_confirm": {"type": "boolean"},
                    "schedule_at": {"type": "string", "format": "date-time"},
                    "end_at": {"type": "string", "format": "date-time"},
                    "rate_per_minute": {"type": "integer"},
                    "timeout_minutes": {
                        "type": "number",
                        "description": "A task with no success this long after its first progress report"
                        " times out.",
                    },
                    "notify_timeout_minutes": {
                        "type": "number",
                        "default": 1440,
                        "description": "A notified task with no progress report this long after its latest"
                        " notice times out; 0: never.",
                    },
                    "download_protocol": {
                        "enum": ["https", "mqtt"],
                        "default": "https",
                        "description": "mqtt: devices fetch the firmware in blocks over MQTT"
                        " (/sys/{pk}/{dn}/thing/file/download), each file at most 16 MB.",
                    },
                    "retry_count": {"type": "integer"},
                    "retry_interval_minutes": {"type": "number"},
                    "rollout": {
                        "type": "object",
                        "properties": {
                            "phases": {"type": "array", "items": {"type": "number"}},
                            "success_threshold": {"type": "number"},
                            "error_threshold_count": {"type": "integer"},
                            "error_threshold_percent": {"type": "number"},
                        },
                    },
                    "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                    "group": {
                        "type": "string",
                        "description": "The devices of the firmware's product in this group (not with `devices`).",
                    },
                    "seed": {
                        "type": "string",
                        "description": "A preview's seed: the job starts exactly the devices the preview"
                        " planned (a gray release's sample included).",
                    },
                },
            },
            "Account": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "role": {"enum": ["viewer", "operator", "admin"]},
                    "disabled": {"type": "boolean"},
                    "has_password": {"type": "boolean"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "tokens": {"type": "array", "items": _ref("ApiToken")},
                },
            },
            "AccountRequest": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "role": {"enum": ["viewer", "operator", "admin"]},
                    "password": {"type": "string", "description": "At least 10 characters; for the console."},
                    "disabled": {"type": "boolean"},
                },
            },
            "ApiToken": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "account": {"type": "string"},
                    "label": {"type": "string"},
                    "created_at": {"type": "string", "format": "date-time"},
                    "revoked_at": {"type": ["string", "null"], "format": "date-time"},
                    "token": {"type": "string", "description": "Only in the answer that issues it."},
                },
            },
            "AuditEntry": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "at": {"type": "string", "format": "date-time"},
                    "actor": {"type": "string"},
                    "role": {"type": "string"},
                    "action": {"type": "string"},
                    "target": {"type": "string"},
                    "status": {"type": "integer"},
                    "remote": {"type": "string"},
                },
            },
            "Principal": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "role": {"type": "string"}},
            },
            "JobPreview": {
                "type": "object",
                "properties": {
                    "firmware": {"type": "object"},
                    "whole_product": {
                        "type": "boolean",
                        "description": "No device list nor group: every device of it.",
                    },
                    "group": {"type": ["string", "null"]},
                    "devices": {"type": "integer", "description": "Devices matched, skipped ones included."},
                    "tasks": {"type": "integer", "description": "Devices that would be notified."},
                    "states": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "skipped_reasons": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "phases": {"type": "array", "items": {"type": "integer"}},
                    "sample": {"type": "array", "items": {"type": "object"}},
                    "seed": {"type": "string"},
                },
            },
            "Job": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "firmware_id": {"type": "integer"},
                    "type": {"type": "string"},
                    "state": {"enum": ["scheduled", "running", "paused", "completed", "cancelled"]},
                    "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "success_rate": {"type": ["number", "null"]},
                    "throughput_per_minute": {"type": "number"},
                    "waiting_for_capacity": {
                        "type": "integer",
                        "description": "Online devices' queued tasks whose notice waits for room in the "
                        "transfer window (admission control).",
                    },
                },
            },
            "Overview": {
                "type": "object",
                "properties": {
                    "devices": {
                        "type": "object",
                        "properties": {
                            "total": {"type": "integer"},
                            "online": {"type": "integer"},
                            "offline": {"type": "integer"},
                        },
                    },
                    "versions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "product_key": {"type": "string"},
                                "module": {"type": "string"},
                                "version": {"type": "string"},
                                "devices": {"type": "integer"},
                            },
                        },
                    },
                    "jobs": {
                        "type": "object",
                        "properties": {
                            "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
                            "active": {"type": "array", "items": _ref("Job")},
                        },
                    },
                    "recent_failures": {"type": "array", "items": _ref("Task")},
                    "transfers": {
                        "type": "object",
                        "description": "Admission control: the transfer window now, transfers in flight, "
                        "devices waiting for room, and the window's maximum (max_downloads).",
                        "properties": {
                            "window": {"type": "integer"},
                            "in_flight": {"type": "integer"},
                            "waiting": {"type": "integer"},
                            "max": {"type": "integer"},
                        },
                    },
                    "partial": {"type": "boolean", "description": "counted only the first 200,000 devices"},
                },
            },
            "Ticket": {
                "type": "object",
                "properties": {
                    "ticket": {"type": "string"},
                    "expires_at": {"type": "string", "format": "date-time"},
                    "scope": {"type": "string"},
                },
            },
            "Task": {
                "type": "object",
                "properties": {
                    "device": {"type": "string"},
                    "state": {"type": "string"},
                    "progress": {"type": "integer"},
                    "desc": {"type": "string"},
                    "attempts": {"type": "integer"},
                    "updated_at": {"type": "string", "format": "date-time"},
                },
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/health": {"get": {**_op("Liveness", errors=()), "security": []}},
        "/openapi.json": {"get": _op("This document", errors=("401",))},
        "/overview": {"get": _op("The fleet at a glance", answer=_ref("Overview"), errors=("401",))},
        "/accounts": {
            "get": _list("Operator accounts, by name (admin)", "Account"),
            "post": _op(
                "Add an account (admin)",
                "201",
                _ref("Account"),
                _json(_ref("AccountRequest")),
                errors=("401", "403", "409", "422"),
            ),
        },
        "/accounts/{name}": {
            "parameters": _NAME,
            "get": _op("One account and its API tokens (admin)", answer=_ref("Account")),
            "patch": _op(
                "Change an account's role, password, or disabled flag (admin)",
                answer=_ref("Account"),
                body=_json(_ref("AccountRequest")),
            ),
            "delete": _op("Delete an account and its tokens (admin)", "204", errors=("401", "403", "404")),
        },
        "/accounts/{name}/tokens": {
            "parameters": _NAME,
            "get": _list("The account's API tokens (admin)", "ApiToken"),
            "post": _op(
                "Issue an API token: the answer's `token` is shown this once (admin)",
                "201",
                _ref("ApiToken"),
                _json({"type": "object", "properties": {"label": {"type": "string"}}}),
            ),
        },
        "/accounts/{name}/tokens/{id}": {
            "parameters": _NAME + _ID,
            "delete": _op("Revoke a token: it stops working at once (admin)", answer=_ref("ApiToken")),
        },
        "/audit": {"get": _list("Every change made through the API, newest first (admin)", "AuditEntry")},
        "/whoami": {"get": _op("Who this request is from, and its role", answer=_ref("Principal"))},
        "/session": {
            "post": _op(
                "Sign in with an account's password: sets the HttpOnly session cookie `ota_session`",
                "200",
                _ref("Principal"),
                _json(
                    {
                        "type": "object",
                        "required": ["name", "password"],
                        "properties": {"name": {"type": "string"}, "password": {"type": "string"}},
                    }
                ),
                errors=("401", "422"),
            ),
            "delete": _op("Sign out: the session cookie is cleared", "204", errors=()),
        },
        "/overview/versions": {
            "get": _op(
                "Per product and module, the devices on each version over the last `days` (default 30)",
                answer={"type": "object", "properties": {"series": {"type": "object"}}},
                errors=("401", "422"),
            ),
        },
        "/tickets": {
            "post": _op("A 60-second ticket for the event stream", "201", _ref("Ticket"), errors=("401",))
        },
        "/devices": {
            "post": _op("Register a device", "201", _ref("Device"), _json(_ref("Device"))),
            "get": _list(
                "List devices",
                "Device",
                _query("product_key", "module", "version", "online", "name", "group"),
            ),
        },
        "/devices/import": {
            "post": _op(
                "Register devices from CSV",
                body={"content": {"text/csv": {"schema": {"type": "string"}}}},
                errors=("401", "413", "422"),
            )
        },
        "/devices/{pk}/{dn}": {
            "parameters": _PK_DN,
            "get": _op("A device with its tasks", answer=_ref("Device")),
            "patch": _op("Enable or disable", answer=_ref("Device"), body=_json({"type": "object"})),
            "delete": _op("Delete a device", "204", errors=("401", "404", "409")),
        },
        "/devices/{pk}/{dn}/secret": {
            "parameters": _PK_DN,
            "post": _op("Rotate the device secret"),
            "get": _op("The device secret (admins; recorded in the audit log)"),
        },
        "/firmware": {
            "post": _op(
                "Upload firmware",
                "201",
                _ref("Firmware"),
                {"content": {"multipart/form-data": {"schema": {"type": "object"}}}},
                errors=("401", "409", "413", "422"),
            ),
            "get": _list("List firmware, oldest first", "Firmware", _query("product_key")),
        },
        "/firmware/{id}": {
            "parameters": _ID,
            "get": _op("One firmware", answer=_ref("Firmware")),
            "delete": _op("Delete firmware", "204", errors=("401", "404", "409")),
        },
        "/jobs": {
            "post": _op(
                "Start a job", "201", _ref("Job"), _json(_ref("JobRequest")), errors=("401", "409", "422")
            ),
            "get": _list("List jobs, newest first", "Job"),
        },
        "/jobs/preview": {
            "post": _op(
                "What POST /jobs would start with this body, starting nothing",
                "200",
                _ref("JobPreview"),
                _json(_ref("JobRequest")),
                errors=("401", "409", "422"),
            ),
        },
        "/jobs/{id}": {"parameters": _ID, "get": _op("One job", answer=_ref("Job"))},
        "/jobs/{id}/events": {"parameters": _ID, "get": _EVENTS},
        "/jobs/{id}/tasks": {
            "parameters": _ID,
            "get": _list("The job's tasks", "Task"),
        },
        "/jobs/{id}/report.csv": {"parameters": _ID, "get": _op("The job's tasks as CSV")},
        "/jobs/{id}/timeline": {
            "parameters": _ID,
            "get": _op(
                "The job's upgrades over time: succeeded and failed (or timed-out) tasks, cumulative,"
                " at up to 120 instants",
                answer={
                    "type": "object",
                    "properties": {"started_at": {"type": "string"}, "points": {"type": "object"}},
                },
            ),
        },
        "/jobs/{id}/cancel": {"parameters": _ID, "post": _op("Cancel tasks by state", answer=_ref("Job"))},
        "/jobs/{id}/pause": {
            "parameters": _ID,
            "post": _op("Pause", answer=_ref("Job"), errors=("401", "404", "409")),
        },
        "/jobs/{id}/resume": {
            "parameters": _ID,
            "post": _op("Resume", answer=_ref("Job"), errors=("401", "404", "409")),
        },
        "/jobs/{id}/confirm": {"parameters": _ID, "post": _op("Confirm waiting tasks", answer=_ref("Job"))},
        "/jobs/{id}/rerun": {"parameters": _ID, "post": _op("Re-run failed tasks", answer=_ref("Job"))},
        "/jobs/{id}/tasks/{pk}/{dn}/cancel": {
            "parameters": _ID + _PK_DN,
            "post": _op("Cancel one task", answer=_ref("Task"), errors=("401", "404", "409")),
        },
        "/jobs/{id}/tasks/{pk}/{dn}/history": {
            "parameters": _ID + _PK_DN,
            "get": _op("A task's history", answer={"type": "object"}),
        },
    },
}

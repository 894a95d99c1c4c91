"""The OTA service's exceptions: one root, specific leaves.

    OtaError
    ├── NotFound           (404) a device, firmware or job that does not exist
    ├── Conflict           (409) the request contradicts stored state (duplicate, in use, finished)
    └── InvalidInput       (422) a field's value is not acceptable; `.field` names it

The HTTP API maps them to statuses in exactly one table (`plugins.ota.http.errors.STATUS_OF`).
"""

from __future__ import annotations


class OtaError(Exception):
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(OtaError):
    code = "not_found"


class Conflict(OtaError):
    code = "conflict"


class InvalidInput(OtaError):
    code = "invalid"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field

"""Logging for the process: human-readable lines by default, JSON lines with `--log-format json`.

A JSON line is one object: `ts` (UTC, ISO 8601 with milliseconds), `level`, `logger`, `message`, and
`device` (`pk/dn`) when the record concerns one device (its code passes `extra={"device": "pk/dn"}`);
`exc` holds the traceback of a logged exception. Human lines keep the format operators grep:
`<time> <LEVEL> <logger>: <message>`, the message naming the device as `pk/dn`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sys
from collections.abc import Iterator
from enum import StrEnum
from typing import Any, TextIO

__all__ = ["TEXT_FORMAT", "JsonFormatter", "LogFormat", "errors_reported_by_caller", "setup"]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_NOISY = ("amqtt", "transitions", "aiohttp.access")


class _OurHandler(logging.StreamHandler[TextIO]):
    """The handler `setup` installs (others', such as pytest's, are left alone)."""


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        device = getattr(record, "device", None)
        if device:
            doc["device"] = str(device)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup(level: str, fmt: LogFormat | str = LogFormat.TEXT, stream: TextIO | None = None) -> None:
    """Log to `stream` (stderr) at `level`; below DEBUG, amqtt's and aiohttp's chatter is kept to warnings."""
    handler = _OurHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(
        JsonFormatter() if LogFormat(fmt) is LogFormat.JSON else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)  # set up again (in-process CLI tests): replace, never duplicate
    root.addHandler(handler)
    root.setLevel(level.upper())
    if level.upper() != "DEBUG":
        for noisy in _NOISY:
            logging.getLogger(noisy).setLevel(logging.WARNING)


class _HeldErrors(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.records.append(record)
        return False


@contextlib.contextmanager
def errors_reported_by_caller(*names: str) -> Iterator[None]:
    """Keep the ERROR and CRITICAL records of loggers `names` aside while the block runs.

    For a start-up that fails, the caller logs one line naming the cause; what amqtt and the OTA plugin
    logged about it (with tracebacks) is logged at DEBUG then. When the block ends normally, the records
    held are logged as they were.
    """
    held = _HeldErrors()
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(held)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        for logger in loggers:
            logger.removeFilter(held)
        for record in held.records:
            logger = logging.getLogger(record.name)
            if failed:
                if not logger.isEnabledFor(logging.DEBUG):
                    continue
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            logger.handle(record)

"""The device import format (pure): CSV rows `product_key,device_name[,device_secret]`.

An optional first row names the columns, in any order (`device_name,product_key`, `ProductKey,DeviceName`,
...); it is never taken for a device. Every other non-blank row is read, and either becomes a device or
an error naming its line; `rows_read` counts them, so `len(devices) + len(errors) == rows_read`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

from plugins.ota.core.credentials import secret_problem
from plugins.ota.core.topics import DeviceRef, InvalidDeviceRef

COLUMNS = ("product_key", "device_name", "device_secret")
_REQUIRED = COLUMNS[:2]
_FORMAT = "expected product_key,device_name[,device_secret]"


@dataclass(frozen=True, slots=True)
class ImportRow:
    line: int
    device: DeviceRef
    secret: str | None  # None: the service generates one


@dataclass
class ParsedImport:
    devices: list[ImportRow] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)
    rows_read: int = 0


def _column(cell: str) -> str | None:
    """The column a header cell names (`product_key`, `ProductKey`, `Product Key`...), or None."""
    key = cell.strip().lower().replace("_", "").replace(" ", "").replace("-", "")
    return next((c for c in COLUMNS if c.replace("_", "") == key), None)


def parse_devices(text: str) -> ParsedImport:
    """Every data row of `text` as a device to create or an error naming its line."""
    out = ParsedImport()
    order: tuple[str, ...] = COLUMNS
    first = True
    seen: set[DeviceRef] = set()
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue
            if first:
                first = False
                named = [_column(c) for c in row]
                if any(named):
                    problem = _header_problem(named)
                    if problem:
                        out.errors.append((line, problem))
                        return out  # no row's columns are known: nothing is imported
                    order = tuple(n for n in named if n)
                    continue
            out.rows_read += 1
            problem, parsed = _row(row, order, line)
            if parsed is not None and parsed.device in seen:
                problem, parsed = f"{parsed.device} is listed twice", None
            if parsed is None:
                out.errors.append((line, problem))
            else:
                seen.add(parsed.device)
                out.devices.append(parsed)
    except csv.Error as e:
        out.rows_read += 1
        out.errors.append((reader.line_num + 1, f"not CSV: {e}"))
    return out


def _header_problem(named: list[str | None]) -> str | None:
    known = [n for n in named if n]
    if len(known) != len(named) or len(set(known)) != len(known) or not set(_REQUIRED) <= set(known):
        return f"the header must name product_key and device_name, and may name device_secret: {_FORMAT}"
    return None


def _row(row: list[str], order: tuple[str, ...], line: int) -> tuple[str, ImportRow | None]:
    if not len(_REQUIRED) <= len(row) <= len(order):
        return _FORMAT, None
    cells = dict(zip(order, row, strict=False))
    try:
        device = DeviceRef(cells["product_key"].strip(), cells["device_name"].strip())
    except InvalidDeviceRef as e:
        return str(e), None
    secret = cells.get("device_secret") or None  # not stripped: a secret is taken exactly as given
    if secret is not None and (problem := secret_problem(secret)):
        return f"device_secret {problem}", None
    return "", ImportRow(line, device, secret)

"""The device import format, pure: headers, column order, secrets, duplicates and line numbers."""

from __future__ import annotations

import pytest

from plugins.ota.core.device_csv import parse_devices
from plugins.ota.core.topics import DeviceRef


def test_rows_become_devices_or_errors_naming_their_lines() -> None:
    """Every non-blank row is either a device or an error at its line; blank lines are skipped and
    counted nowhere; a quoted multi-line cell keeps later line numbers right."""
    text = 'pk,a\n\npk,b,0123456789abcdef\nonly-one\npk,a\npk,"c\nd"\npk,e,short\npk,f\n'
    parsed = parse_devices(text)
    assert [(r.line, str(r.device), r.secret) for r in parsed.devices] == [
        (1, "pk/a", None),
        (3, "pk/b", "0123456789abcdef"),
        (9, "pk/f", None),
    ]
    assert [line for line, _ in parsed.errors] == [4, 5, 7, 8]
    assert parsed.rows_read == len(parsed.devices) + len(parsed.errors) == 7


@pytest.mark.parametrize(
    "header",
    [
        "product_key,device_name",
        "PRODUCT_KEY,Device_Name",
        "productKey,deviceName",
        "product-key, device name",
    ],
)
def test_a_header_is_not_a_device(header: str) -> None:
    """A first row naming the columns in any common spelling is a header, not a device."""
    parsed = parse_devices(f"{header}\npk,d\n")
    assert [r.device for r in parsed.devices] == [DeviceRef("pk", "d")]
    assert parsed.errors == [] and parsed.rows_read == 1


@pytest.mark.parametrize("header", ["product_key", "device_name,device_secret", "product_key,device_name,x"])
def test_a_header_that_lacks_or_adds_columns_refuses_the_file(header: str) -> None:
    """A header without both key columns, or with a column it cannot place, refuses every row."""
    parsed = parse_devices(f"{header}\npk,d\n")
    assert parsed.devices == [] and [line for line, _ in parsed.errors] == [1]


def test_secrets_are_taken_exactly_as_given() -> None:
    """A secret is not trimmed: surrounding spaces are an error rather than silently dropped."""
    parsed = parse_devices('pk,a,"  0123456789abcdef"\npk,b,0123456789 abcdef\n')
    assert [line for line, _ in parsed.errors] == [1]
    assert [r.secret for r in parsed.devices] == ["0123456789 abcdef"]

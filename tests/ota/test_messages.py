"""Wire messages of the Aliyun OTA device protocol (`plugins.ota.core.messages`): parsing device
payloads into frozen values (anything malformed raises `BadMessage`) and building notices and replies."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.ota.core import messages
from plugins.ota.core.messages import (
    BadMessage,
    FirmwareGet,
    Inform,
    LegacyRequest,
    Progress,
    get_reply,
    notice_data,
    parse_firmware_get,
    parse_inform,
    parse_legacy_request,
    parse_progress,
    push_notice,
)
from plugins.ota.core.model import Firmware, FirmwareStatus, SignMethod

MAX = 65536
BLOB = b"firmware bytes"
MD5 = hashlib.md5(BLOB).hexdigest()
SHA256 = hashlib.sha256(BLOB).hexdigest()
URL = "https://gw.example:8443/firmware/1?sig=abc"

Parser = Callable[[bytes, int], object]
PARSERS: list[tuple[Parser, type]] = [
    (parse_inform, Inform),
    (parse_progress, Progress),
    (parse_firmware_get, FirmwareGet),
    (parse_legacy_request, LegacyRequest),
]
PARSER_IDS = [p.__name__ for p, _ in PARSERS]


def encode(doc: Any) -> bytes:
    """A document as the device sends it: compact JSON, UTF-8."""
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def inform(params: Any = None, **doc: Any) -> bytes:
    """An inform payload with `params` (default: version 1.0.0) and id 1 unless `doc` overrides."""
    return encode({"id": 1, "params": {"version": "1.0.0"} if params is None else params} | doc)


def progress(step: Any = "42", **params: Any) -> bytes:
    """A progress payload with id 1 and the given step and extra params."""
    return encode({"id": 1, "params": {"step": step, **params}})


def make_firmware(**overrides: Any) -> Firmware:
    """A verified Md5-signed full firmware for the default module, version 2.0.0."""
    fields: dict[str, Any] = {
        "id": 7,
        "product_key": "pk1",
        "module": "default",
        "version": "2.0.0",
        "src_version": None,
        "size": len(BLOB),
        "md5": MD5,
        "sha256": SHA256,
        "sign_method": SignMethod.MD5,
        "description": "",
        "status": FirmwareStatus.VERIFIED,
        "created_at": 1_700_000_000.0,
    }
    fields.update(overrides)
    return Firmware(**fields)


# ----------------------------------------------------------------------------------------- envelope


@pytest.mark.parametrize("req_id", ["1", "abc-123", "", 0, 7, 1732851000123, 2**63 - 1])
@pytest.mark.parametrize(("parse", "_cls"), PARSERS, ids=PARSER_IDS)
def test_id_accepted_as_string_or_integer(parse: Parser, _cls: type, req_id: str | int) -> None:
    """`id` may be a string or an integer and is kept with its type and value."""
    params = {"version": "1.0.0", "step": "1"}
    parsed = parse(encode({"id": req_id, "params": params}), MAX)
    assert parsed.id == req_id  # type: ignore[attr-defined]
    assert type(parsed.id) is type(req_id)  # type: ignore[attr-defined]


@pytest.mark.parametrize("req_id", [True, False, 1.0, 1.5, None, {}, {"a": 1}, [], [1]])
@pytest.mark.parametrize(("parse", "_cls"), PARSERS, ids=PARSER_IDS)
def test_id_of_other_types_rejected(parse: Parser, _cls: type, req_id: Any) -> None:
    """A bool, float, null, object or array `id` is a BadMessage."""
    with pytest.raises(BadMessage, match="'id'"):
        parse(encode({"id": req_id, "params": {"version": "1.0.0", "step": "1"}}), MAX)


@pytest.mark.parametrize(("parse", "_cls"), PARSERS, ids=PARSER_IDS)
def test_missing_id_rejected(parse: Parser, _cls: type) -> None:
    """A payload without `id` is a BadMessage."""
    with pytest.raises(BadMessage, match="'id'"):
        parse(encode({"params": {"version": "1.0.0", "step": "1"}}), MAX)


@pytest.mark.parametrize("req_id", [-1, 2**63, "x" * 65])
def test_id_out_of_range_rejected(req_id: str | int) -> None:
    """Negative or over-64-bit integer ids and ids over 64 characters are BadMessages."""
    with pytest.raises(BadMessage, match="'id'"):
        parse_inform(inform(id=req_id), MAX)


def test_huge_integer_id_rejected_as_bad_message() -> None:
    """A 5000-digit integer literal (beyond Python's int-parsing limit) is a BadMessage, not a ValueError."""
    payload = b'{"id":' + b"1" * 5000 + b',"params":{"version":"1.0.0"}}'
    assert len(payload) < MAX
    with pytest.raises(BadMessage):
        parse_inform(payload, MAX)


@pytest.mark.parametrize("params", [None, [], ["version"], "version", 1, True])
@pytest.mark.parametrize(("parse", "_cls"), PARSERS, ids=PARSER_IDS)
def test_params_must_be_an_object(parse: Parser, _cls: type, params: Any) -> None:
    """`params` missing or not a JSON object is a BadMessage."""
    with pytest.raises(BadMessage, match="'params'"):
        parse(encode({"id": 1, "params": params}), MAX)


@pytest.mark.parametrize(("parse", "_cls"), PARSERS, ids=PARSER_IDS)
def test_params_absent_rejected(parse: Parser, _cls: type) -> None:
    """A payload without `params` is a BadMessage."""
    with pytest.raises(BadMessage, match="'params'"):
        parse(encode({"id": 1}), MAX)


@pytest.mark.parametrize(
    "payload",
    [b"", b"   ", b"not json", b"{", b'{"id":1,', b"{'id': 1}", b"\xef\xbb\xbf{}", b"NaN"],
)
@pytest.mark.parametrize(("parse", "_cls"), PARSERS, ids=PARSER_IDS)
def test_non_json_rejected(parse: Parser, _cls: type, payload: bytes) -> None:
    """Empty, truncated or otherwise invalid JSON is a BadMessage."""
    with pytest.raises(BadMessage):
        parse(payload, MAX)


@pytest.mark.parametrize("payload", [b"\xff\xfe\x00", b'{"id":1,"params":{"version":"\xc3"}}', b"\x80"])
@pytest.mark.parametrize(("parse", "_cls"), PARSERS, ids=PARSER_IDS)
def test_non_utf8_rejected(parse: Parser, _cls: type, payload: bytes) -> None:
    """Bytes that are not UTF-8 are a BadMessage saying so."""
    with pytest.raises(BadMessage, match="UTF-8"):
        parse(payload, MAX)


@pytest.mark.parametrize("payload", [b"[]", b'[{"id":1,"params":{}}]', b"1", b'"x"', b"null", b"true"])
@pytest.mark.parametrize(("parse", "_cls"), PARSERS, ids=PARSER_IDS)
def test_json_that_is_not_an_object_rejected(parse: Parser, _cls: type, payload: bytes) -> None:
    """JSON arrays and scalars are BadMessages: the payload must be an object."""
    with pytest.raises(BadMessage, match="object"):
        parse(payload, MAX)


def test_deeply_nested_json_rejected() -> None:
    """Nesting deep enough to exhaust the JSON parser's recursion is a BadMessage."""
    payload = b'{"id":1,"params":{"version":"1","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}}"
    with pytest.raises(BadMessage):
        parse_inform(payload, len(payload))


@pytest.mark.parametrize(("parse", "_cls"), PARSERS, ids=PARSER_IDS)
def test_oversize_payload_rejected(parse: Parser, _cls: type) -> None:
    """A payload one byte over max_bytes is a BadMessage; one exactly at max_bytes is parsed."""
    payload = encode({"id": 1, "params": {"version": "1.0.0", "step": "1", "pad": "x" * 100}})
    assert isinstance(parse(payload, len(payload)), _cls)
    with pytest.raises(BadMessage, match="exceeds"):
        parse(payload, len(payload) - 1)


def test_unknown_fields_ignored() -> None:
    """Unknown fields at the top level and in params are ignored."""
    payload = encode(
        {"id": 3, "method": "x", "params": {"version": "1.2", "extra": [1, {"a": None}]}, "sys": {}}
    )
    assert parse_inform(payload, MAX) == Inform(3, "1.2", "default")


# ------------------------------------------------------------------------------------------- inform


def test_inform_parses_version_and_module() -> None:
    """Aliyun's documented inform example parses into Inform(id, version, module)."""
    payload = b'{"id":1,"params":{"version":"1.0.0","module":"MCU"}}'
    assert parse_inform(payload, MAX) == Inform(1, "1.0.0", "MCU")


@pytest.mark.parametrize("params", [{"version": "1.0.0"}, {"version": "1.0.0", "module": ""}])
def test_inform_module_absent_or_empty_is_default(params: dict[str, Any]) -> None:
    """An absent or empty module means the `default` module."""
    assert parse_inform(inform(params), MAX).module == "default"


def test_inform_module_null_is_default() -> None:
    """A null module means the `default` module."""
    assert parse_inform(inform({"version": "1", "module": None}), MAX).module == "default"


@pytest.mark.parametrize("module", ["MCU", "wifi_fw", "a.b-c", "A" * 64, "0"])
def test_module_charset_accepted(module: str) -> None:
    """Modules of 1-64 characters of A-Z a-z 0-9 _ . - are accepted verbatim."""
    assert parse_inform(inform({"version": "1", "module": module}), MAX).module == module


@pytest.mark.parametrize(
    "module",
    ["A" * 65, "has space", "a/b", "+", "#", "mcu\x00", "módulo", "MCU\n", "\nMCU", 5, True, ["MCU"], {}],
)
@pytest.mark.parametrize(("parse", "_cls"), PARSERS[:3], ids=PARSER_IDS[:3])
def test_module_outside_charset_rejected(parse: Parser, _cls: type, module: Any) -> None:
    """A module that is not a 1-64 character string of A-Z a-z 0-9 _ . - is a BadMessage."""
    payload = encode({"id": 1, "params": {"version": "1.0.0", "step": "1", "module": module}})
    with pytest.raises(BadMessage, match="module"):
        parse(payload, MAX)


@pytest.mark.parametrize("version", ["1", "1.0.0", "v2.0.0-rc.1+build 7", "x" * 64, "固件-1"])
def test_inform_version_accepted(version: str) -> None:
    """Non-empty version strings of up to 64 printable characters are accepted verbatim."""
    assert parse_inform(inform({"version": version}), MAX).version == version


@pytest.mark.parametrize(
    "version",
    [None, "", "   ", 1, 1.0, True, ["1.0"], {"v": 1}, "x" * 65, "1.0\n", "1.0\x00", "\t1", "1\x1b[31m"],
)
def test_inform_version_rejected(version: Any) -> None:
    """A missing, empty, non-string, over-64-character or control-character version is a BadMessage."""
    with pytest.raises(BadMessage, match="version"):
        parse_inform(inform({"version": version}), MAX)


def test_inform_version_missing_rejected() -> None:
    """An inform without params.version is a BadMessage."""
    with pytest.raises(BadMessage, match="version"):
        parse_inform(inform({"module": "MCU"}), MAX)


@pytest.mark.parametrize("version", ["1.0\x7f", "1.0\x85", "1.0\x9b", "\ud800", "1.0\udfff"])
def test_inform_version_non_printable_rejected(version: str) -> None:
    """DEL, C1 controls and lone surrogates (not printable, not UTF-8 encodable) are BadMessages."""
    payload = json.dumps({"id": 1, "params": {"version": version}}).encode("ascii")  # \u escapes
    with pytest.raises(BadMessage, match="version"):
        parse_inform(payload, MAX)


# ----------------------------------------------------------------------------------------- progress


def test_progress_parses_spec_example() -> None:
    """Aliyun's documented progress example parses into Progress(id, step as int, desc, module)."""
    payload = b'{"id":1,"params":{"step":"42","desc":"downloading","module":"MCU"}}'
    assert parse_progress(payload, MAX) == Progress(1, 42, "downloading", "MCU")


@pytest.mark.parametrize("step", [*range(101), -1, -2, -3, -4])
def test_progress_step_in_range_accepted(step: int) -> None:
    """Step strings "0".."100" and "-1".."-4" are accepted and become integers."""
    assert parse_progress(progress(str(step)), MAX).step == step


@pytest.mark.parametrize(
    "step",
    ["abc", "101", "-9", "-5", "1000", "", " ", "1.5", "0x10", "42%", 42, -1, 4.2, None, True, ["42"], {}],
)
def test_progress_step_rejected(step: Any) -> None:
    """A step that is not a string in 0..100 or -1..-4 (including an int) is a BadMessage."""
    with pytest.raises(BadMessage, match="step"):
        parse_progress(progress(step), MAX)


def test_progress_step_missing_rejected() -> None:
    """A progress report without params.step is a BadMessage."""
    with pytest.raises(BadMessage, match="step"):
        parse_progress(encode({"id": 1, "params": {"desc": "x"}}), MAX)


def test_progress_desc_truncated_to_128() -> None:
    """A desc longer than 128 characters is truncated, not rejected."""
    parsed = parse_progress(progress("5", desc="é" * 300), MAX)
    assert parsed.desc == "é" * 128


@pytest.mark.parametrize(("params", "desc"), [({}, ""), ({"desc": None}, ""), ({"desc": "ok"}, "ok")])
def test_progress_desc_optional(params: dict[str, Any], desc: str) -> None:
    """An absent or null desc is the empty string."""
    assert parse_progress(progress("5", **params), MAX).desc == desc


@pytest.mark.parametrize("desc", [5, True, ["x"], {"a": "b"}])
def test_progress_desc_non_string_rejected(desc: Any) -> None:
    """A desc that is not a string is a BadMessage."""
    with pytest.raises(BadMessage, match="desc"):
        parse_progress(progress("5", desc=desc), MAX)


def test_progress_module_defaults() -> None:
    """A progress report without module is for the `default` module."""
    assert parse_progress(progress("5"), MAX).module == "default"


# ---------------------------------------------------------------------------------------------- pull


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"id":7,"params":{}}', FirmwareGet(7, "default")),
        (b'{"id":7,"params":{"module":"MCU"}}', FirmwareGet(7, "MCU")),
        (b'{"id":"7","params":{"module":""}}', FirmwareGet("7", "default")),
    ],
)
def test_firmware_get(payload: bytes, expected: FirmwareGet) -> None:
    """A pull names its module, `default` when absent or empty."""
    assert parse_firmware_get(payload, MAX) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"id":9,"params":{"version":"1.0.0"}}', LegacyRequest(9, "1.0.0")),
        (b'{"id":"9","params":{}}', LegacyRequest("9", None)),
        (b'{"id":9,"params":{"version":null}}', LegacyRequest(9, None)),
    ],
)
def test_legacy_request(payload: bytes, expected: LegacyRequest) -> None:
    """A legacy v3 request carries an optional version."""
    assert parse_legacy_request(payload, MAX) == expected


@pytest.mark.parametrize("version", ["", 5, "x" * 65, "1\n"])
def test_legacy_request_bad_version_rejected(version: Any) -> None:
    """A legacy request with a present but invalid version is a BadMessage."""
    with pytest.raises(BadMessage, match="version"):
        parse_legacy_request(encode({"id": 9, "params": {"version": version}}), MAX)


# ------------------------------------------------------------------------------------ property tests

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_docs = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
protocol_values = json_docs | st.sampled_from(["1.0.0", "42", "-2", "100", "MCU", "", "default"])
# Documents shaped like protocol messages, so the field checks (not just the envelope) get exercised.
shaped_docs = st.fixed_dictionaries(
    {"id": json_scalars | st.text(max_size=70), "params": json_docs},
    optional={"extra": json_docs},
) | st.fixed_dictionaries(
    {
        "id": st.integers(min_value=0, max_value=2**63 - 1) | st.text(max_size=64),
        "params": st.dictionaries(
            st.sampled_from(["version", "module", "step", "desc"]) | st.text(max_size=8),
            protocol_values,
            max_size=5,
        ),
    }
)

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def parses_or_rejects(parse: Parser, cls: type, payload: bytes) -> None:
    """`parse` returns its dataclass or raises BadMessage; any other exception propagates and fails."""
    try:
        result = parse(payload, MAX)
    except BadMessage:
        return
    assert isinstance(result, cls)


@PROPERTY_SETTINGS
@given(payload=st.binary(max_size=300))
def test_arbitrary_bytes_parse_or_raise_bad_message(payload: bytes) -> None:
    """For arbitrary bytes every parser returns its dataclass or raises BadMessage, nothing else."""
    for parse, cls in PARSERS:
        parses_or_rejects(parse, cls, payload)


@PROPERTY_SETTINGS
@given(doc=json_docs | shaped_docs, ascii_only=st.booleans())
def test_arbitrary_json_parse_or_raise_bad_message(doc: Any, ascii_only: bool) -> None:
    """For arbitrary JSON documents every parser returns its dataclass or raises BadMessage, nothing else."""
    payload = json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8")
    for parse, cls in PARSERS:
        parses_or_rejects(parse, cls, payload)


@PROPERTY_SETTINGS
@given(req_id=st.integers(min_value=0, max_value=2**63 - 1) | st.text(max_size=64))
def test_id_echoed_unchanged_through_get_reply(req_id: str | int) -> None:
    """A pull's id, string or integer, comes back in get_reply with the same type and value."""
    pull = parse_firmware_get(encode({"id": req_id, "params": {}}), MAX)
    reply = json.loads(get_reply(pull.id, {}))
    assert reply["id"] == req_id
    assert type(reply["id"]) is type(req_id)


# ------------------------------------------------------------------------------------------- notices


def test_notice_data_md5_default_module() -> None:
    """Md5 firmware for the default module: exactly size, version, url, md5, sign=md5, signMethod, extData."""
    data = notice_data(make_firmware(), [URL])
    assert data == {
        "size": len(BLOB),
        "version": "2.0.0",
        "url": URL,
        "md5": MD5,
        "sign": MD5,
        "signMethod": "Md5",
        "extData": {},
    }
    assert type(data["signMethod"]) is str


def test_notice_data_sha256_signs_with_sha256() -> None:
    """SHA256 firmware: signMethod "SHA256", sign is the sha256 and md5 is still present."""
    data = notice_data(make_firmware(sign_method=SignMethod.SHA256), [URL])
    assert data["signMethod"] == "SHA256"
    assert data["sign"] == SHA256
    assert data["md5"] == MD5


def test_notice_data_names_non_default_module() -> None:
    """A firmware for another module names it in `module`."""
    data = notice_data(make_firmware(module="MCU"), [URL])
    assert data["module"] == "MCU"


def test_notice_data_is_diff_only_for_differential() -> None:
    """`isDiff: 1` appears for differential packages only."""
    assert "isDiff" not in notice_data(make_firmware(), [URL])
    data = notice_data(make_firmware(src_version="1.0.0"), [URL])
    assert data["isDiff"] == 1
    assert type(data["isDiff"]) is int


def test_notice_data_ext_data_is_copied() -> None:
    """extData carries the given mapping, copied so later changes to it do not leak in."""
    ext = {"key": "value"}
    data = notice_data(make_firmware(), [URL], ext)
    ext["key"] = "changed"
    assert data["extData"] == {"key": "value"}


def test_push_notice_format() -> None:
    """The push notice is JSON with code "1000" (a string), message "success", an integer id and the data."""
    data = notice_data(make_firmware(module="MCU", sign_method=SignMethod.SHA256), [URL])
    raw = push_notice(1732851000123, data)
    doc = json.loads(raw.decode("utf-8"))
    assert set(doc) == {"code", "message", "id", "data"}
    assert doc["code"] == "1000"
    assert doc["message"] == "success"
    assert doc["id"] == 1732851000123
    assert type(doc["id"]) is int
    assert doc["data"] == data
    assert set(doc["data"]) == {"size", "version", "url", "md5", "sign", "signMethod", "module", "extData"}


def test_push_notice_is_utf8_not_escaped() -> None:
    """Non-ASCII text is sent as UTF-8, not as \\u escapes."""
    raw = push_notice(1, notice_data(make_firmware(version="版本2"), [URL]))
    assert "版本2".encode() in raw


@pytest.mark.parametrize("req_id", ["7", "abc", "", 7, 0, 2**63 - 1])
def test_get_reply_echoes_id_unchanged(req_id: str | int) -> None:
    """get_reply echoes the request id as sent (string stays string, int stays int), code 200, "success"."""
    doc = json.loads(get_reply(req_id, {}))
    assert doc == {"id": req_id, "code": 200, "data": {}, "message": "success"}
    assert type(doc["id"]) is type(req_id)
    assert type(doc["code"]) is int


def test_get_reply_carries_notice_data() -> None:
    """A pull reply carries the same data as the push notice."""
    data = notice_data(make_firmware(), [URL])
    assert json.loads(get_reply(7, data))["data"] == data


def test_same_notice_ignores_only_the_id_and_the_links_signature() -> None:
    """Two notices offer the same package when they differ only in their id and their links' query (each
    notice signs its links anew); another version, digest, host or file path is another offer."""
    url = "https://ota.example/firmware/7?s=pk/d&e=100&t=abc"
    data = {"size": 10, "version": "2.0.0", "url": url, "md5": "0" * 32, "extData": {}}
    first = messages.push_notice(1, data)
    assert messages.same_notice(first, messages.push_notice(2, data | {"url": url.replace("e=100", "e=200")}))
    for other in (
        {"version": "2.0.1"},
        {"md5": "1" * 32},
        {"url": url.replace("ota.example", "ota2.example")},
        {"url": url.replace("/7?", "/8?")},
    ):
        assert not messages.same_notice(first, messages.push_notice(1, data | other)), other
    assert not messages.same_notice(b"not json", b"not json!")
    assert messages.same_notice(b"not json", b"not json")


def test_a_push_notice_is_told_from_a_devices_legacy_request() -> None:
    """On the legacy request topic the server's answer (a push notice) and a device's request travel the
    same way; only the notice has the notice's shape."""
    assert messages.is_push_notice(messages.push_notice(7, {"version": "2.0.0", "url": "https://x/f"}))
    assert not messages.is_push_notice(b'{"id": 3, "params": {"version": "1.0.0"}}')
    assert not messages.is_push_notice(b'{"code": "1000", "data": {}, "params": {}}')
    assert not messages.is_push_notice(b"not json")
    assert not messages.is_push_notice(b"[1, 2]")

"""Wire messages of the Aliyun OTA device protocol: parsing device payloads, building notices.

Device payloads are parsed here, once, into frozen values; anything malformed raises `BadMessage` with a
reason fit for one log line. Nothing here knows about tasks, storage or the broker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from plugins.ota.core.blocks import FIRST_FILE_ID
from plugins.ota.core.model import DEFAULT_MODULE, Firmware, FirmwareFile
from plugins.ota.core.topics import TopicKind

MAX_VERSION_LEN = 64
MODULE_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_ID_MAX = 2**63 - 1
_STEP = re.compile(r"-?[0-9]{1,3}")

RequestId = str | int


class BadMessage(ValueError):
    """A device payload that does not follow the protocol; the text says why."""


@dataclass(frozen=True, slots=True)
class Inform:
    id: RequestId
    version: str
    module: str


@dataclass(frozen=True, slots=True)
class Progress:
    id: RequestId
    step: int
    desc: str
    module: str


@dataclass(frozen=True, slots=True)
class FirmwareGet:
    id: RequestId
    module: str


@dataclass(frozen=True, slots=True)
class LegacyRequest:
    id: RequestId
    version: str | None


def _object(payload: bytes, max_bytes: int) -> tuple[RequestId, dict[str, Any]]:
    if len(payload) > max_bytes:
        raise BadMessage(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadMessage("payload is not UTF-8") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError, and ints past Python's digit limit
        raise BadMessage(f"payload is not JSON: {str(e)[:80]}") from e
    if not isinstance(doc, dict):
        raise BadMessage("payload is not a JSON object")
    raw_id = doc.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise BadMessage("'id' must be a string or an integer")
    if isinstance(raw_id, int) and not 0 <= raw_id <= _ID_MAX:
        raise BadMessage("'id' is out of range")
    if isinstance(raw_id, str) and len(raw_id) > 64:
        raise BadMessage("'id' is longer than 64 characters")
    params = doc.get("params")
    if not isinstance(params, dict):
        raise BadMessage("'params' must be an object")
    return raw_id, params


def _module(params: dict[str, Any]) -> str:
    module = params.get("module")
    if module is None or module == "":
        return DEFAULT_MODULE
    if not isinstance(module, str) or not MODULE_PATTERN.fullmatch(module):
        raise BadMessage("'params.module' must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return module


def _version(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadMessage(f"'{field}' must be a non-empty string")
    if len(value) > MAX_VERSION_LEN or not value.isprintable():
        raise BadMessage(f"'{field}' must be at most {MAX_VERSION_LEN} printable characters")
    return value


def parse_inform(payload: bytes, max_bytes: int) -> Inform:
    req_id, params = _object(payload, max_bytes)
    return Inform(req_id, _version(params.get("version"), "params.version"), _module(params))


def parse_progress(payload: bytes, max_bytes: int) -> Progress:
    req_id, params = _object(payload, max_bytes)
    raw_step = params.get("step")
    if not isinstance(raw_step, str):
        raise BadMessage('\'params.step\' must be a string such as "42" or "-2"')
    if not _STEP.fullmatch(raw_step.strip()):
        raise BadMessage(f"'params.step' {raw_step[:16]!r} is not a number")
    step = int(raw_step.strip())
    if not (0 <= step <= 100 or -4 <= step <= -1):
        raise BadMessage(f"'params.step' {step} is out of range (0..100 or -1..-4)")
    desc = params.get("desc", "")
    if desc is None:
        desc = ""
    if not isinstance(desc, str):
        raise BadMessage("'params.desc' must be a string")
    return Progress(req_id, step, desc[:128], _module(params))


def parse_firmware_get(payload: bytes, max_bytes: int) -> FirmwareGet:
    req_id, params = _object(payload, max_bytes)
    return FirmwareGet(req_id, _module(params))


def parse_legacy_request(payload: bytes, max_bytes: int) -> LegacyRequest:
    req_id, params = _object(payload, max_bytes)
    version = params.get("version")
    return LegacyRequest(req_id, None if version is None else _version(version, "params.version"))


# ------------------------------------------------------------------------------------ server → device


def notice_data(
    firmware: Firmware, links: Sequence[str], ext_data: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The `data` object of a push notice and of a pull reply for an HTTPS download: `links` holds one
    signed URL per file of the package, in order."""
    if len(links) != len(firmware.package):
        raise ValueError(f"{len(firmware.package)} link(s) expected, {len(links)} given")
    if not firmware.multi_file:
        data: dict[str, Any] = {"size": firmware.size, "version": firmware.version, "url": links[0]}
        data |= _digests(firmware)
        return _closing(data, firmware, ext_data)
    files = [_file(firmware, f, {"fileUrl": link}) for f, link in zip(firmware.files, links, strict=True)]
    return _closing(_package(firmware, {}, files), firmware, ext_data)


def mqtt_notice_data(
    firmware: Firmware, stream_id: int, ext_data: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The `data` object of a notice whose package is fetched over MQTT, block by block, as stream
    `stream_id` (Aliyun's `dProtocol` "mqtt"): no URL, a `streamFileId` per file (`blocks.FIRST_FILE_ID`
    for the first, then in order)."""
    protocol = {"dProtocol": "mqtt", "streamId": stream_id}
    if not firmware.multi_file:
        data: dict[str, Any] = {"size": firmware.size, "version": firmware.version}
        data |= _digests(firmware) | protocol | {"streamFileId": FIRST_FILE_ID}
        return _closing(data, firmware, ext_data)
    files = [_file(firmware, f, {"streamFileId": FIRST_FILE_ID + i}) for i, f in enumerate(firmware.files)]
    return _closing(_package(firmware, protocol, files), firmware, ext_data)


def _digests(firmware: Firmware) -> dict[str, Any]:
    return {"md5": firmware.md5, "sign": firmware.sign, "signMethod": str(firmware.sign_method)}


def _package(firmware: Firmware, protocol: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
    """A multi-file package in the field names LinkSDK v4 parses. LinkSDK's JSON reader takes the first
    `"key"` anywhere in the text, so the package's own keys come before the files, and in each file its
    name (free text) comes last."""
    return (
        {"version": firmware.version, "signMethod": str(firmware.sign_method)} | protocol | {"files": files}
    )


def _file(firmware: Firmware, file: FirmwareFile, where: dict[str, Any]) -> dict[str, Any]:
    """One file of a package: flat (LinkSDK cuts each file at its first `}`), its name last."""
    return (
        {"fileSize": file.size, "fileSign": file.sign(firmware.sign_method), "fileMd5": file.md5}
        | where
        | {"fileName": file.name}
    )


def _closing(data: dict[str, Any], firmware: Firmware, ext_data: Mapping[str, str] | None) -> dict[str, Any]:
    if firmware.is_diff:
        data["isDiff"] = 1
    if firmware.module != DEFAULT_MODULE:
        data["module"] = firmware.module
    data["extData"] = dict(ext_data or {})
    return data


def push_notice(notice_id: int, data: dict[str, Any]) -> bytes:
    """`/ota/device/upgrade/{pk}/{dn}` (and the legacy request reply)."""
    return _dump({"code": "1000", "data": data, "id": notice_id, "message": "success"})


def is_push_notice(payload: bytes) -> bool:
    """Whether `payload` has the shape of a `push_notice` (`code` and `data`, no `params`): the server's
    answer on the legacy request topic, which a device's request on the same topic never has."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    return isinstance(doc, dict) and "code" in doc and "data" in doc and "params" not in doc


def same_notice(a: bytes, b: bytes) -> bool:
    """Whether two push notices offer the same package: equal but for their id and their links' signatures
    and expiry (each notice signs its links anew). A session that still holds one undelivered need not get
    the other."""
    if a == b:
        return True
    offer = _offer(a)
    return offer is not None and offer == _offer(b)


def _offer(payload: bytes) -> Any:
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    data = doc.get("data") if isinstance(doc, dict) else None
    return _unsigned(data) if isinstance(data, dict) and data else None


def _unsigned(value: Any) -> Any:
    """`value` with the query (signature, expiry) cut off every link in it."""
    if isinstance(value, dict):
        return {k: _unsigned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unsigned(v) for v in value]
    if isinstance(value, str) and value.startswith(("https://", "http://")):
        return value.split("?", 1)[0]
    return value


def get_reply(request_id: RequestId, data: dict[str, Any]) -> bytes:
    """`/sys/{pk}/{dn}/thing/ota/firmware/get_reply`: `data` is `{}` when nothing is pending."""
    return _dump({"id": request_id, "code": 200, "data": data, "message": "success"})


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to a device: the kind of its topic (spelled by `topics.topic_name`), its payload and the
    QoS it goes at to the device's own session."""

    kind: TopicKind
    payload: bytes
    qos: int = 1

    @property
    def is_push(self) -> bool:
        """A notice pushed on the upgrade topic (the others answer a request)."""
        return self.kind is TopicKind.UPGRADE


def upgrade_notice(now_ms: int, data: dict[str, Any]) -> Outgoing:
    """A push notice on `/ota/device/upgrade/...`."""
    return Outgoing(TopicKind.UPGRADE, push_notice(now_ms, data))


def pull_answer(reply_kind: TopicKind, request_id: RequestId, now_ms: int, data: dict[str, Any]) -> Outgoing:
    """The answer to a pull: on `.../firmware/get_reply` with the request's id, or (the legacy request) a
    notice on the legacy request's own topic."""
    if reply_kind is TopicKind.FIRMWARE_GET_REPLY:
        return Outgoing(reply_kind, get_reply(request_id, data))
    return Outgoing(reply_kind, push_notice(now_ms, data))


def block_reply(frame: bytes) -> Outgoing:
    """A block of a firmware file over MQTT (or its error frame), at QoS 0 as Aliyun sends it."""
    return Outgoing(TopicKind.FILE_DOWNLOAD_REPLY, frame, qos=0)

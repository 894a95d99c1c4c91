"""Firmware over MQTT: Aliyun's block download on `/sys/{pk}/{dn}/thing/file/download` (pure).

A device whose notice says `"dProtocol":"mqtt"` (with `streamId` and `streamFileId`, and no `url`) fetches
the file block by block. It publishes a JSON request and expects a binary reply on
`/sys/{pk}/{dn}/thing/file/download_reply`:

    request  {"id":"1","version":"1.0","params":{"fileToken":"default",
              "fileInfo":{"streamId":7,"fileId":1,},"fileBlock":{"size":5120,"offset":0}}}
    reply    [u16 big-endian header length][JSON header][block][u16 little-endian CRC-16/ARC of the block]
    header   {"code":200,"data":{"fileLength":N,"bSize":n,"bOffset":off,"fileToken":"default"},"id":"1","msg":"success"}

The rules come from LinkSDK C v4 (`aiot_mqtt_download_api.c`), the device side that has to accept what we send:

* Its request is not valid JSON (a comma before `}` after `fileId`), so it is parsed leniently here.
* Its JSON reader takes the first `"key"` in the text and the value right after the `:`, with no whitespace;
  so the header is compact, starts with `code` and `data`, and puts the echoed `fileToken` last.
* It reads the header length big-endian and the CRC as a native `uint16_t`: little-endian on every target
  LinkSDK runs on. The frame must be exactly `2 + header + bSize + 2` bytes.
* It accepts a block shorter than asked for and asks for the rest next; it resends after a bad frame or a
  reply whose `code` is not 200, and gives up after four failures in a row.

An Aliyun MQTT download serves files of at most 16 MB. This module decides and encodes; the broker looks
the stream up, checks that the device may read it, reads the bytes and publishes.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import anycrc  # type: ignore[import-untyped]  # no type hints upstream

from plugins.ota.core.topics import DeviceRef

MAX_FILE_SIZE = 16 * 1024 * 1024
"""Aliyun serves a file over MQTT only up to 16 MB."""
DEFAULT_BLOCK_SIZE = 5 * 1024
"""LinkSDK v4's default request size (`MQTT_DOWNLOAD_DEFAULT_REQUEST_SIZE`)."""
MAX_BLOCK_SIZE = 128 * 1024
"""The largest block served; a device may ask for less. LinkSDK sets no limit of its own (its demo asks for
10 KiB, and it accepts MQTT payloads of up to 1 MiB)."""
FIRST_FILE_ID = 1
"""The `streamFileId` of a package's first file in a notice; the others follow in order."""
MAX_REQUEST_BYTES = 1024
"""A block request is about 170 bytes; anything much longer is not one."""
_UINT32_MAX = 2**32 - 1
_MAX_TOKEN_LEN = 64  # LinkSDK copies the echoed fileToken into a 128-byte buffer without a bound
# The token is echoed into the header, where LinkSDK's reader (no escapes, brackets counted inside strings)
# must still find the fields after it: no quotes, backslashes, brackets, commas or colons.
_TOKEN = re.compile(rf'[^"\\{{}}\[\],:\x00-\x1f\x7f-\U0010ffff]{{1,{_MAX_TOKEN_LEN}}}')
_MAX_ID_LEN = 64

RequestId = str | int


class ReplyCode(IntEnum):
    """The `code` of a reply header. LinkSDK takes only 200 as success and resends after anything else;
    the other values are ours, in the spirit of HTTP, with a `msg` that says why."""

    OK = 200
    BAD_REQUEST = 400
    FORBIDDEN = 403
    NOT_FOUND = 404
    FILE_TOO_LARGE = 413
    OUT_OF_RANGE = 416
    UNAVAILABLE = 503  # the stored file is damaged


@dataclass(frozen=True, slots=True)
class BlockRequest:
    """One parsed request: `size` bytes of file `file_id` of stream `stream_id`, from `offset`."""

    id: RequestId | None
    file_token: str
    stream_id: int
    file_id: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request that gets an error reply: `code` and a one-line reason (also fit for the log)."""

    code: ReplyCode
    msg: str
    request_id: RequestId | None = None


@dataclass(frozen=True, slots=True)
class StreamFile:
    """What the broker offered one device as `streamId`/`streamFileId`: a file of `length` bytes."""

    stream_id: int
    file_id: int
    length: int
    device: DeviceRef


@dataclass(frozen=True, slots=True)
class Block:
    """The part of the file to send back: `size` bytes from `offset` (never past the end)."""

    request_id: RequestId | None
    file_token: str
    file_length: int
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


# ------------------------------------------------------------------------------------------- parsing


def parse_request(payload: bytes) -> BlockRequest | Rejection:
    """A block request as LinkSDK (or any reasonable client) sends it, or why it cannot be served.

    Lenient where devices differ: a trailing comma before `}` or `]`; `id` a string or an integer or absent;
    `fileToken` absent (taken as "default"); the numbers given as integers or as strings of digits.
    """
    if len(payload) > MAX_REQUEST_BYTES:
        return Rejection(ReplyCode.BAD_REQUEST, f"request of {len(payload)} bytes is too long")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return Rejection(ReplyCode.BAD_REQUEST, "request is not UTF-8")
    try:
        doc = json.loads(_without_trailing_commas(text))
    except (ValueError, RecursionError):
        return Rejection(ReplyCode.BAD_REQUEST, "request is not JSON")
    if not isinstance(doc, dict):
        return Rejection(ReplyCode.BAD_REQUEST, "request is not a JSON object")
    request_id, why = _request_id(doc.get("id"))
    if why:
        return Rejection(ReplyCode.BAD_REQUEST, why)
    try:
        return _request(doc, request_id)
    except _Bad as e:
        return Rejection(ReplyCode.BAD_REQUEST, str(e), request_id)


class _Bad(ValueError):
    pass


def _request(doc: dict[str, Any], request_id: RequestId | None) -> BlockRequest:
    params = _member(doc, "params", "")
    info = _member(params, "fileInfo", "params.")
    block = _member(params, "fileBlock", "params.")
    token = params.get("fileToken", "default")
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise _Bad(
            f"'params.fileToken' must be 1-{_MAX_TOKEN_LEN} printable ASCII characters but \" \\ {{ }} [ ] , :"
        )
    return BlockRequest(
        id=request_id,
        file_token=token,
        stream_id=_uint(info.get("streamId"), "params.fileInfo.streamId"),
        file_id=_uint(info.get("fileId"), "params.fileInfo.fileId"),
        size=_uint(block.get("size"), "params.fileBlock.size"),
        offset=_uint(block.get("offset"), "params.fileBlock.offset"),
    )


def _member(parent: dict[str, Any], key: str, prefix: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise _Bad(f"'{prefix}{key}' must be an object")
    return value


def _uint(value: Any, field: str) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(f"'{field}' must be an unsigned integer")
    if not 0 <= value <= _UINT32_MAX:
        raise _Bad(f"'{field}' {value} is out of range 0..{_UINT32_MAX}")
    return value


def _request_id(value: Any) -> tuple[RequestId | None, str]:
    if value is None:
        return None, ""
    if isinstance(value, str) and len(value) <= _MAX_ID_LEN and value.isprintable():
        return value, ""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**63 - 1:
        return value, ""
    return None, f"'id' must be a string of at most {_MAX_ID_LEN} characters or an unsigned integer"


def _without_trailing_commas(text: str) -> str:
    """`text` with every comma that is followed (past whitespace) by `}` or `]` removed, outside strings."""
    out: list[str] = []
    in_string = escaped = False
    pending_comma = -1  # index in `out` of a comma not yet known to be trailing
    for ch in text:
        if in_string:
            if ch == '"' and not escaped:
                in_string = False
            escaped = not escaped and ch == "\\"
        elif ch == '"':
            in_string, pending_comma = True, -1
        elif ch in "}]" and pending_comma >= 0:
            del out[pending_comma]
            pending_comma = -1
        elif ch == ",":
            pending_comma = len(out)
        elif not ch.isspace():
            pending_comma = -1
        out.append(ch)
    return "".join(out)


# ------------------------------------------------------------------------------------------- deciding


def decide(
    request: BlockRequest,
    requester: DeviceRef,
    stream: StreamFile | None,
    max_block: int = MAX_BLOCK_SIZE,
) -> Block | Rejection:
    """The block to send for `request` from `requester`, given the stream the broker found for its
    `streamId` (None when there is none), or why not."""
    rid = request.id
    if stream is None or stream.stream_id != request.stream_id:
        return Rejection(ReplyCode.NOT_FOUND, f"unknown streamId {request.stream_id}", rid)
    if stream.device != requester:
        return Rejection(
            ReplyCode.FORBIDDEN, f"streamId {request.stream_id} is not offered to this device", rid
        )
    if stream.file_id != request.file_id:
        return Rejection(
            ReplyCode.NOT_FOUND, f"unknown fileId {request.file_id} in streamId {request.stream_id}", rid
        )
    if stream.length > MAX_FILE_SIZE:
        return Rejection(ReplyCode.FILE_TOO_LARGE, "file size has exceeded the limit 16 MB", rid)
    if not 1 <= request.size <= max_block:
        return Rejection(
            ReplyCode.BAD_REQUEST, f"block size {request.size} is not within 1..{max_block}", rid
        )
    if request.offset >= stream.length:
        return Rejection(
            ReplyCode.OUT_OF_RANGE,
            f"offset {request.offset} is past the end of the {stream.length}-byte file",
            rid,
        )
    size = min(request.size, stream.length - request.offset)
    return Block(rid, request.file_token, stream.length, request.offset, size)


# ------------------------------------------------------------------------------------------- encoding


def reply_frame(block: Block, data: bytes) -> bytes:
    """The binary `download_reply` carrying `data`, which must be the file's bytes `[offset, end)`."""
    if len(data) != block.size:
        raise ValueError(f"block of {block.size} bytes expected, {len(data)} given")
    header: dict[str, Any] = {
        "code": int(ReplyCode.OK),
        "data": {
            "fileLength": block.file_length,
            "bSize": block.size,
            "bOffset": block.offset,
            "fileToken": block.file_token,
        },
    }
    return _framed(header, block.request_id, "success") + data + struct.pack("<H", crc16_arc(data))


def error_frame(rejection: Rejection) -> bytes:
    """The `download_reply` for a request that is not served: the header alone, `code` != 200."""
    return _framed({"code": int(rejection.code)}, rejection.request_id, rejection.msg)


def _framed(header: dict[str, Any], request_id: RequestId | None, msg: str) -> bytes:
    if request_id is not None:
        header["id"] = request_id
    header["msg"] = msg
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return struct.pack(">H", len(raw)) + raw


_CRC16_ARC = anycrc.Model("CRC16-ARC")


def crc16_arc(data: bytes) -> int:
    """CRC-16/ARC (poly 0x8005 reflected, init 0, no final XOR), LinkSDK's `crc_ibm`; check value 0xBB3D.
    Computed by anycrc in C: a table loop in Python costs 8 ms per 128 KiB block."""
    return int(_CRC16_ARC.calc(data))

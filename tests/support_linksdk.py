"""A device that downloads firmware over MQTT the way LinkSDK C v4's `mqtt_download` component does.

Two layers, both written from the SDK's C sources (`components/ota/aiot_mqtt_download_api.c`,
`mqtt_download_private.h`, `core/utils/core_string.c`), step for step:

* `read_reply(payload)`: the checks of `_md_recv_data_reply_handler` on one `download_reply`, including
  LinkSDK's own JSON reader (`core_json_value`: first `"key"` in the text, value right after the `:`, no
  whitespace; `core_str2uint`: ASCII digits only) and the CRC read as a little-endian `uint16_t`.
  Unit tests use it to check that our frames pass the device's parser.
* `LinkSdkDownload`: the download state machine on a real MQTT connection (a `tests.support.Device`,
  paho-mqtt, real broker over TCP on loopback). Like the SDK it

  - subscribes to `/sys/{pk}/{dn}/thing/file/download_reply` at QoS 0 when the download starts, and never
    again (a reconnect with a clean session loses the subscription, as on a real LinkSDK device);
  - publishes on `/sys/{pk}/{dn}/thing/file/download` exactly LinkSDK's request text, trailing comma and all,
    with `id` a string counter from "1" and `size` the request size or the rest of the range;
  - on a reply that fails the header, length or CRC checks, or whose `code` is not 200: resends the same
    request; on a reply for another offset: ignores it and waits for the timeout;
  - after `recv_timeout_s` (10 s in the SDK) without an accepted block: resends; the 4th failure in a row
    ends the download (`FAILED_TIMEOUT`), a block past the end of the range ends it too (`FAILED_RECVERROR`);
  - starts at `range_start` (how an application resumes) and stops at `range_end` (exclusive, 0 = the end);
  - checks the MD5 of the whole file only for a full-range download with `Md5`, like the SDK;
  - reports progress on `/ota/device/progress/{pk}/{dn}` every 5 % (relative to the range), "100" on
    success, "-3" on a digest mismatch, "-4" on a timeout or receive error.

Usage (the broker side must have offered the device `streamId`/`streamFileId` for a file of `size` bytes):

    device = await env.device("pk", "dev1").connect()            # or linksdk_device(...) for a signed CONNECT
    download = LinkSdkDownload(device, stream_id=7, file_id=1, size_total=len(fw), md5=hashlib.md5(fw).hexdigest())
    result = await download.run(timeout_s=30)
    assert result.status is Status.SUCCESS and result.data == fw

`run` is bounded in time; `recv_timeout_s` may be shortened for tests that exercise timeouts.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import paho.mqtt.client as mqtt

from plugins.device_auth.signing import login_for
from plugins.ota.core.topics import DeviceRef
from tests.support import Device, eventually

DEFAULT_REQUEST_SIZE = 5 * 1024  # MQTT_DOWNLOAD_DEFAULT_REQUEST_SIZE
RECV_TIMEOUT_S = 10.0  # MQTT_DOWNLOAD_DEFAULT_RECV_TIMEOUT
REPORT_INTERVAL = 5  # MQTT_DOWNLOAD_REPORT_INTERNEL, in percent
MAX_FAILURES = 3  # _md_resend_request gives up when failed_counter > 3
STEP_CHECKSUM_MISMATCH = -3  # AIOT_OTAERR_CHECKSUM_MISMATCH
STEP_BURN_FAILED = -4  # AIOT_OTAERR_BURN_FAILED, reported on timeouts and receive errors


# ----------------------------------------------------------------------- LinkSDK's parsing, step for step


def json_value(text: bytes, key: str) -> bytes | None:
    """`core_json_value`: the raw value of the first `"key"` in `text`, or None when the lookup fails."""
    k = key.encode()
    n = len(text)
    for idx in range(n):
        if idx + len(k) >= n:
            return None
        if idx > 0 and text[idx : idx + len(k)] == k and text[idx - 1] == 0x22 and text[idx + len(k)] == 0x22:
            colon = idx + len(k) + 1
            if colon + 1 >= n or text[colon] != ord(":"):
                return None
            return _value_at(text, colon + 1)
    return None


def _value_at(text: bytes, idx: int) -> bytes | None:
    first = text[idx : idx + 1]
    if first == b'"':
        end = text.find(b'"', idx + 1)
        return None if end < 0 else text[idx + 1 : end]
    if first in (b"{", b"["):
        close = b"}" if first == b"{" else b"]"
        depth = 0
        for j in range(idx, len(text)):
            if text[j : j + 1] == first:
                depth += 1
            elif text[j : j + 1] == close:
                depth -= 1
                if depth == 0:
                    return text[idx : j + 1]
        return None
    for j in range(idx, len(text)):
        if text[j : j + 1] in (b",", b"]", b"}"):
            return text[idx:j]
    return None


def str2uint(value: bytes | None) -> int | None:
    """`core_str2uint`: ASCII digits only (its length is a uint8_t), else None."""
    if value is None or not value or len(value) > 255 or not all(0x30 <= b <= 0x39 for b in value):
        return None
    return int(value) & 0xFFFFFFFF


def crc_ibm(data: bytes) -> int:
    """LinkSDK's `crc_ibm`, computed bit by bit from its stated definition (poly 0x8005 reflected, init 0)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


@dataclass(frozen=True)
class Reply:
    """A `download_reply` the SDK accepted: its header fields and block."""

    code: int
    size: int
    offset: int
    file_length: int
    file_token: bytes | None
    data: bytes


class Refused(Enum):
    """Why the SDK's reply handler would resend instead of accepting."""

    HEADER = "header"  # a required header field missing or not digits, or code != 200
    LENGTH = "length"  # payload length != 2 + header + bSize + 2
    CRC = "crc"


def read_reply(payload: bytes) -> Reply | Refused:
    """`_md_recv_data_reply_handler` up to (not including) the offset check."""
    if len(payload) < 2:
        return Refused.LENGTH
    header_len = payload[0] << 8 | payload[1]
    header = payload[2 : 2 + header_len]
    code = str2uint(json_value(header, "code"))
    if code is None or code != 200:
        # A numeric code other than 200 leaves bSize unset in the C code; it then fails the length check in
        # practice. Either way the device resends.
        return Refused.HEADER
    data_obj = json_value(header, "data")
    if data_obj is None:
        return Refused.HEADER
    size = str2uint(json_value(data_obj, "bSize"))
    offset = str2uint(json_value(data_obj, "bOffset"))
    file_length = str2uint(json_value(data_obj, "fileLength"))
    if size is None or offset is None or file_length is None:
        return Refused.HEADER
    token = json_value(data_obj, "fileToken")
    if len(payload) != 2 + header_len + size + 2:
        return Refused.LENGTH
    data = payload[2 + header_len : 2 + header_len + size]
    (crc,) = struct.unpack("<H", payload[-2:])
    if crc != crc_ibm(data):
        return Refused.CRC
    return Reply(code, size, offset, file_length, token, data)


def request_payload(msg_id: int, stream_id: int, file_id: int, size: int, offset: int) -> bytes:
    """`_md_send_request`'s text, byte for byte (the comma after `fileId` included)."""
    return (
        f'{{"id":"{msg_id}","version":"1.0","params":{{"fileToken":"default",'
        f'"fileInfo":{{"streamId":{stream_id},"fileId":{file_id},}},'
        f'"fileBlock":{{"size":{size},"offset":{offset}}}}}}}'
    ).encode()


# ----------------------------------------------------------------------- the download state machine


class Status(Enum):
    INIT = "init"
    DOWNLOADING = "downloading"
    SUCCESS = "success"
    FAILED_TIMEOUT = "failed_timeout"
    FAILED_RECVERROR = "failed_recverror"
    FAILED_MISMATCH = "failed_mismatch"

    @property
    def finished(self) -> bool:
        return self not in (Status.INIT, Status.DOWNLOADING)


@dataclass
class Result:
    status: Status
    data: bytes
    requests: list[bytes]
    refused: list[Refused]
    ignored_offsets: list[int]
    steps: list[int]


@dataclass
class LinkSdkDownload:
    """One `mqtt_download` handle on `device`'s connection; see the module docstring."""

    device: Device
    stream_id: int
    file_id: int
    size_total: int
    md5: str | None = None
    request_size: int = DEFAULT_REQUEST_SIZE
    range_start: int = 0
    range_end: int = 0
    module: str | None = None
    recv_timeout_s: float = RECV_TIMEOUT_S
    clock: Callable[[], float] = time.monotonic
    status: Status = Status.INIT
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _msg_id: int = 0
    _fetched: int = 0
    _failures: int = 0
    _last_request: float = 0.0
    _last_percent: int = 0
    _range_size: int = 0
    _md5: Any = None
    _data: bytearray = field(default_factory=bytearray)
    _requests: list[bytes] = field(default_factory=list)
    _refused: list[Refused] = field(default_factory=list)
    _ignored: list[int] = field(default_factory=list)
    _steps: list[int] = field(default_factory=list)

    @property
    def request_topic(self) -> str:
        return f"/sys/{self.device.pk}/{self.device.dn}/thing/file/download"

    @property
    def reply_topic(self) -> str:
        return f"/sys/{self.device.pk}/{self.device.dn}/thing/file/download_reply"

    async def run(self, timeout_s: float = 60.0, poll_s: float = 0.02) -> Result:
        """Drive the download (like the demo's loop around `aiot_mqtt_download_process`) until it ends or
        `timeout_s` passes; the result says which."""
        for _ in range(max(1, int(timeout_s / poll_s))):
            if self.process():
                break
            await asyncio.sleep(poll_s)
        self.device.client.message_callback_remove(self.reply_topic)
        return self.result()

    def result(self) -> Result:
        with self._lock:
            return Result(
                self.status,
                bytes(self._data),
                list(self._requests),
                list(self._refused),
                list(self._ignored),
                list(self._steps),
            )

    def process(self) -> bool:
        """One call of `aiot_mqtt_download_process`; True once the download has ended."""
        with self._lock:
            if self.status is Status.INIT:
                self._start()
            elif self.status is Status.DOWNLOADING:
                if self.clock() - self._last_request > self.recv_timeout_s:
                    self._resend()
                percent = self._fetched * 100 // self._range_size
                if percent - self._last_percent >= REPORT_INTERVAL:
                    self._last_percent = percent
                    self._report(percent)
            if self.status is Status.SUCCESS and 100 not in self._steps:
                self._report(100)
            return self.status.finished

    def _start(self) -> None:
        end = self.range_end or self.size_total
        self._range_size = end - self.range_start
        if self._range_size <= 0:
            raise ValueError("empty range")
        self.device.client.message_callback_add(self.reply_topic, self._on_reply)
        self.device.client.subscribe(self.reply_topic, qos=0)
        if self._range_size == self.size_total and self.md5 is not None:
            self._md5 = hashlib.md5()
        self._send()
        self.status = Status.DOWNLOADING

    def _send(self) -> None:
        size = self.request_size
        if self.request_size + self._fetched > self._range_size:
            size = self._range_size - self._fetched
        self._msg_id += 1
        payload = request_payload(
            self._msg_id, self.stream_id, self.file_id, size, self._fetched + self.range_start
        )
        self._requests.append(payload)
        self.device.client.publish(self.request_topic, payload, qos=0)
        self._last_request = self.clock()

    def _resend(self) -> None:
        self._failures += 1
        if self._failures > MAX_FAILURES:
            self._end(Status.FAILED_TIMEOUT)
            return
        self._send()

    def _on_reply(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            if self.status is not Status.DOWNLOADING:
                return
            reply = read_reply(msg.payload)
            if isinstance(reply, Refused):
                self._refused.append(reply)
                self._resend()
                return
            if reply.offset != self._fetched + self.range_start:
                self._ignored.append(reply.offset)
                return
            self._fetched += reply.size
            self._data += reply.data
            if self._md5 is not None:
                self._md5.update(reply.data)
            self._failures = 0
            if self._fetched < self._range_size:
                self._send()
            elif self._fetched == self._range_size:
                self._finish()
            else:
                self._end(Status.FAILED_RECVERROR)

    def _finish(self) -> None:
        if self._md5 is not None and self._md5.hexdigest() != self.md5:
            self._end(Status.FAILED_MISMATCH)
        else:
            self.status = Status.SUCCESS

    def _end(self, status: Status) -> None:
        self.status = status
        step = STEP_CHECKSUM_MISMATCH if status is Status.FAILED_MISMATCH else STEP_BURN_FAILED
        self._report(step)

    def _report(self, step: int) -> None:
        """`_download_report_progress` through `_ota_publish_base` (its text, space before "params")."""
        self._steps.append(step)
        params = f'{{"step":"{step}","desc":""' + (f',"module":"{self.module}"' if self.module else "") + "}"
        payload = f'{{"id":{self._msg_id + 1000}, "params":{params}}}'
        self.device.client.publish(f"/ota/device/progress/{self.device.pk}/{self.device.dn}", payload, qos=0)

    async def reconnect(self) -> None:
        """Drop the connection and connect again with a clean session, without subscribing again: what a
        LinkSDK device does after a network loss (the download handle keeps its place)."""
        self.device.disconnect()
        # paho 1.x's loop_start makes a new wake-up socket pair without closing the last one's
        self.device.client._reset_sockets(sockpair_only=True)
        self.device.client.connect("127.0.0.1", self.device.port, keepalive=30)
        self.device.client.loop_start()
        await eventually(self.device.client.is_connected, what=f"{self.device.ref} to reconnect")


def linksdk_device(port: int, device: DeviceRef, secret: str) -> Device:
    """A `tests.support.Device` that logs in with an Aliyun-signed CONNECT (hmacsha256, securemode=3)."""
    login = login_for(device, secret)
    d = Device(port, device.product_key, device.device_name, client_id=login.client_id)
    d.client.username_pw_set(login.username, login.password)
    return d

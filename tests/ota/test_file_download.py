"""The MQTT block download (plugins/ota/blocks.py) against LinkSDK C v4's own rules.

Frames are checked with `tests.support_linksdk.read_reply`, which follows `_md_recv_data_reply_handler` and
LinkSDK's JSON reader step for step, so "the device accepts it" is tested, not just "it is JSON".
"""

from __future__ import annotations

import json
import struct

import crcmod.predefined  # type: ignore[import-untyped]  # installed with aliyun-iot-linkkit
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.ota.core.blocks import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    MAX_FILE_SIZE,
    Block,
    BlockRequest,
    Rejection,
    ReplyCode,
    StreamFile,
    crc16_arc,
    decide,
    error_frame,
    parse_request,
    reply_frame,
)
from plugins.ota.core.topics import DeviceRef
from tests.support_linksdk import Refused, Reply, crc_ibm, json_value, read_reply, request_payload

CRCMOD_ARC = crcmod.predefined.mkCrcFun("crc-16")  # crcmod's name for CRC-16/ARC
DEV = DeviceRef("pk", "dev1")
OTHER = DeviceRef("pk", "dev2")
LINKSDK_REQUEST = (
    b'{"id":"1","version":"1.0","params":{"fileToken":"default","fileInfo":{"streamId":1397345,"fileId":1,},'
    b'"fileBlock":{"size":5120,"offset":0}}}'
)


def firmware(length: int) -> bytes:
    return bytes((i * 31 + 7) & 0xFF for i in range(length))


def stream(length: int, device: DeviceRef = DEV) -> StreamFile:
    return StreamFile(stream_id=7, file_id=1, length=length, device=device)


def request(
    size: int, offset: int, stream_id: int = 7, file_id: int = 1, rid: str | int = "1"
) -> BlockRequest:
    return BlockRequest(rid, "default", stream_id, file_id, size, offset)


def served(length: int, size: int, offset: int) -> tuple[Block, bytes]:
    block = decide(request(size, offset), DEV, stream(length))
    assert isinstance(block, Block), block
    return block, reply_frame(block, firmware(length)[block.offset : block.end])


# ------------------------------------------------------------------------------------------- CRC


def test_crc_is_crc16_arc_with_its_check_value() -> None:
    """The block CRC is CRC-16/ARC: crc("123456789") == 0xBB3D."""
    assert crc16_arc(b"123456789") == 0xBB3D
    assert crc16_arc(b"") == 0


@given(st.binary(max_size=2048))
def test_crc_matches_crcmod_and_the_bitwise_definition(data: bytes) -> None:
    """Our table CRC equals crcmod's 'crc-16' (ARC) and LinkSDK's definition computed bit by bit."""
    assert crc16_arc(data) == CRCMOD_ARC(data) == crc_ibm(data)


# ------------------------------------------------------------------------------------------- requests


def test_linksdk_request_with_its_trailing_comma_parses() -> None:
    """LinkSDK v4's request text (a comma before `}` after fileId) parses into its fields."""
    assert parse_request(LINKSDK_REQUEST) == BlockRequest("1", "default", 1397345, 1, 5120, 0)
    assert parse_request(request_payload(3, 9, 2, 100, 5120)) == BlockRequest("3", "default", 9, 2, 100, 5120)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            b'{"id":42,"params":{"fileInfo":{"streamId":"7","fileId":"1"},"fileBlock":{"size":"10","offset":"0"}}}',
            BlockRequest(42, "default", 7, 1, 10, 0),
        ),
        (
            b'{ "params" : { "fileInfo" : { "streamId" : 7 , "fileId" : 1 , } , '
            b'"fileBlock" : { "size" : 10 , "offset" : 20 , } , } , }',
            BlockRequest(None, "default", 7, 1, 10, 20),
        ),
        (
            b'{"id":"9","params":{"fileToken":"tok","fileInfo":{"streamId":7,"fileId":1},'
            b'"fileBlock":{"size":1,"offset":4294967295}},"extra":[1,2,]}',
            BlockRequest("9", "tok", 7, 1, 1, 2**32 - 1),
        ),
    ],
)
def test_lenient_request_forms_parse(payload: bytes, expected: BlockRequest) -> None:
    """Integer or string ids and numbers, absent id/fileToken, whitespace and trailing commas are accepted."""
    assert parse_request(payload) == expected


def test_commas_inside_strings_are_kept() -> None:
    """Only trailing commas outside strings are dropped: a string's `,}` stays (and a bad token is refused)."""
    payload = (
        b'{"id":"a\\",}","params":{"fileInfo":{"streamId":7,"fileId":1,},"fileBlock":{"size":1,"offset":0}}}'
    )
    parsed = parse_request(payload)
    assert isinstance(parsed, BlockRequest) and parsed.id == 'a",}'


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[1,2]",
        b'{"id":"1"}',
        b'{"id":"1","params":{"fileInfo":{"streamId":7,"fileId":1}}}',
        b'{"id":"1","params":{"fileInfo":{"streamId":7},"fileBlock":{"size":1,"offset":0}}}',
        b'{"id":"1","params":{"fileInfo":{"streamId":-7,"fileId":1},"fileBlock":{"size":1,"offset":0}}}',
        b'{"id":"1","params":{"fileInfo":{"streamId":7,"fileId":1},"fileBlock":{"size":true,"offset":0}}}',
        b'{"id":"1","params":{"fileInfo":{"streamId":7,"fileId":1},"fileBlock":{"size":1.5,"offset":0}}}',
        b'{"id":"1","params":{"fileInfo":{"streamId":7,"fileId":1},"fileBlock":{"size":1,"offset":4294967296}}}',
        b'{"id":"1","params":{"fileInfo":{"streamId":"0x7","fileId":1},"fileBlock":{"size":1,"offset":0}}}',
        b'{"id":"1","params":{"fileToken":"a\\"b","fileInfo":{"streamId":7,"fileId":1},'
        b'"fileBlock":{"size":1,"offset":0}}}',
        b'{"id":[1],"params":{"fileInfo":{"streamId":7,"fileId":1},"fileBlock":{"size":1,"offset":0}}}',
        b'{"id":"1","params":{"fileInfo":{"streamId":7,"fileId":1},"fileBlock":{"size":1,"offset":0}},"p":"'
        + b"x" * 1024
        + b'"}',
    ],
)
def test_malformed_requests_are_rejected_as_bad_requests(payload: bytes) -> None:
    """Anything that is not a block request is a 400 rejection with a reason, never an exception."""
    rejected = parse_request(payload)
    assert isinstance(rejected, Rejection) and rejected.code is ReplyCode.BAD_REQUEST and rejected.msg


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_parse_never_raises(payload: bytes) -> None:
    """Whatever bytes arrive, parsing gives a request or a rejection."""
    assert isinstance(parse_request(payload), BlockRequest | Rejection)


# ------------------------------------------------------------------------------------------- deciding


@pytest.mark.parametrize(
    ("req", "found", "code"),
    [
        (request(10, 0), None, ReplyCode.NOT_FOUND),
        (request(10, 0, stream_id=8), stream(100), ReplyCode.NOT_FOUND),
        (request(10, 0, file_id=2), stream(100), ReplyCode.NOT_FOUND),
        (request(10, 0), stream(100, OTHER), ReplyCode.FORBIDDEN),
        (request(10, 0), stream(MAX_FILE_SIZE + 1), ReplyCode.FILE_TOO_LARGE),
        (request(0, 0), stream(100), ReplyCode.BAD_REQUEST),
        (request(MAX_BLOCK_SIZE + 1, 0), stream(10**6), ReplyCode.BAD_REQUEST),
        (request(10, 100), stream(100), ReplyCode.OUT_OF_RANGE),
        (request(10, 2**32 - 1), stream(100), ReplyCode.OUT_OF_RANGE),
    ],
)
def test_requests_that_cannot_be_served_are_refused(
    req: BlockRequest, found: StreamFile | None, code: ReplyCode
) -> None:
    """Unknown stream or file, another device's stream, a file over 16 MB, a bad block size and an offset at
    or past the end each get their own error code, with the request id kept for the reply."""
    refused = decide(req, DEV, found)
    assert isinstance(refused, Rejection) and refused.code is code and refused.request_id == req.id
    assert refused.msg.isascii() and refused.msg


@settings(max_examples=300)
@given(
    length=st.integers(1, MAX_FILE_SIZE),
    size=st.integers(1, MAX_BLOCK_SIZE),
    data=st.data(),
)
def test_a_served_block_never_passes_the_end(length: int, size: int, data: st.DataObject) -> None:
    """Any offset inside the file gets min(size, rest) bytes from that offset; exactly 16 MB is allowed."""
    offset = data.draw(st.integers(0, length - 1))
    block = decide(request(size, offset), DEV, stream(length))
    assert block == Block("1", "default", length, offset, min(size, length - offset))


# ------------------------------------------------------------------------------------------- frames


@settings(max_examples=150)
@given(
    length=st.integers(1, 3 * MAX_BLOCK_SIZE),
    size=st.integers(1, MAX_BLOCK_SIZE),
    data=st.data(),
)
def test_reply_frames_pass_linksdks_reply_handler(length: int, size: int, data: st.DataObject) -> None:
    """Every frame we build passes the SDK's header, length and CRC checks and carries the asked bytes."""
    offset = data.draw(st.integers(0, length - 1))
    block, frame = served(length, size, offset)
    reply = read_reply(frame)
    assert reply == Reply(
        200, block.size, offset, length, b"default", firmware(length)[offset : offset + block.size]
    )


def test_frame_layout_is_be_length_compact_header_block_le_crc() -> None:
    """Header length big-endian, compact JSON header with code/data/id/msg, the block, CRC little-endian."""
    _block, frame = served(10_000, DEFAULT_BLOCK_SIZE, 5120)
    (header_len,) = struct.unpack(">H", frame[:2])
    header = frame[2 : 2 + header_len]
    assert b" " not in header
    assert json.loads(header) == {
        "code": 200,
        "data": {"fileLength": 10_000, "bSize": 4880, "bOffset": 5120, "fileToken": "default"},
        "id": "1",
        "msg": "success",
    }
    body = frame[2 + header_len : -2]
    assert body == firmware(10_000)[5120:]
    assert frame[-2:] == struct.pack("<H", crc16_arc(body))


def test_the_sdk_reader_refuses_what_linksdk_would() -> None:
    """The test-side reader is strict where LinkSDK is: spaced JSON, a big-endian CRC, a short frame."""
    _block, frame = served(100, 100, 0)
    header_len = frame[0] << 8 | frame[1]
    header = json.loads(frame[2 : 2 + header_len])
    spaced = json.dumps(header).encode()
    assert read_reply(struct.pack(">H", len(spaced)) + spaced + frame[2 + header_len :]) is Refused.HEADER
    swapped = frame[:-2] + frame[-2:][::-1]
    assert frame[-2] != frame[-1] and read_reply(swapped) is Refused.CRC
    assert read_reply(frame[:-1]) is Refused.LENGTH


@given(
    token=st.from_regex(r"[A-Za-z0-9 _.\-@#%+=/!?~]{1,64}", fullmatch=True),
    rid=st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=64)
    | st.integers(0, 2**63 - 1),
)
def test_echoed_id_and_token_do_not_confuse_the_sdk_reader(token: str, rid: str | int) -> None:
    """Whatever id and accepted fileToken a device sends, LinkSDK still reads code, bSize and bOffset."""
    payload = json.dumps(
        {
            "id": rid,
            "params": {
                "fileToken": token,
                "fileInfo": {"streamId": 7, "fileId": 1},
                "fileBlock": {"size": 5, "offset": 3},
            },
        }
    ).encode()
    req = parse_request(payload)
    assert isinstance(req, BlockRequest)
    block = decide(req, DEV, stream(100))
    assert isinstance(block, Block)
    reply = read_reply(reply_frame(block, firmware(100)[3:8]))
    assert isinstance(reply, Reply) and (reply.size, reply.offset) == (5, 3)


@pytest.mark.parametrize("code", [c for c in ReplyCode if c is not ReplyCode.OK])
def test_error_frames_carry_a_code_and_message_and_make_linksdk_resend(code: ReplyCode) -> None:
    """An error reply is a framed compact header with code != 200, the id and a msg; the SDK refuses it
    (so it resends and, after four failures, gives up) rather than taking it as data."""
    frame = error_frame(Rejection(code, "file size has exceeded the limit 16 MB", "5"))
    (header_len,) = struct.unpack(">H", frame[:2])
    assert len(frame) == 2 + header_len
    assert json.loads(frame[2:]) == {
        "code": int(code),
        "id": "5",
        "msg": "file size has exceeded the limit 16 MB",
    }
    assert json_value(frame[2:], "code") == str(int(code)).encode()
    assert read_reply(frame) is Refused.HEADER


@settings(max_examples=60)
@given(
    length=st.integers(1, 200_000), request_size=st.sampled_from([1024, DEFAULT_BLOCK_SIZE, 10 * 1024, 65536])
)
def test_linksdks_request_sequence_downloads_the_whole_file(length: int, request_size: int) -> None:
    """Following LinkSDK's loop (size = request size or the rest, offset = bytes fetched) over our parser,
    decision and frames yields the file byte for byte."""
    fw = firmware(length)
    got = bytearray()
    for msg_id in range(1, length // request_size + 3):
        if len(got) == length:
            break
        size = min(request_size, length - len(got))
        req = parse_request(request_payload(msg_id, 7, 1, size, len(got)))
        assert isinstance(req, BlockRequest)
        block = decide(req, DEV, stream(length))
        assert isinstance(block, Block)
        reply = read_reply(reply_frame(block, fw[block.offset : block.end]))
        assert isinstance(reply, Reply) and reply.offset == len(got)
        got += reply.data
    assert bytes(got) == fw


def test_reply_frame_refuses_bytes_that_do_not_match_the_block() -> None:
    """Building a frame with the wrong number of bytes is a programming error, caught before sending."""
    block, _frame = served(100, 10, 0)
    with pytest.raises(ValueError, match="10 bytes expected"):
        reply_frame(block, b"short")

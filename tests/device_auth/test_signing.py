"""Aliyun one-device-one-secret CONNECT signing: `DeviceCredentials.parse`, `verify`, `login_for`.

Every reference signature here is computed independently with hmac/hashlib, exactly as each Aliyun device
SDK builds its clientId, username and password (see the reference notes §1.11), never with `sign()`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.device_auth.signing import (
    CredentialsError,
    DeviceCredentials,
    Refusal,
    login_for,
    verify,
)
from plugins.ota.core.topics import DeviceRef

PK, DN = "a1B2c3D4e5F", "dev-01"
SECRET = "q8Zk3nT0vWb5RfYh2LmXc7PsDaE4GjUo"
OTHER_DN, OTHER_SECRET = "dev-02", "Hn6Vx1Qe9KtBz4WmRs0LpYc3JdFa8GuO"
V3_TIMESTAMP = "2524608000000"  # the fixed timestamp iotkit-embedded v3 and Link SDK C v4 send
HASHES: dict[str, Callable[..., Any]] = {
    "hmacmd5": hashlib.md5,
    "hmacsha1": hashlib.sha1,
    "hmacsha256": hashlib.sha256,
}


@dataclass(frozen=True)
class Login:
    """The three CONNECT fields a device sends."""

    client_id: str
    username: str
    password: str | bytes | None


def reference_password(
    secret: str, id_part: str, dn: str, pk: str, timestamp: str | None, method: str, upper: bool = False
) -> str:
    """hex(HMAC(secret, "clientId<id>deviceName<dn>productKey<pk>[timestamp<ts>]")), as the SDKs do it."""
    content = f"clientId{id_part}deviceName{dn}productKey{pk}"
    if timestamp is not None:
        content += f"timestamp{timestamp}"
    digest = hmac.new(secret.encode("utf-8"), content.encode("utf-8"), HASHES[method]).hexdigest()
    return digest.upper() if upper else digest


def python_linkkit(
    secret: str = SECRET, pk: str = PK, dn: str = DN, timestamp: str | None = None, securemode: int = 3
) -> Login:
    """aliyun-iot-linkkit 1.2.13 (`LinkKit.__config_mqtt_client_internal`): `pk&dn`, hmacsha1, unix seconds,
    lowercase hex."""
    ts = timestamp if timestamp is not None else str(int(time.time()))
    client_id = (
        f"{pk}&{dn}|securemode={securemode},signmethod=hmacsha1,ext=1,_ss=1,lan=Python,_v=1.2.13,"
        f"timestamp={ts}|"
    )
    return Login(client_id, f"{dn}&{pk}", reference_password(secret, f"{pk}&{dn}", dn, pk, ts, "hmacsha1"))


def iotkit_v3(secret: str = SECRET, pk: str = PK, dn: str = DN, method: str = "hmacsha256") -> Login:
    """iotkit-embedded v3 (`dev_sign_mqtt.c`): `pk.dn`, the fixed timestamp, UPPERCASE hex."""
    client_id = (
        f"{pk}.{dn}|timestamp={V3_TIMESTAMP},_ss=1,_v=sdk-c-3.0.1,securemode=3,signmethod={method},lan=C|"
    )
    password = reference_password(secret, f"{pk}.{dn}", dn, pk, V3_TIMESTAMP, method, upper=True)
    return Login(client_id, f"{dn}&{pk}", password)


def link_sdk_v4(secret: str = SECRET, pk: str = PK, dn: str = DN, conn_first: bool = False) -> Login:
    """Link SDK C v4 (`core_auth_mqtt_clientid` + `_core_mqtt_add_netstats_extend`): an extra, unsigned
    `_conn=tls_<hex>` pair in the clientId; uppercase hex."""
    if conn_first:
        params = (
            f"timestamp={V3_TIMESTAMP},_conn=tls_1a2b,_ss=1,_v=sdk-c-4.1.0,securemode=2,signmethod=hmacsha256"
        )
    else:
        params = (
            f"timestamp={V3_TIMESTAMP},_ss=1,_v=sdk-c-4.1.0,securemode=2,signmethod=hmacsha256,ext=3,"
            "_conn=tls_1a2b"
        )
    password = reference_password(secret, f"{pk}.{dn}", dn, pk, V3_TIMESTAMP, "hmacsha256", upper=True)
    return Login(f"{pk}.{dn}|{params}|", f"{dn}&{pk}", password)


def hmacmd5_login(secret: str = SECRET, pk: str = PK, dn: str = DN) -> Login:
    """An hmacmd5 device (older C SDKs), with a millisecond timestamp, lowercase hex."""
    ts = "1732851000123"
    client_id = f"{pk}.{dn}|securemode=3,signmethod=hmacmd5,timestamp={ts}|"
    return Login(client_id, f"{dn}&{pk}", reference_password(secret, f"{pk}.{dn}", dn, pk, ts, "hmacmd5"))


def no_timestamp_login(secret: str = SECRET, pk: str = PK, dn: str = DN) -> Login:
    """A device that sends no timestamp at all: the signed content then has no `timestamp` pair."""
    client_id = f"{pk}.{dn}|securemode=2,signmethod=hmacsha256|"
    password = reference_password(secret, f"{pk}.{dn}", dn, pk, None, "hmacsha256")
    return Login(client_id, f"{dn}&{pk}", password)


SDK_LOGINS: dict[str, Callable[..., Login]] = {
    "python-linkkit": python_linkkit,
    "python-linkkit-tls": lambda **kw: python_linkkit(securemode=2, **kw),
    "iotkit-v3-sha256": iotkit_v3,
    "iotkit-v3-sha1": lambda **kw: iotkit_v3(method="hmacsha1", **kw),
    "iotkit-v3-md5": lambda **kw: iotkit_v3(method="hmacmd5", **kw),
    "link-sdk-v4": link_sdk_v4,
    "link-sdk-v4-conn-after-timestamp": lambda **kw: link_sdk_v4(conn_first=True, **kw),
    "hmacmd5": hmacmd5_login,
    "no-timestamp": no_timestamp_login,
}


def parse(login: Login) -> DeviceCredentials:
    return DeviceCredentials.parse(login.client_id, login.username, login.password)


def refusal_of(client_id: str | None, username: str | None, password: str | bytes | None) -> Refusal:
    with pytest.raises(CredentialsError) as info:
        DeviceCredentials.parse(client_id, username, password)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(str(info.value.refusal))
    return info.value.refusal


# ------------------------------------------------------------------------------- SDK signatures verify


@pytest.mark.parametrize("sdk", SDK_LOGINS)
def test_sdk_signature_verifies_with_the_device_secret(sdk: str) -> None:
    """A CONNECT signed exactly as this SDK signs it parses to the right device and verifies with its secret."""
    login = SDK_LOGINS[sdk]()
    creds = parse(login)
    assert creds.device == DeviceRef(PK, DN)
    assert verify(creds, SECRET)


@pytest.mark.parametrize("sdk", SDK_LOGINS)
def test_sdk_signature_is_refused_with_a_wrong_secret(sdk: str) -> None:
    """The same CONNECT does not verify against a wrong secret or another device's secret."""
    creds = parse(SDK_LOGINS[sdk]())
    assert not verify(creds, "not-the-secret")
    assert not verify(creds, OTHER_SECRET)
    assert not verify(creds, SECRET[:-1])
    assert not verify(creds, "")


@pytest.mark.parametrize("sdk", SDK_LOGINS)
def test_signature_signed_with_another_devices_secret_is_refused(sdk: str) -> None:
    """A device that signs its own login with another device's secret does not verify with its own."""
    creds = parse(SDK_LOGINS[sdk](secret=OTHER_SECRET))
    assert not verify(creds, SECRET)


@pytest.mark.parametrize("sdk", SDK_LOGINS)
def test_tampered_client_id_part_is_refused(sdk: str) -> None:
    """Changing the `<id>` part before the first '|' (the password unchanged) breaks the signature."""
    login = SDK_LOGINS[sdk]()
    id_part, rest = login.client_id.split("|", 1)
    for changed in (
        id_part + "x",
        id_part[:-1],
        id_part.replace(DN, OTHER_DN),
        " " + id_part,
        id_part.upper(),
    ):
        creds = parse(Login(f"{changed}|{rest}", login.username, login.password))
        assert creds.client_id_part == changed
        assert not verify(creds, SECRET), changed


@pytest.mark.parametrize("sdk", [name for name in SDK_LOGINS if name != "no-timestamp"])
def test_tampered_timestamp_is_refused(sdk: str) -> None:
    """Changing the signed timestamp, or dropping it, breaks the signature."""
    login = SDK_LOGINS[sdk]()
    creds = parse(login)
    assert creds.timestamp is not None
    ts = creds.timestamp
    for changed in (str(int(ts) + 1), ts + "0", ts[:-1]):
        tampered = login.client_id.replace(f"timestamp={ts}", f"timestamp={changed}")
        assert parse(Login(tampered, login.username, login.password)).timestamp == changed
        assert not verify(parse(Login(tampered, login.username, login.password)), SECRET), changed
    dropped = login.client_id.replace(f"timestamp={ts},", "").replace(f",timestamp={ts}", "")
    assert "timestamp" not in dropped
    assert not verify(parse(Login(dropped, login.username, login.password)), SECRET)


def test_adding_a_timestamp_to_an_untimed_login_is_refused() -> None:
    """A login signed without a timestamp does not verify once a timestamp is added to its clientId."""
    login = no_timestamp_login()
    tampered = login.client_id.replace("signmethod=hmacsha256", "signmethod=hmacsha256,timestamp=1")
    assert not verify(parse(Login(tampered, login.username, login.password)), SECRET)


@pytest.mark.parametrize("sdk", SDK_LOGINS)
def test_username_naming_another_device_is_refused(sdk: str) -> None:
    """The same clientId and password under a username naming another device verify with neither secret."""
    login = SDK_LOGINS[sdk]()
    for username in (f"{OTHER_DN}&{PK}", f"{DN}&b2OtherPK"):
        creds = parse(Login(login.client_id, username, login.password))
        assert creds.device != DeviceRef(PK, DN)
        assert not verify(creds, OTHER_SECRET)
        assert not verify(creds, SECRET)


@pytest.mark.parametrize("sdk", SDK_LOGINS)
def test_tampered_sign_method_is_refused(sdk: str) -> None:
    """Naming another signmethod than the one the password was made with breaks the signature."""
    login = SDK_LOGINS[sdk]()
    creds = parse(login)
    for other in set(HASHES) - {creds.sign_method}:
        tampered = login.client_id.replace(f"signmethod={creds.sign_method}", f"signmethod={other}")
        assert not verify(parse(Login(tampered, login.username, login.password)), SECRET), other


def test_unsigned_parameters_may_change_without_breaking_the_signature() -> None:
    """Only `<id>`, deviceName, productKey and timestamp are signed: `_v`, `lan`, `_conn`, `securemode`... are not."""
    login = link_sdk_v4()
    tampered = (
        login.client_id.replace("_conn=tls_1a2b", "_conn=tcp_ffff")
        .replace("_v=sdk-c-4.1.0", "_v=sdk-c-4.2.0")
        .replace("securemode=2", "securemode=3")
    )
    creds = parse(Login(tampered, login.username, login.password))
    assert creds.params["_conn"] == "tcp_ffff"
    assert verify(creds, SECRET)


@pytest.mark.parametrize("case", ["lower", "upper", "mixed"])
def test_hex_is_compared_without_regard_to_case(case: str) -> None:
    """The password's hex digits are accepted in lower, upper or mixed case."""
    login = python_linkkit()
    assert isinstance(login.password, str)
    password = {
        "lower": login.password.lower(),
        "upper": login.password.upper(),
        "mixed": "".join(c.upper() if i % 2 else c for i, c in enumerate(login.password)),
    }[case]
    assert verify(parse(Login(login.client_id, login.username, password)), SECRET)


@pytest.mark.parametrize(
    "password",
    ["", None, "00" * 20, b"", "zz" * 20],
    ids=["empty", "none", "zeros", "empty-bytes", "not-hex"],
)
def test_missing_or_wrong_password_is_refused(password: str | bytes | None) -> None:
    """An empty, absent or made-up password never verifies."""
    login = python_linkkit()
    assert not verify(parse(Login(login.client_id, login.username, password)), SECRET)


def test_truncated_or_extended_password_is_refused() -> None:
    """A prefix of the right hex, or the right hex with more digits after it, does not verify."""
    login = iotkit_v3()
    assert isinstance(login.password, str)
    for password in (login.password[:-1], login.password[:32], login.password + "0", login.password * 2):
        assert not verify(parse(Login(login.client_id, login.username, password)), SECRET)


def test_password_as_ascii_bytes_is_accepted() -> None:
    """A password given as ASCII bytes (as amqtt may hand it over) verifies like the same text."""
    login = python_linkkit()
    assert isinstance(login.password, str)
    creds = parse(Login(login.client_id, login.username, login.password.encode("ascii")))
    assert creds.password == login.password
    assert verify(creds, SECRET)


def test_parse_exposes_the_clientid_parameters() -> None:
    """parse() keeps the sign method, the timestamp and every clientId parameter of the Python SDK's CONNECT."""
    creds = parse(python_linkkit(timestamp="1732851000"))
    assert creds.device == DeviceRef(PK, DN)
    assert creds.client_id_part == f"{PK}&{DN}"
    assert creds.sign_method == "hmacsha1"
    assert creds.timestamp == "1732851000"
    assert creds.params == {
        "securemode": "3",
        "signmethod": "hmacsha1",
        "ext": "1",
        "_ss": "1",
        "lan": "Python",
        "_v": "1.2.13",
        "timestamp": "1732851000",
    }
    assert parse(no_timestamp_login()).timestamp is None


# -------------------------------------------------------------------------------- the <id> part verbatim


@pytest.mark.parametrize(
    "id_part",
    [
        f"{PK}&{DN}",
        f"{PK}.{DN}",
        "my device 01",
        f"{PK}.{DN}.sub",
        "a&b&c",
        "x=y,z",
        " lead-and-trail ",
        "é-dev",
    ],
)
def test_client_id_part_is_used_verbatim(id_part: str) -> None:
    """The `<id>` before the first '|' is signed exactly as sent, with its '&', '.', '=', ',' and spaces."""
    ts = "1732851000"
    client_id = f"{id_part}|securemode=3,signmethod=hmacsha256,timestamp={ts}|"
    login = Login(client_id, f"{DN}&{PK}", reference_password(SECRET, id_part, DN, PK, ts, "hmacsha256"))
    creds = parse(login)
    assert creds.client_id_part == id_part
    assert creds.params == {"securemode": "3", "signmethod": "hmacsha256", "timestamp": ts}
    assert verify(creds, SECRET)
    rest = client_id.split("|", 1)[1]
    for changed in {id_part.strip(), id_part + "x", id_part.replace("&", ".")} - {id_part}:
        assert not verify(parse(Login(f"{changed}|{rest}", login.username, login.password)), SECRET), changed


# -------------------------------------------------------------------------------------- parse errors


@pytest.mark.parametrize(
    "client_id",
    [
        f"{PK}.{DN}",
        f"{PK}.{DN}|securemode=3,signmethod=hmacsha1",
        f"{PK}.{DN}|securemode=3,signmethod=hmacsha1|x",
        f"{PK}.{DN}|securemode=3,signmethod=hmacsha1| ",
        f"|{PK}.{DN}",
        "",
        None,
    ],
    ids=[
        "no-pipes",
        "one-pipe",
        "text-after-last-pipe",
        "space-after-last-pipe",
        "one-leading-pipe",
        "empty",
        "none",
    ],
)
def test_client_id_without_its_parameters_is_malformed(client_id: str | None) -> None:
    """A clientId without the `<id>|k=v,...|` frame is refused as a malformed clientId."""
    assert refusal_of(client_id, f"{DN}&{PK}", "00") is Refusal.MALFORMED_CLIENT_ID


@pytest.mark.parametrize(
    "middle",
    [
        "securemode=3,signmethod=hmacsha1,junk",
        "securemode,signmethod=hmacsha1",
        "securemode=3,=hmacsha1,signmethod=hmacsha1",
        "signmethod=hmacsha1,timestamp",
    ],
    ids=["bare-word", "key-without-value-sign", "empty-key", "bare-timestamp"],
)
def test_parameter_without_equals_sign_is_malformed(middle: str) -> None:
    """A clientId parameter that is not `k=v` is refused as a malformed clientId."""
    assert refusal_of(f"{PK}.{DN}|{middle}|", f"{DN}&{PK}", "00") is Refusal.MALFORMED_CLIENT_ID


@pytest.mark.parametrize(
    "middle",
    [
        "securemode=3",
        "securemode=3,timestamp=1",
        "securemode=3,signmethod=hmacsha512",
        "securemode=3,signmethod=sha256",
        "securemode=3,signmethod=",
        "securemode=3,signmethod=md5",
        "",
    ],
    ids=["missing", "missing-with-timestamp", "hmacsha512", "sha256", "empty", "md5", "no-parameters"],
)
def test_unknown_or_missing_sign_method_is_refused(middle: str) -> None:
    """A clientId whose signmethod is absent or not hmacmd5/hmacsha1/hmacsha256 is refused as unsupported."""
    assert refusal_of(f"{PK}.{DN}|{middle}|", f"{DN}&{PK}", "00") is Refusal.UNSUPPORTED_SIGN_METHOD


@pytest.mark.parametrize(
    "username",
    [DN, f"{DN}&{PK}&x", f"{DN}&&{PK}", "", None, f"{PK}", f"&{PK}", f"{DN}&", f"d/n&{PK}", f"{DN}&p+k"],
    ids=["no-amp", "two-amps", "double-amp", "empty", "none", "pk-only", "no-dn", "no-pk", "slash", "plus"],
)
def test_username_not_naming_one_device_is_malformed(username: str | None) -> None:
    """A username that is not exactly `<deviceName>&<productKey>` (one '&', valid names) is refused."""
    login = iotkit_v3()
    assert refusal_of(login.client_id, username, login.password) is Refusal.MALFORMED_USERNAME


@pytest.mark.parametrize("password", [b"\xff\xfe" * 20, "é".encode() * 20, b"abc\x80def"])
def test_non_ascii_password_bytes_are_a_bad_signature(password: bytes) -> None:
    """Password bytes that are not ASCII are refused as a bad signature (never decoded or echoed)."""
    login = iotkit_v3()
    assert refusal_of(login.client_id, login.username, password) is Refusal.BAD_SIGNATURE


def test_credentials_error_names_the_refusal_not_the_secret() -> None:
    """A CredentialsError carries its Refusal and its text starts with the refusal's wording."""
    error = CredentialsError(Refusal.BAD_SIGNATURE, "a1/dev")
    assert error.refusal is Refusal.BAD_SIGNATURE
    assert str(error) == "bad signature: a1/dev"
    assert str(CredentialsError(Refusal.UNKNOWN_DEVICE)) == "unknown device"


# ------------------------------------------------------------------------------------------- login_for


@pytest.mark.parametrize("method", sorted(HASHES))
@pytest.mark.parametrize("timestamp", [None, "1732851000", V3_TIMESTAMP])
@pytest.mark.parametrize("client_id_part", [None, f"{PK}&{DN}", "fleet sim 7"])
def test_login_for_round_trips_through_parse_and_verify(
    method: str, timestamp: str | None, client_id_part: str | None
) -> None:
    """login_for's fields parse back to the device and verify with its secret, and only with its secret."""
    device = DeviceRef(PK, DN)
    login = login_for(device, SECRET, client_id_part=client_id_part, method=method, timestamp=timestamp)
    creds = DeviceCredentials.parse(login.client_id, login.username, login.password)
    id_part = client_id_part or f"{PK}.{DN}"
    assert creds.device == device
    assert creds.client_id_part == id_part
    assert creds.sign_method == method
    assert creds.timestamp == timestamp
    assert login.username == f"{DN}&{PK}"
    assert login.password == reference_password(SECRET, id_part, DN, PK, timestamp, method)
    assert verify(creds, SECRET)
    assert not verify(creds, OTHER_SECRET)


def test_login_for_default_is_a_plain_tcp_sha256_login() -> None:
    """login_for's defaults: clientId `pk.dn|securemode=3,signmethod=hmacsha256|`, no timestamp."""
    login = login_for(DeviceRef(PK, DN), SECRET)
    assert login.client_id == f"{PK}.{DN}|securemode=3,signmethod=hmacsha256|"
    assert login.password == reference_password(SECRET, f"{PK}.{DN}", DN, PK, None, "hmacsha256")


def test_login_for_with_an_empty_timestamp_round_trips() -> None:
    """login_for(timestamp="") yields fields that verify (the empty timestamp is either sent or not signed)."""
    login = login_for(DeviceRef(PK, DN), SECRET, timestamp="")
    creds = DeviceCredentials.parse(login.client_id, login.username, login.password)
    assert verify(creds, SECRET)


_LEVEL = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=12)
_NAME = st.text("abcXYZ019_.:@-", min_size=1, max_size=16)


@settings(max_examples=200, deadline=None)
@given(
    pk=_NAME,
    dn=_NAME,
    secret=st.text(min_size=1, max_size=64),
    id_part=st.text(st.characters(exclude_characters="|", exclude_categories=("Cs",)), max_size=40),
    timestamp=st.one_of(st.none(), st.integers(0, 10**13).map(str)),
    method=st.sampled_from(sorted(HASHES)),
    upper=st.booleans(),
)
def test_any_reference_signature_verifies_and_no_other_secret_does(
    pk: str, dn: str, secret: str, id_part: str, timestamp: str | None, method: str, upper: bool
) -> None:
    """For any names, secret, `<id>` and timestamp, the SDK-style signature verifies with exactly that secret."""
    params = f"securemode=3,signmethod={method}" + (
        f",timestamp={timestamp}" if timestamp is not None else ""
    )
    password = reference_password(secret, id_part, dn, pk, timestamp, method, upper=upper)
    creds = DeviceCredentials.parse(f"{id_part}|{params}|", f"{dn}&{pk}", password)
    assert creds.device == DeviceRef(pk, dn)
    assert creds.client_id_part == id_part
    assert verify(creds, secret)
    assert not verify(creds, secret + "x")

"""Aliyun MQTT CONNECT signing (one device, one secret), as the device SDKs compute it.

    clientId = <id>|securemode=<n>,signmethod=<hmacmd5|hmacsha1|hmacsha256>[,timestamp=<ts>][,k=v...]|
    username = <deviceName>&<productKey>
    password = hex(HMAC_<alg>(deviceSecret, "clientId<id>deviceName<dn>productKey<pk>[timestamp<ts>]"))

`<id>` is the part of the clientId before the first `|`, used verbatim; hex is compared without regard
to case (iotkit-embedded v3 sends uppercase, the Python SDK lowercase). Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum

from plugins.ota.core.topics import DeviceRef

SIGN_METHODS = {"hmacmd5": hashlib.md5, "hmacsha1": hashlib.sha1, "hmacsha256": hashlib.sha256}


class Refusal(StrEnum):
    """Why a CONNECT was refused; one log line names it (never the secret or the password)."""

    MALFORMED_CLIENT_ID = "malformed clientId"
    MALFORMED_USERNAME = "malformed username"
    UNSUPPORTED_SIGN_METHOD = "unsupported signmethod"
    UNKNOWN_DEVICE = "unknown device"
    DISABLED = "device disabled"
    BAD_SIGNATURE = "bad signature"
    STALE_TIMESTAMP = "timestamp missing or outside the allowed window"
    BAD_PASSWORD = "bad account password"  # noqa: S105 - a refusal reason, not a password


class CredentialsError(ValueError):
    def __init__(self, refusal: Refusal, detail: str = "") -> None:
        super().__init__(f"{refusal}{': ' + detail if detail else ''}")
        self.refusal = refusal


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    device: DeviceRef
    client_id_part: str
    sign_method: str
    timestamp: str | None
    params: dict[str, str]
    password: str

    @classmethod
    def parse(
        cls, client_id: str | None, username: str | None, password: str | bytes | None
    ) -> DeviceCredentials:
        """Parse the CONNECT's three fields; raises CredentialsError naming what is wrong."""
        if not client_id or client_id.count("|") < 2 or not client_id.endswith("|"):
            raise CredentialsError(Refusal.MALFORMED_CLIENT_ID, "expected <id>|k=v,...|")
        first = client_id.index("|")
        id_part, middle = client_id[:first], client_id[first + 1 : -1]
        params: dict[str, str] = {}
        for item in middle.split(","):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise CredentialsError(Refusal.MALFORMED_CLIENT_ID, f"parameter {item[:32]!r} is not k=v")
            params[key] = value
        method = params.get("signmethod", "").lower()
        if method not in SIGN_METHODS:
            raise CredentialsError(Refusal.UNSUPPORTED_SIGN_METHOD, f"{params.get('signmethod', '')[:16]!r}")
        device = DeviceRef.from_username(username)
        if device is None:
            raise CredentialsError(Refusal.MALFORMED_USERNAME, "expected <deviceName>&<productKey>")
        if isinstance(password, bytes):
            try:
                password = password.decode("ascii")
            except UnicodeDecodeError as e:
                raise CredentialsError(Refusal.BAD_SIGNATURE, "password is not hex") from e
        return cls(device, id_part, method, params.get("timestamp"), params, password or "")

    def content(self) -> str:
        """The signed text: the parameters sorted by name, each as name+value."""
        text = f"clientId{self.client_id_part}deviceName{self.device.device_name}productKey{self.device.product_key}"
        return text + (f"timestamp{self.timestamp}" if self.timestamp is not None else "")


def sign(secret: str, content: str, method: str) -> str:
    """Lowercase hex HMAC of `content` keyed by the device secret."""
    return hmac.new(secret.encode(), content.encode(), SIGN_METHODS[method]).hexdigest()


def verify(credentials: DeviceCredentials, secret: str) -> bool:
    expected = sign(secret, credentials.content(), credentials.sign_method)
    return hmac.compare_digest(expected.encode(), credentials.password.lower().encode())


@dataclass(frozen=True, slots=True)
class LoginExample:
    client_id: str
    username: str
    password: str


def login_for(
    device: DeviceRef,
    secret: str,
    *,
    client_id_part: str | None = None,
    securemode: int = 3,
    method: str = "hmacsha256",
    timestamp: str | None = None,
) -> LoginExample:
    """The CONNECT fields a device would send: for examples, tests and the fleet simulator."""
    timestamp = timestamp or None
    part = client_id_part or f"{device.product_key}.{device.device_name}"
    params = f"securemode={securemode},signmethod={method}" + (f",timestamp={timestamp}" if timestamp else "")
    creds = DeviceCredentials(device, part, method, timestamp, {}, "")
    return LoginExample(
        f"{part}|{params}|",
        f"{device.device_name}&{device.product_key}",
        sign(secret, creds.content(), method),
    )

"""Device secrets: the one rule for a secret an operator gives (pure). A generated secret
(`new_device_secret`) is 32 hex characters from 16 random bytes."""

from __future__ import annotations

import secrets

SECRET_MIN_LEN = 16
SECRET_MAX_LEN = 128


def secret_problem(secret: str) -> str | None:
    """Why `secret` may not be a device's secret, or None when it may: a short secret can be guessed
    offline from one captured login (the password is an HMAC keyed by it)."""
    if (
        not SECRET_MIN_LEN <= len(secret) <= SECRET_MAX_LEN
        or not secret.isprintable()
        or secret != secret.strip()
    ):
        return (
            f"must be {SECRET_MIN_LEN} to {SECRET_MAX_LEN} printable characters"
            " with no leading or trailing space"
        )
    return None


def new_device_secret() -> str:
    """32 hex characters from 16 random bytes, the shape of an Aliyun DeviceSecret."""
    return secrets.token_hex(16)

"""Signed, expiring download links bound to one resource and one subject."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import quote, urlencode

MAX_URL_LEN = 256  # Link SDK C v4's OTA_HTTPCLIENT_MAX_URL_LEN


class LinkTooLong(ValueError):
    """The minted URL would not fit in a device SDK's URL buffer."""


@dataclass(frozen=True, slots=True)
class LinkClaims:
    resource: str
    subject: str
    expires: int


class LinkSigner:
    """Mints `<base>/firmware/<resource>?s=<subject>&e=<expires>&t=<tag>` and checks such links.

    The tag is a truncated HMAC-SHA256 over resource, subject and expiry, so a link names exactly one
    resource for exactly one subject until it expires.
    """

    def __init__(self, key: bytes, base_url: str, ttl_s: int) -> None:
        if len(key) < 16:
            raise ValueError("the link key must be at least 16 bytes")
        self._key = key
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s

    def _tag(self, resource: str, subject: str, expires: int) -> str:
        mac = hmac.new(self._key, f"{resource}\n{subject}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:16]).rstrip(b"=").decode()

    def mint(self, resource: str, subject: str, now: float) -> str:
        expires = int(now) + self.ttl_s
        query = urlencode({"s": subject, "e": expires, "t": self._tag(resource, subject, expires)}, safe="/")
        url = f"{self.base_url}/firmware/{quote(resource, safe='')}?{query}"
        if len(url) > MAX_URL_LEN:
            raise LinkTooLong(f"download URL of {len(url)} characters exceeds {MAX_URL_LEN}")
        return url

    def check(self, resource: str, query: dict[str, str], now: float) -> LinkClaims | None:
        """The link's claims when its tag is right and it has not expired, else None."""
        subject, expires_text, tag = query.get("s"), query.get("e"), query.get("t")
        if not subject or not expires_text or not tag or not expires_text.isdigit() or len(expires_text) > 12:
            return None
        expires = int(expires_text)
        if not hmac.compare_digest(tag.encode(), self._tag(resource, subject, expires).encode()):
            return None
        if now >= expires:
            return None
        return LinkClaims(resource, subject, expires)

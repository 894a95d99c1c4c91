"""Signed, expiring download links bound to one resource and one subject.

Two styles, both `<base>/firmware/<resource>?...`, at most 256 characters, plain query strings:

- built-in (the default): `?s=<subject>&e=<expires>&t=<tag>`, the tag a truncated HMAC-SHA256. Only the
  broker's own endpoint can check it.
- nginx offload: `?b=<blob sha256>&s=<subject>&e=<expires>&t=<tag>`, the tag what nginx's `secure_link`
  module computes: base64url(MD5("<expires> <resource> <blob> <subject as sent> <secret>")). nginx checks
  it and serves `<store>/<b[:2]>/<b>` itself, without asking the broker. MD5 keyed by a secret suffix is
  weaker than HMAC-SHA256 (it is nginx's only choice), so such links are minted and accepted only when
  the offload is configured. The secret is derived from the link key (`offload_secret`); the broker's
  endpoint accepts these links too, so a device still downloads when it reaches the broker instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, urlencode

MAX_URL_LEN = 256  # Link SDK C v4's OTA_HTTPCLIENT_MAX_URL_LEN
OFFLOAD_STYLES = ("", "nginx")

# What nginx's `secure_link_md5` hashes, before " <secret>". `$ota_firmware` is the resource captured by
# the firmware location's regex; `$arg_b` and `$arg_s` are the query values exactly as sent (undecoded).
NGINX_MD5_FIELDS = "$secure_link_expires $ota_firmware $arg_b $arg_s"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_OFFLOAD_LABEL = b"ota-broker nginx secure_link v1"


class LinkTooLong(ValueError):
    """The minted URL would not fit in a device SDK's URL buffer."""


@dataclass(frozen=True, slots=True)
class LinkClaims:
    resource: str
    subject: str
    expires: int
    blob: str | None = None  # the sha256 an offload link names (nginx serves that file)


def offload_secret(key: bytes) -> str:
    """The secret nginx shares with the broker: derived one-way from the link key (64 hex characters), so
    nginx's copy never reveals the key that signs the built-in links."""
    return hmac.new(key, _OFFLOAD_LABEL, hashlib.sha256).hexdigest()


def nginx_secure_link(key: bytes) -> str:
    """The two directives for nginx's firmware location, with the secret derived from `key`.

    Written to a file nginx `include`s (mode 0600, outside any repository); see docs/nginx-offload.md.
    """
    return (
        "# ota-broker download links: generated from <data_dir>/link.key; keep it secret (mode 0600)\n"
        "secure_link $arg_t,$arg_e;\n"
        f'secure_link_md5 "{NGINX_MD5_FIELDS} {offload_secret(key)}";\n'
    )


def _subject_as_sent(subject: str) -> str:
    """The subject as it appears in a minted query string, which is what nginx's `$arg_s` hashes."""
    return quote_plus(subject, safe="/")


class LinkSigner:
    """Mints download links and checks them; see the module docstring for the two styles.

    A link names exactly one resource for exactly one subject until it expires. With `offload="nginx"`,
    links are minted in the nginx style (and need the blob's sha256); built-in links are still accepted.
    """

    def __init__(self, key: bytes, base_url: str, ttl_s: int, *, offload: str = "") -> None:
        if len(key) < 16:
            raise ValueError("the link key must be at least 16 bytes")
        if offload not in OFFLOAD_STYLES:
            raise ValueError(f"unknown download offload {offload!r}")
        self._key = key
        self._offload_secret = offload_secret(key) if offload else ""
        self.offload = offload
        self.base_url = base_url.rstrip("/")
        self.ttl_s = ttl_s

    def _tag(self, resource: str, subject: str, expires: int) -> str:
        mac = hmac.new(self._key, f"{resource}\n{subject}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:16]).rstrip(b"=").decode()

    def _offload_tag(self, resource: str, blob: str, subject: str, expires: int) -> str:
        text = f"{expires} {resource} {blob} {_subject_as_sent(subject)} {self._offload_secret}"
        digest = hashlib.md5(text.encode(), usedforsecurity=False).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def mint(self, resource: str, subject: str, now: float, *, blob: str | None = None) -> str:
        """A link for `subject` to `resource` until now + ttl. `blob` (the resource's sha256) is required
        in the offload style, where it is the file nginx serves; the built-in style ignores it."""
        expires = int(now) + self.ttl_s
        params: dict[str, str | int]
        if self.offload:
            if blob is None or not _SHA256.fullmatch(blob):
                raise ValueError("an offload link needs the blob's sha256 (64 lowercase hex digits)")
            tag = self._offload_tag(resource, blob, subject, expires)
            params = {"b": blob, "s": subject, "e": expires, "t": tag}
        else:
            params = {"s": subject, "e": expires, "t": self._tag(resource, subject, expires)}
        url = f"{self.base_url}/firmware/{quote(resource, safe='')}?{urlencode(params, safe='/')}"
        if len(url) > MAX_URL_LEN:
            raise LinkTooLong(f"download URL of {len(url)} characters exceeds {MAX_URL_LEN}")
        return url

    def check(self, resource: str, query: dict[str, str], now: float) -> LinkClaims | None:
        """The link's claims when its tag is right and it has not expired, else None.

        A link with `b` is an offload link: accepted only when this signer is configured for the offload.
        """
        subject, expires_text, tag = query.get("s"), query.get("e"), query.get("t")
        if not subject or not expires_text or not tag or not expires_text.isdigit() or len(expires_text) > 12:
            return None
        expires = int(expires_text)
        blob = query.get("b")
        if blob is None:
            expected = self._tag(resource, subject, expires)
        elif self.offload and _SHA256.fullmatch(blob):
            expected = self._offload_tag(resource, blob, subject, expires)
        else:
            return None
        if not hmac.compare_digest(tag.encode(), expected.encode()):
            return None
        if now >= expires:
            return None
        return LinkClaims(resource, subject, expires, blob)

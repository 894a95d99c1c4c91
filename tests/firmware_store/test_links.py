"""LinkSigner: download URLs signed for one resource and one subject, expiring, short enough for SDKs."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from firmware_store import LinkSigner
from firmware_store.links import (
    MAX_URL_LEN,
    NGINX_MD5_FIELDS,
    LinkClaims,
    LinkTooLong,
    nginx_secure_link,
    offload_secret,
)

KEY = b"0123456789abcdef0123456789abcdef"
BASE = "https://gw.example:8443"
TTL_S = 24 * 3600
NOW = 1_732_851_000.0
RESOURCE = "17"
SUBJECT = "a1B2c3D4e5F/sensor-0042"


def split(url: str) -> tuple[str, dict[str, str]]:
    """The resource and the query of a minted URL, decoded as the HTTP server decodes them."""
    parts = urlsplit(url)
    prefix = "/firmware/"
    assert parts.path.startswith(prefix), url
    return unquote(parts.path.removeprefix(prefix)), dict(parse_qsl(parts.query, keep_blank_values=True))


@pytest.fixture
def signer() -> LinkSigner:
    return LinkSigner(KEY, BASE, TTL_S)


def test_minted_link_checks_out_with_its_claims(signer: LinkSigner) -> None:
    """A freshly minted link checks out and names its resource, its subject and now + ttl."""
    url = signer.mint(RESOURCE, SUBJECT, NOW)
    assert url.startswith(f"{BASE}/firmware/")
    resource, query = split(url)
    assert resource == RESOURCE
    assert signer.check(resource, query, NOW) == LinkClaims(RESOURCE, SUBJECT, int(NOW) + TTL_S)


def test_trailing_slash_on_base_url_is_not_doubled() -> None:
    """A base URL given with a trailing slash yields `<base>/firmware/...`, not `<base>//firmware/...`."""
    url = LinkSigner(KEY, BASE + "/", TTL_S).mint(RESOURCE, SUBJECT, NOW)
    assert url.startswith(f"{BASE}/firmware/{RESOURCE}?")


@pytest.mark.parametrize(
    ("resource", "subject"),
    [
        pytest.param("fw/../../etc", "pk/dn", id="slashes-in-resource"),
        pytest.param("42", "pk&e=99999999999/dn t=x", id="query-syntax-in-subject"),
        pytest.param("ünïcode", "pk/dévice", id="unicode"),
    ],
)
def test_awkward_names_round_trip(signer: LinkSigner, resource: str, subject: str) -> None:
    """Resources and subjects with URL syntax in them survive encoding and still check out."""
    got_resource, query = split(signer.mint(resource, subject, NOW))
    assert got_resource == resource
    claims = signer.check(got_resource, query, NOW)
    assert claims is not None
    assert (claims.resource, claims.subject) == (resource, subject)


def test_tampered_tag_is_refused(signer: LinkSigner) -> None:
    """Changing one character of the tag makes the link worthless."""
    resource, query = split(signer.mint(RESOURCE, SUBJECT, NOW))
    tag = query["t"]
    query["t"] = ("B" if tag[0] == "A" else "A") + tag[1:]
    assert signer.check(resource, query, NOW) is None


def test_tampered_subject_is_refused(signer: LinkSigner) -> None:
    """A link cannot be re-addressed to another device by editing its subject."""
    resource, query = split(signer.mint(RESOURCE, SUBJECT, NOW))
    query["s"] = "a1B2c3D4e5F/sensor-0043"
    assert signer.check(resource, query, NOW) is None


def test_tampered_expiry_is_refused(signer: LinkSigner) -> None:
    """A link cannot be extended by editing its expiry."""
    resource, query = split(signer.mint(RESOURCE, SUBJECT, NOW))
    query["e"] = str(int(query["e"]) + 3600)
    assert signer.check(resource, query, NOW) is None


def test_link_for_another_resource_is_refused(signer: LinkSigner) -> None:
    """A link's query presented for another resource does not check out."""
    _, query = split(signer.mint(RESOURCE, SUBJECT, NOW))
    assert signer.check("18", query, NOW) is None


def test_link_signed_with_another_key_is_refused(signer: LinkSigner) -> None:
    """A link minted under a different key (another installation) is refused."""
    other = LinkSigner(b"another key, 16+ bytes", BASE, TTL_S)
    resource, query = split(other.mint(RESOURCE, SUBJECT, NOW))
    assert signer.check(resource, query, NOW) is None


def test_link_expires_at_its_expiry_time(signer: LinkSigner) -> None:
    """A link is good up to the second before `expires` and refused from `expires` on."""
    resource, query = split(signer.mint(RESOURCE, SUBJECT, NOW))
    expires = int(query["e"])
    assert expires == int(NOW) + TTL_S
    assert signer.check(resource, query, expires - 1) is not None
    assert signer.check(resource, query, expires) is None
    assert signer.check(resource, query, expires + 1) is None


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param({"s": None}, id="no-subject"),
        pytest.param({"e": None}, id="no-expiry"),
        pytest.param({"t": None}, id="no-tag"),
        pytest.param({"s": ""}, id="empty-subject"),
        pytest.param({"e": "-1"}, id="negative-expiry"),
        pytest.param({"e": "1e10"}, id="float-expiry"),
        pytest.param({"e": "9" * 13}, id="huge-expiry"),
        pytest.param({"e": "١٢٣"}, id="non-ascii-digits"),
        pytest.param({"t": ""}, id="empty-tag"),
        pytest.param({"t": "ü" * 22}, id="non-ascii-tag"),
    ],
)
def test_malformed_query_is_refused(signer: LinkSigner, edit: dict[str, str | None]) -> None:
    """Missing, empty or non-numeric link parameters are refused, never raised."""
    resource, query = split(signer.mint(RESOURCE, SUBJECT, NOW))
    for key, value in edit.items():
        if value is None:
            del query[key]
        else:
            query[key] = value
    assert signer.check(resource, query, NOW) is None


def test_realistic_link_fits_the_sdk_url_buffer(signer: LinkSigner) -> None:
    """A link for a long-but-real host, resource and Aliyun-sized device name is at most 256 characters."""
    long_signer = LinkSigner(KEY, "https://ota-gateway-01.factory.example.com:8443", TTL_S)
    url = long_signer.mint("123456", "a1B2c3D4e5F/" + "d" * 32, NOW)
    assert MAX_URL_LEN == 256
    assert len(url) <= 256
    assert len(signer.mint(RESOURCE, SUBJECT, NOW)) <= 256


def test_absurd_base_url_is_refused_with_link_too_long() -> None:
    """A link that would exceed 256 characters is refused with LinkTooLong rather than minted."""
    signer = LinkSigner(KEY, "https://" + "x" * 300 + ".example", TTL_S)
    with pytest.raises(LinkTooLong):
        signer.mint(RESOURCE, SUBJECT, NOW)


def test_short_key_is_refused() -> None:
    """A link key shorter than 16 bytes is refused at construction; 16 bytes is enough."""
    with pytest.raises(ValueError, match="16 bytes"):
        LinkSigner(b"x" * 15, BASE, TTL_S)
    LinkSigner(b"x" * 16, BASE, TTL_S)


# ------------------------------------------------------------------------ nginx offload style

BLOB = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
OTHER_BLOB = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"


@pytest.fixture
def offload() -> LinkSigner:
    return LinkSigner(KEY, BASE, TTL_S, offload="nginx")


def raw_query(url: str) -> dict[str, str]:
    """The query values exactly as sent, undecoded: what nginx's `$arg_<name>` variables hold."""
    return dict(pair.split("=", 1) for pair in urlsplit(url).query.split("&"))


def nginx_tag(url: str, directives: str) -> str:
    """The tag nginx's secure_link computes for `url` under `directives`, worked out independently:
    the `secure_link_md5` expression with nginx's variables filled in, MD5, base64url without padding."""
    [expression] = re.findall(r'^secure_link_md5 "(.*)";$', directives, re.MULTILINE)
    raw = raw_query(url)
    values = {
        "$secure_link_expires": raw["e"],
        "$ota_firmware": unquote(urlsplit(url).path.rsplit("/", 1)[1]),
        "$arg_b": raw["b"],
        "$arg_s": raw["s"],
    }
    text = re.sub(r"\$[a-z_]+", lambda m: values[m.group(0)], expression)
    digest = hashlib.md5(text.encode(), usedforsecurity=False).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_offload_link_names_the_blob_and_checks_out(offload: LinkSigner) -> None:
    """An offload link is `/firmware/<resource>?b=<sha256>&s=&e=&t=` and checks out with the blob in its claims."""
    url = offload.mint(RESOURCE, SUBJECT, NOW, blob=BLOB)
    assert url.startswith(f"{BASE}/firmware/{RESOURCE}?b={BLOB}&s=")
    assert list(raw_query(url)) == ["b", "s", "e", "t"]
    resource, query = split(url)
    assert offload.check(resource, query, NOW) == LinkClaims(RESOURCE, SUBJECT, int(NOW) + TTL_S, BLOB)


@pytest.mark.parametrize("subject", [SUBJECT, "pk/dev:1@lab x", "pk/dévice+1"])
def test_offload_tag_is_what_nginx_computes(offload: LinkSigner, subject: str) -> None:
    """The tag equals nginx's secure_link_md5 over the printed directives, with the subject as sent
    (percent-encoded where the URL encodes it), so nginx accepts exactly the links the broker mints."""
    directives = nginx_secure_link(KEY)
    assert "secure_link $arg_t,$arg_e;\n" in directives
    assert f'secure_link_md5 "{NGINX_MD5_FIELDS} {offload_secret(KEY)}";' in directives
    url = offload.mint(RESOURCE, subject, NOW, blob=BLOB)
    assert raw_query(url)["t"] == nginx_tag(url, directives)
    resource, query = split(url)
    claims = offload.check(resource, query, NOW)
    assert claims is not None and claims.subject == subject


def test_offload_secret_is_derived_one_way_from_the_key() -> None:
    """The nginx secret is 64 hex digits, differs per key, and neither contains nor is the link key."""
    secret = offload_secret(KEY)
    assert re.fullmatch(r"[0-9a-f]{64}", secret)
    assert secret != offload_secret(KEY + b"x")
    assert KEY.decode() not in nginx_secure_link(KEY) and KEY.hex() not in secret


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param({"b": OTHER_BLOB}, id="other-blob"),
        pytest.param({"b": BLOB.upper()}, id="uppercase-blob"),
        pytest.param({"b": BLOB[:-1]}, id="short-blob"),
        pytest.param({"b": "../../link.key"}, id="path-as-blob"),
        pytest.param({"s": "a1B2c3D4e5F/sensor-0043"}, id="subject"),
        pytest.param({"e": str(int(NOW) + TTL_S + 3600)}, id="expiry"),
        pytest.param({"t": "A" * 22}, id="tag"),
        pytest.param({"t": None}, id="no-tag"),
    ],
)
def test_tampered_offload_link_is_refused(offload: LinkSigner, edit: dict[str, str | None]) -> None:
    """Editing any part of an offload link (blob, subject, expiry, tag) makes it worthless."""
    resource, query = split(offload.mint(RESOURCE, SUBJECT, NOW, blob=BLOB))
    for key, value in edit.items():
        if value is None:
            del query[key]
        else:
            query[key] = value
    assert offload.check(resource, query, NOW) is None


def test_offload_link_for_another_resource_or_key_is_refused(offload: LinkSigner) -> None:
    """An offload link does not check out for another resource, nor under another installation's key."""
    _, query = split(offload.mint(RESOURCE, SUBJECT, NOW, blob=BLOB))
    assert offload.check("18", query, NOW) is None
    other = LinkSigner(b"another key, 16+ bytes", BASE, TTL_S, offload="nginx")
    assert other.check(RESOURCE, query, NOW) is None


def test_offload_link_expires_at_its_expiry_time(offload: LinkSigner) -> None:
    """An offload link is good up to the second before `expires` and refused from then on."""
    resource, query = split(offload.mint(RESOURCE, SUBJECT, NOW, blob=BLOB))
    expires = int(query["e"])
    assert offload.check(resource, query, expires - 1) is not None
    assert offload.check(resource, query, expires) is None


def test_offload_signer_still_accepts_built_in_links(signer: LinkSigner, offload: LinkSigner) -> None:
    """Switching the offload on does not break links already minted in the built-in style."""
    resource, query = split(signer.mint(RESOURCE, SUBJECT, NOW))
    assert offload.check(resource, query, NOW) == LinkClaims(RESOURCE, SUBJECT, int(NOW) + TTL_S)


def test_built_in_signer_refuses_offload_links(signer: LinkSigner, offload: LinkSigner) -> None:
    """Without the offload configured, MD5-tagged links are not accepted at all (HMAC-SHA256 only)."""
    resource, query = split(offload.mint(RESOURCE, SUBJECT, NOW, blob=BLOB))
    assert signer.check(resource, query, NOW) is None


def test_built_in_links_ignore_the_blob(signer: LinkSigner) -> None:
    """The built-in style is unchanged when the caller passes the blob."""
    assert signer.mint(RESOURCE, SUBJECT, NOW, blob=BLOB) == signer.mint(RESOURCE, SUBJECT, NOW)


@pytest.mark.parametrize("blob", [None, "", BLOB.upper(), BLOB + "0", "not-a-digest"])
def test_offload_link_needs_the_blob_digest(offload: LinkSigner, blob: str | None) -> None:
    """An offload link cannot be minted without the blob's sha256: it is the file nginx serves."""
    with pytest.raises(ValueError, match="sha256"):
        offload.mint(RESOURCE, SUBJECT, NOW, blob=blob)


def test_realistic_offload_link_fits_the_sdk_url_buffer() -> None:
    """With the 64-digit blob, a long host, a 6-digit firmware id and an Aliyun-sized device name the
    offload link is still at most 256 characters."""
    long_signer = LinkSigner(KEY, "https://ota-gateway-01.factory.example.com", TTL_S, offload="nginx")
    url = long_signer.mint("123456", "a1B2c3D4e5F/" + "d" * 32, NOW, blob=BLOB)
    assert len(url) <= MAX_URL_LEN
    with pytest.raises(LinkTooLong):
        LinkSigner(KEY, "https://" + "x" * 90 + ".example", TTL_S, offload="nginx").mint(
            "123456", "a1B2c3D4e5F/" + "d" * 32, NOW, blob=BLOB
        )


def test_unknown_offload_style_is_refused() -> None:
    """Only the built-in style and nginx exist."""
    with pytest.raises(ValueError, match="offload"):
        LinkSigner(KEY, BASE, TTL_S, offload="varnish")

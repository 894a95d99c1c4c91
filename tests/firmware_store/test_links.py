"""LinkSigner: download URLs signed for one resource and one subject, expiring, short enough for SDKs."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from firmware_store import LinkSigner
from firmware_store.links import MAX_URL_LEN, LinkClaims, LinkTooLong

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

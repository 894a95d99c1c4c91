"""Self-signed TLS material made at first start (SPEC §2): a CA devices trust and a server certificate."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from firmware_store.tls import TlsFiles, ensure_tls

PUBLIC_HOST = "gw.example.com"
FILES = ("ca.crt", "ca.key", "server.crt", "server.key")


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def san_names(cert: x509.Certificate) -> set[str]:
    """The DNS names and IP addresses (as text) in the certificate's subjectAltName."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {n.lower() for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def verify_for(files: TlsFiles, name: str) -> None:
    """Build and check the chain server.crt → ca.crt for `name` as a TLS client would (raises if not)."""
    subject: x509.verification.Subject
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(Store([load(files.ca_cert)])).build_server_verifier(subject)
    chain = verifier.verify(load(files.cert), [])
    assert chain[-1] == load(files.ca_cert)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Each TLS file's bytes and modification time."""
    return {n: ((directory / n).read_bytes(), (directory / n).stat().st_mtime_ns) for n in FILES}


def test_first_call_creates_the_ca_and_server_material(tmp_path: Path) -> None:
    """ensure_tls() on an empty folder writes ca.crt, ca.key, server.crt and server.key."""
    directory = tmp_path / "data" / "tls"
    files = ensure_tls(directory, PUBLIC_HOST)
    assert files == TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    for name in FILES:
        assert (directory / name).stat().st_size > 0, name


@pytest.mark.parametrize("key", ["ca.key", "server.key"])
def test_private_keys_are_owner_only(tmp_path: Path, key: str) -> None:
    """The CA's and the server's private keys are written with mode 0600."""
    ensure_tls(tmp_path, PUBLIC_HOST)
    assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600


def test_ca_is_a_ca(tmp_path: Path) -> None:
    """ca.crt is a self-signed CA certificate; server.crt is not a CA and is issued by it."""
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    ca, server = load(files.ca_cert), load(files.cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    assert server.issuer == ca.subject


def test_server_certificate_names_every_way_devices_reach_the_host(tmp_path: Path) -> None:
    """The subjectAltName covers localhost, 127.0.0.1, the machine's hostname and the public host."""
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    wanted = {"localhost", "127.0.0.1", socket.gethostname().lower(), PUBLIC_HOST}
    assert wanted <= san_names(load(files.cert))


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", socket.gethostname().lower(), PUBLIC_HOST])
def test_server_certificate_verifies_against_the_ca(tmp_path: Path, name: str) -> None:
    """A client trusting only ca.crt accepts server.crt for each name it covers."""
    verify_for(ensure_tls(tmp_path, PUBLIC_HOST), name)


def test_server_certificate_does_not_verify_for_other_names(tmp_path: Path) -> None:
    """The chain check is real: a name the certificate lacks is refused."""
    with pytest.raises(x509.verification.VerificationError):
        verify_for(ensure_tls(tmp_path, PUBLIC_HOST), "other.example.com")


def test_public_host_given_as_an_ip_address_is_an_ip_san(tmp_path: Path) -> None:
    """A public URL host that is an IP address is named as an IP address, so clients accept it."""
    files = ensure_tls(tmp_path, "192.0.2.10")
    assert ipaddress.ip_address("192.0.2.10") in load(files.cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.IPAddress)
    verify_for(files, "192.0.2.10")


def test_second_call_with_the_same_host_reuses_everything(tmp_path: Path) -> None:
    """A restart with the same public host leaves all four files untouched."""
    ensure_tls(tmp_path, PUBLIC_HOST)
    before = snapshot(tmp_path)
    ensure_tls(tmp_path, PUBLIC_HOST)
    assert snapshot(tmp_path) == before


def test_host_name_case_does_not_force_a_reissue(tmp_path: Path) -> None:
    """Host names compare case-insensitively: `GW.Example.com` after `gw.example.com` reuses the files."""
    ensure_tls(tmp_path, PUBLIC_HOST)
    before = snapshot(tmp_path)
    ensure_tls(tmp_path, "GW.Example.COM")
    assert snapshot(tmp_path) == before


def test_new_public_host_reissues_the_server_certificate_from_the_same_ca(tmp_path: Path) -> None:
    """A new public host gets a new server certificate naming it, issued by the unchanged CA."""
    ensure_tls(tmp_path, PUBLIC_HOST)
    before = snapshot(tmp_path)
    files = ensure_tls(tmp_path, "ota.example.net")
    after = snapshot(tmp_path)
    assert after["ca.crt"] == before["ca.crt"]
    assert after["ca.key"] == before["ca.key"]
    assert after["server.crt"][0] != before["server.crt"][0]
    assert after["server.key"][0] != before["server.key"][0]
    assert "ota.example.net" in san_names(load(files.cert))
    verify_for(files, "ota.example.net")
    verify_for(files, "localhost")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600


def test_lost_ca_key_regenerates_the_ca_and_the_server_certificate(tmp_path: Path) -> None:
    """Without ca.key a new CA is made, and the server certificate is re-issued from it."""
    ensure_tls(tmp_path, PUBLIC_HOST)
    before = snapshot(tmp_path)
    (tmp_path / "ca.key").unlink()
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    after = snapshot(tmp_path)
    assert after["ca.crt"][0] != before["ca.crt"][0]
    assert after["server.crt"][0] != before["server.crt"][0]
    verify_for(files, PUBLIC_HOST)


def test_missing_server_key_reissues_the_server_certificate(tmp_path: Path) -> None:
    """A server certificate without its key is replaced by a matching new pair from the same CA."""
    ensure_tls(tmp_path, PUBLIC_HOST)
    ca_before = (tmp_path / "ca.crt").read_bytes()
    (tmp_path / "server.key").unlink()
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    assert files.ca_cert.read_bytes() == ca_before
    files.server_context()  # load_cert_chain refuses a key that does not match the certificate
    verify_for(files, PUBLIC_HOST)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(await reader.readline())
        await writer.drain()
    finally:
        writer.close()


@pytest.mark.parametrize("server_hostname", ["127.0.0.1", "localhost"])
async def test_tls_handshake_with_a_client_trusting_ca_crt(tmp_path: Path, server_hostname: str) -> None:
    """A client that trusts only ca.crt completes a verified TLS handshake with server_context()."""
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca_cert))
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=files.server_context())
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname=server_hostname
            )
            try:
                writer.write(b"ping\n")
                await writer.drain()
                assert await reader.readline() == b"ping\n"
                peer = writer.get_extra_info("ssl_object").getpeercert()
                assert peer is not None
            finally:
                writer.close()
                await writer.wait_closed()


async def test_tls_handshake_fails_for_a_client_that_does_not_trust_the_ca(tmp_path: Path) -> None:
    """The certificate is not trusted by default: a client without ca.crt refuses the handshake."""
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    other = tmp_path / "other"
    untrusted = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ensure_tls(other, None).ca_cert)
    )
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=files.server_context())
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", port, ssl=untrusted, server_hostname="localhost")

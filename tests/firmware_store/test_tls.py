"""Self-signed TLS material made at first start: a CA devices trust and a server certificate."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import multiprocessing
import socket
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.verification import PolicyBuilder, Store

from firmware_store.tls import HandshakeLog, TlsFiles, c_sdk_problem, ensure_tls, tls_acceptor

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


# ------------------------------------------------------------------ what Aliyun's C SDKs can verify

# What the mbedtls of LinkSDK C v4 and iotkit-embedded v3 offers: TLS 1.2, these suites, RSA only.
SDK_SUITES = ("AES128-SHA256", "AES256-SHA256", "AES128-SHA", "AES256-SHA")


def sdk_client(ca: Path) -> ssl.SSLContext:
    """A client context offering what the C SDKs' mbedtls offers (Python cannot narrow sigalgs)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(":".join(SDK_SUITES))
    ctx.load_verify_locations(ca)
    return ctx


@pytest.mark.parametrize("name", ["ca.crt", "server.crt"])
def test_generated_material_is_rsa_2048_signed_with_sha256(tmp_path: Path, name: str) -> None:
    """The generated CA and server certificate carry RSA keys of 2048 bits and sha256WithRSA signatures."""
    ensure_tls(tmp_path, PUBLIC_HOST)
    cert = load(tmp_path / name)
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSA_WITH_SHA256
    assert c_sdk_problem(tmp_path / name) is None


def test_server_certificate_allows_rsa_key_exchange(tmp_path: Path) -> None:
    """Static-RSA key exchange encrypts to the server key: its keyUsage allows keyEncipherment."""
    ensure_tls(tmp_path, PUBLIC_HOST)
    usage = load(tmp_path / "server.crt").extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_encipherment and usage.digital_signature


def _write_ec_material(directory: Path) -> None:
    """TLS material as versions before RSA generated it: an elliptic-curve CA and server certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    ca.private_key_pem.write_to_path(str(directory / "ca.key"))
    server.cert_chain_pems[0].write_to_path(str(directory / "server.crt"))
    server.private_key_pem.write_to_path(str(directory / "server.key"))


def test_older_elliptic_curve_material_is_replaced_by_rsa_and_kept_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Under the compatible profile an elliptic-curve CA of ours becomes RSA; the old files stay, the log says so."""
    _write_ec_material(tmp_path)
    old_ca = (tmp_path / "ca.crt").read_bytes()
    files = ensure_tls(tmp_path, PUBLIC_HOST, "compatible")
    assert c_sdk_problem(files.cert) is None and c_sdk_problem(files.ca_cert) is None
    verify_for(files, PUBLIC_HOST)
    [aside] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (aside / "ca.crt").read_bytes() == old_ca and (aside / "ca.key").exists()
    assert any("replacing the elliptic-curve CA" in r.getMessage() for r in caplog.records)


def test_modern_profile_keeps_an_elliptic_curve_ca(tmp_path: Path) -> None:
    """Under the modern profile clients that trust the elliptic-curve CA keep trusting the server."""
    _write_ec_material(tmp_path)
    old_ca = (tmp_path / "ca.crt").read_bytes()
    files = ensure_tls(tmp_path, PUBLIC_HOST, "modern")
    assert files.ca_cert.read_bytes() == old_ca
    verify_for(files, PUBLIC_HOST)


def test_elliptic_curve_certificates_are_named_as_unusable_for_the_c_sdks(tmp_path: Path) -> None:
    """An operator's EC certificate, or an RSA one signed by an EC CA, is reported; an RSA chain is not."""
    _write_ec_material(tmp_path)
    assert "RSA" in (c_sdk_problem(tmp_path / "server.crt") or "")
    ec_ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    rsa_leaf = ec_ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)
    rsa_leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "leaf.crt"))
    assert c_sdk_problem(tmp_path / "leaf.crt") is not None
    rsa_ca = trustme.CA(key_type=trustme.KeyType.RSA)
    rsa_ca.issue_cert("localhost", key_type=trustme.KeyType.RSA).cert_chain_pems[0].write_to_path(
        str(tmp_path / "rsa.crt")
    )
    assert c_sdk_problem(tmp_path / "rsa.crt") is None


def _kx(ctx: ssl.SSLContext) -> dict[str, str]:
    return {c["name"]: c["kea"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"}


def test_compatible_profile_adds_exactly_the_static_rsa_suites_after_the_forward_secret_ones(
    tmp_path: Path,
) -> None:
    """compatible = modern + the four static-RSA AES-CBC suites, which come last in the server's order."""
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    compatible, modern = _kx(files.server_context("compatible")), _kx(files.server_context("modern"))
    static = [n for n, kx in compatible.items() if kx == "kx-rsa"]
    assert sorted(static) == sorted(SDK_SUITES)
    assert not [n for n, kx in modern.items() if kx == "kx-rsa"]
    assert set(compatible) - set(static) == set(modern)
    order = list(compatible)
    assert max(order.index(n) for n in modern) < min(order.index(n) for n in static)
    for ctx in (files.server_context("compatible"), files.server_context("modern")):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE


def test_unknown_profile_is_refused(tmp_path: Path) -> None:
    """A profile name other than compatible or modern is an error, not a silent default."""
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    with pytest.raises(ValueError, match="unknown TLS profile"):
        files.server_context("legacy")


async def _serve(files: TlsFiles, profile: str, failures: HandshakeLog) -> asyncio.Server:
    def stream() -> asyncio.StreamReaderProtocol:
        return asyncio.StreamReaderProtocol(asyncio.StreamReader(), _echo)

    acceptor = tls_acceptor(stream, files.server_context(profile), failures, handshake_timeout_s=5)
    return await asyncio.get_running_loop().create_server(acceptor, "127.0.0.1", 0)


@pytest.mark.parametrize(("profile", "accepted"), [("compatible", True), ("modern", False)])
async def test_sdk_like_client_by_profile(tmp_path: Path, profile: str, accepted: bool) -> None:
    """An mbedtls-like client (TLS 1.2, static-RSA suites) gets a verified session under compatible only."""
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    failures = HandshakeLog("test")
    server = await _serve(files, profile, failures)
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            if not accepted:
                with pytest.raises(
                    (ssl.SSLError, ConnectionResetError)
                ):  # asyncio closes without flushing the alert: a reset
                    await asyncio.open_connection("127.0.0.1", port, ssl=sdk_client(files.ca_cert))
                await _until(lambda: failures.failures == 1)
                return
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=sdk_client(files.ca_cert))
            try:
                assert writer.get_extra_info("cipher")[0] in SDK_SUITES
                writer.write(b"ping\n")
                await writer.drain()
                assert await reader.readline() == b"ping\n"
            finally:
                writer.close()
                await writer.wait_closed()
    assert failures.failures == 0


async def _until(check: Any) -> None:
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached within 5s")


async def test_failed_handshake_is_logged_with_peer_and_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A handshake with no shared cipher and one from a plain-TCP client each log the peer and the cause."""
    files = ensure_tls(tmp_path, PUBLIC_HOST)
    server = await _serve(files, "modern", HandshakeLog("mqtt listener 'tls'"))
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with asyncio.timeout(10):
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await asyncio.open_connection("127.0.0.1", port, ssl=sdk_client(files.ca_cert))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00" + b"\x00" * 300)
            await writer.drain()
            await reader.read()  # the server closes
            writer.close()

            def lines() -> list[str]:
                return [r.getMessage() for r in caplog.records if "tls handshake failed" in r.getMessage()]

            await _until(lambda: len(lines()) == 2)
    first, second = lines()
    assert "mqtt listener 'tls'" in first and "127.0.0.1:" in first and "no shared cipher" in first
    assert "127.0.0.1:" in second and "wrong version number" in second


def test_handshake_failures_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """Past `burst` lines in a window failures are only counted; the next window's line tells how many."""
    now = [0.0]
    failures = HandshakeLog("https", burst=3, window_s=60, clock=lambda: now[0])
    error = ssl.SSLError(1, "[SSL: NO_SHARED_CIPHER] no shared cipher")
    for _ in range(10):
        failures.failed("10.0.0.1:5000", error)
    assert len(caplog.records) == 3
    now[0] = 61
    failures.failed("10.0.0.2:5000", error)
    assert len(caplog.records) == 4
    assert "7 more failed handshakes not logged" in caplog.records[-1].getMessage()
    assert failures.failures == 11


def _ensure_in_process(directory: str) -> bytes:
    files = ensure_tls(Path(directory), "127.0.0.1")
    return files.ca_cert.read_bytes() + files.cert.read_bytes()


def test_processes_sharing_the_folder_make_one_ca_and_one_certificate(tmp_path: Path) -> None:
    """Replicas starting at once on one data folder: whichever makes the material, all read the same."""
    with concurrent.futures.ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        made = list(pool.map(_ensure_in_process, [str(tmp_path)] * 8, timeout=120))
    assert len(set(made)) == 1
    assert made[0] == _ensure_in_process(str(tmp_path))

"""A renewed certificate is taken on SIGHUP, without a restart and without dropping a connection: a real
`ota-broker run` process with `tls_cert`/`tls_key` made by trustme, its MQTT-over-TLS and HTTPS listeners
checked by real TLS handshakes before and after; a pair that cannot be loaded leaves the one before."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import trustme
import yaml
from cryptography import x509

from tests.e2e.processes import Launched
from tests.support import eventually

CONNECT = bytes.fromhex("100c00044d5154540402003c0000")  # MQTT 3.1.1 CONNECT, empty client id


def _issue(ca: trustme.CA, cert: Path, key: Path) -> int:
    server = ca.issue_cert("127.0.0.1", "localhost")
    key.write_bytes(server.private_key_pem.bytes())
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    return x509.load_pem_x509_certificate(server.cert_chain_pems[0].bytes()).serial_number


def _served(ca: trustme.CA, port: int) -> int:
    """The serial number of the certificate a new TLS connection to `port` is given."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_sighup_takes_a_renewed_certificate_and_keeps_connections(tmp_path: Path) -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)  # what Aliyun's C SDKs verify
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    first = _issue(ca, cert, key)
    config: dict[str, Any] = yaml.safe_load(
        resources.files("broker").joinpath("default_config.yaml").read_text()
    )
    config["plugins"]["plugins.ota.plugin.OtaPlugin"] |= {"tls_cert": str(cert), "tls_key": str(key)}
    (tmp_path / "ota.yaml").write_text(yaml.safe_dump(config))
    broker = Launched(
        [sys.executable, "-m", "broker", "run", "-c", str(tmp_path / "ota.yaml")],
        tmp_path,
        tmp_path / "data",
        {},
    )
    try:
        await asyncio.to_thread(broker.start)
        assert broker.proc is not None
        ports = broker.ports["mqtts"], broker.ports["https"]
        assert [_served(ca, p) for p in ports] == [first, first]

        # a device connected over TLS before the renewal
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        kept = ctx.wrap_socket(
            socket.create_connection(("127.0.0.1", ports[0]), timeout=5), server_hostname="127.0.0.1"
        )
        try:
            renewed = _issue(ca, cert, key)
            broker.proc.send_signal(signal.SIGHUP)
            await eventually(
                lambda: any("server.pem: reloaded" in line for line in broker.lines), what="the reload"
            )
            assert [_served(ca, p) for p in ports] == [renewed, renewed]
            kept.sendall(CONNECT)  # the connection made before the renewal still talks MQTT
            assert kept.recv(4)[:1] == b"\x20", "no CONNACK on the connection made before the renewal"
        finally:
            kept.close()

        # a broken pair (a key that is not the certificate's): refused, the renewed one stays
        _issue(ca, tmp_path / "other.pem", key)
        broker.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: any("not reloaded" in line for line in broker.lines), what="the refusal")
        assert [_served(ca, p) for p in ports] == [renewed, renewed]
        assert broker.proc.poll() is None
        started = time.monotonic()
        assert broker.stop() == 0 and time.monotonic() - started < 10
    finally:
        broker.close()

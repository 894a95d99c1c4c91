"""MQTT over TLS with the product's TLS profile, and failed handshakes logged.

amqtt builds a listener's SSL context in `Broker._create_ssl_context` (its own defaults: no profile, a
client certificate asked for) and serves it with `asyncio.start_server(ssl=...)`, where a failed
handshake vanishes without a trace. `TlsListeners` replaces both for TCP listeners: the context comes
from `firmware_store.tls.server_context` (the same one the HTTPS endpoints use), and the handshake runs
in `firmware_store.tls.tls_acceptor`, which logs each failure (rate-limited) with the peer and reason. Each
connection is a `broker.stream.MqttStream` (amqtt's listeners make five objects per connection).
Every TCP listener, with TLS or without, is a `broker.listener.GatedServer`: a backlog of `LISTEN_BACKLOG`
(asyncio's is 100), and at most `MAX_SETUPS` TLS handshakes at once, the other connections waiting in the
kernel.
The two amqtt names overridden here are checked by tests/broker/test_amqtt_internals.py.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from amqtt.contexts import ListenerConfig, ListenerType

from broker.listener import GatedServer, SetupFactory, listening_sockets
from broker.stream import MqttStream
from firmware_store.tls import COMPATIBLE, HandshakeLog, server_context, tls_setup
from plugins.ota.settings import PLUGIN_KEY, ConfigError, OtaConfig, validate

HANDSHAKE_TIMEOUT_S = 10.0


def tls_profile(config: Mapping[str, Any] | None) -> str:
    """The OTA plugin's `tls_profile` in an amqtt configuration prepared by `broker.config` (overrides applied)."""
    entry = ((config or {}).get("plugins") or {}).get(PLUGIN_KEY)
    try:
        return validate(OtaConfig(**(entry or {}))).tls_profile
    except (TypeError, ConfigError):
        return COMPATIBLE  # the OTA plugin reports its own configuration errors


class TlsListeners:
    """Mix in before amqtt's `Broker`."""

    def __init__(self, config: dict[str, Any] | None = None, *args: Any, **kwargs: Any) -> None:
        self._tls_profile = tls_profile(config)
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]  # amqtt Broker follows in the MRO

    def _create_ssl_context(self, listener: ListenerConfig) -> ssl.SSLContext:
        ctx = server_context(Path(str(listener.certfile)), Path(str(listener.keyfile)), self._tls_profile)
        if listener.cafile or listener.capath or listener.cadata:  # client certificates, as amqtt offers
            ctx.load_verify_locations(listener.cafile, listener.capath, listener.cadata)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    async def _create_server_instance(
        self,
        listener_name: str,
        listener_type: ListenerType,
        address: str | None,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> Any:
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(  # type: ignore[misc]
                listener_name, listener_type, address, port, ssl_context
            )
        serve = self._client_connected  # type: ignore[attr-defined]  # amqtt's Broker follows in the MRO

        connected = partial(serve, listener_name)  # one for the listener, not one per connection

        def stream() -> MqttStream:  # one object per connection: protocol, reader and writer
            return MqttStream(connected)

        def plain(over: Callable[[], None]) -> asyncio.BaseProtocol:
            over()  # nothing to set up before the CONNECT
            return stream()

        factory: SetupFactory = plain
        if ssl_context is not None:
            failures = HandshakeLog(f"mqtt listener {listener_name!r}")
            factory = tls_setup(stream, ssl_context, failures, handshake_timeout_s=HANDSHAKE_TIMEOUT_S)
        return GatedServer(listening_sockets(address, port), factory)

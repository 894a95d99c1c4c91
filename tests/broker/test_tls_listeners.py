"""The amqtt names `broker.tls_listeners.TlsListeners` overrides or calls, so an amqtt upgrade that drops
one fails here by name instead of silently serving amqtt's own TLS defaults."""

from __future__ import annotations

import inspect

import pytest
from amqtt.broker import Broker

from broker.hardened import HardenedBroker
from broker.tls_listeners import TlsListeners, tls_profile
from plugins.ota.settings import PLUGIN_KEY


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("_create_ssl_context", ["listener"]),
        ("_create_server_instance", ["listener_name", "listener_type", "address", "port", "ssl_context"]),
        ("stream_connected", ["reader", "writer", "listener_name"]),
    ],
)
def test_amqtt_still_has_the_names_tls_listeners_relies_on(name: str, params: list[str]) -> None:
    """amqtt's Broker has each method TlsListeners overrides or calls, with the parameters it passes."""
    method = getattr(Broker, name, None)
    assert method is not None, f"amqtt's Broker no longer has {name}"
    signature = [p for p in inspect.signature(method).parameters if p != "self"]
    assert signature == params, f"amqtt's Broker.{name} changed: {signature}"


def test_hardened_broker_builds_its_tls_listeners_with_the_product_context() -> None:
    """HardenedBroker resolves _create_ssl_context to TlsListeners' (for TCP and WebSocket listeners), and
    its own _create_server_instance (WebSocket listeners) hands the others to TlsListeners'."""
    assert HardenedBroker._create_ssl_context is TlsListeners._create_ssl_context
    after = super(HardenedBroker, HardenedBroker)
    assert after._create_server_instance is TlsListeners._create_server_instance  # type: ignore[misc]


def test_tls_profile_comes_from_the_ota_plugin_entry() -> None:
    """The listeners' profile is the OTA plugin's tls_profile; without a usable entry, compatible."""
    assert tls_profile({"plugins": {PLUGIN_KEY: {"tls_profile": "modern"}}}) == "modern"
    assert tls_profile({"plugins": {}}) == "compatible"
    assert tls_profile({"plugins": {PLUGIN_KEY: {"no_such_key": 1}}}) == "compatible"

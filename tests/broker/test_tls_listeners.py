"""`broker.tls_listeners`: the TLS profile of the MQTT/TLS listeners. The amqtt names `TlsListeners`
overrides or calls are checked with the broker's others in test_amqtt_internals.py."""

from __future__ import annotations

from broker.tls_listeners import tls_profile
from plugins.ota.settings import PLUGIN_KEY


def test_tls_profile_comes_from_the_ota_plugin_entry() -> None:
    """The listeners' profile is the OTA plugin's tls_profile; without a usable entry, compatible."""
    assert tls_profile({"plugins": {PLUGIN_KEY: {"tls_profile": "modern"}}}) == "modern"
    assert tls_profile({"plugins": {}}) == "compatible"
    assert tls_profile({"plugins": {PLUGIN_KEY: {"no_such_key": 1}}}) == "compatible"

"""Configuration: file or built-in defaults, `OTA_*` overrides, failing fast with the key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
import yaml
from amqtt.broker import Broker

from broker.config import ConfigError, default_config_text, load, prepare
from broker.config_check import effective_config
from plugins.ota.settings import PLUGIN_KEY, OtaConfig, resolve, validate

REPO = Path(__file__).resolve().parents[2]


def test_built_in_defaults_are_the_repo_config() -> None:
    """The embedded defaults are byte-for-byte the repo's config.yaml."""
    assert default_config_text() == (REPO / "config.yaml").read_text(encoding="utf-8")


def test_defaults_document_every_plugin_key() -> None:
    """config.yaml lists every key of the OTA plugin's configuration with its default value."""
    entry = yaml.safe_load(default_config_text())["plugins"][PLUGIN_KEY]
    defaults = OtaConfig()
    assert set(entry) == set(OtaConfig.__dataclass_fields__)
    for key, value in entry.items():
        assert value == getattr(defaults, key), key


def test_load_prefers_named_file_then_cwd_then_defaults(tmp_path: Path) -> None:
    """`--config` wins, then ./config.yaml, then the built-in defaults."""
    assert load(None, cwd=tmp_path).source == "built-in defaults"
    (tmp_path / "config.yaml").write_text(default_config_text().replace("0.0.0.0:1883", "127.0.0.1:1999"))
    found = load(None, cwd=tmp_path)
    assert (
        found.source.endswith("config.yaml") and found.raw["listeners"]["default"]["bind"] == "127.0.0.1:1999"
    )
    other = tmp_path / "other.yaml"
    other.write_text(default_config_text())
    assert load(other, cwd=tmp_path).source == str(other)


def test_environment_overrides(tmp_path: Path) -> None:
    """OTA_* variables override the file; OTA_MQTTS_BIND adds the TLS listener with generated certificates."""
    env = {
        "OTA_DATA_DIR": str(tmp_path / "d"),
        "OTA_MQTT_BIND": "127.0.0.1:0",
        "OTA_MQTTS_BIND": "127.0.0.1:0",
        "OTA_HTTPS_BIND": "127.0.0.1:9443",
        "OTA_PUBLIC_URL": "https://gw.example:9443",
        "OTA_ADMIN_BIND": "127.0.0.1:0",
    }
    cfg, tree = prepare(load(None, cwd=tmp_path), env)
    settings = tree.ota
    assert cfg["listeners"]["default"]["bind"] == "127.0.0.1:0"
    tls = cfg["listeners"]["tls"]
    assert tls["ssl"] is True and Path(tls["certfile"]).exists() and Path(tls["keyfile"]).exists()
    assert settings.data_dir == tmp_path / "d"
    assert (settings.https_bind.host, settings.https_bind.port) == ("127.0.0.1", 9443)
    assert settings.public_url == "https://gw.example:9443" and settings.public_host == "gw.example"
    assert (tmp_path / "d" / "tls" / "ca.crt").exists()


def test_empty_mqtts_bind_turns_tls_listener_off(tmp_path: Path) -> None:
    """OTA_MQTTS_BIND set to empty means no MQTT-over-TLS listener."""
    cfg, tree = prepare(load(None, cwd=tmp_path), {"OTA_DATA_DIR": str(tmp_path), "OTA_MQTTS_BIND": ""})
    assert "tls" not in cfg["listeners"] and tree.ota.mqtts_bind is None


def test_websocket_listeners_are_off_by_default_and_set_by_environment(tmp_path: Path) -> None:
    """MQTT over WebSockets (OTA_WS_BIND) and secure WebSockets (OTA_WSS_BIND, with the generated
    certificate) are listeners of amqtt's type ws, added only when their bind is set."""
    base = {"OTA_DATA_DIR": str(tmp_path / "d"), "OTA_MQTTS_BIND": ""}
    cfg, tree = prepare(load(None, cwd=tmp_path), base)
    assert {"ws", "wss"}.isdisjoint(cfg["listeners"]) and (tree.ota.ws_bind, tree.ota.wss_bind) == (
        None,
        None,
    )
    env = base | {"OTA_WS_BIND": "127.0.0.1:8080", "OTA_WSS_BIND": "127.0.0.1:8084"}
    cfg, _ = prepare(load(None, cwd=tmp_path), env)
    assert cfg["listeners"]["ws"] == {"type": "ws", "bind": "127.0.0.1:8080"}
    wss = cfg["listeners"]["wss"]
    assert (wss["type"], wss["bind"], wss["ssl"]) == ("ws", "127.0.0.1:8084", True)
    assert Path(wss["certfile"]).exists() and Path(wss["keyfile"]).exists()
    assert "tls" not in cfg["listeners"]


def test_public_url_port_zero_takes_the_bound_port() -> None:
    """A public URL with port 0 is completed with the port the HTTPS endpoint bound; others stay as given."""
    s = resolve(OtaConfig(public_url="https://127.0.0.1:0"), {})
    assert s.public_url_for(44321) == "https://127.0.0.1:44321"
    s = resolve(OtaConfig(public_url="https://gw.example/"), {})
    assert s.public_url_for(44321) == "https://gw.example"
    s = resolve(OtaConfig(), {})
    assert s.public_url_for(8443).endswith(":8443")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"OTA_MQTT_BIND": "nonsense"}, "OTA_MQTT_BIND"),
        ({"OTA_HTTPS_BIND": "127.0.0.1:99999"}, "https_bind"),
        ({"OTA_ADMIN_BIND": ":80"}, "admin_bind"),
        ({"OTA_AUTH_MODE": "whatever"}, "auth_mode"),
        ({"OTA_PUBLIC_URL": "http://insecure:8443"}, "public_url"),
        ({"OTA_MQTTS_BIND": "1.2.3.4"}, "mqtts_bind"),
        ({"OTA_WS_BIND": "1.2.3.4"}, "ws_bind"),
        ({"OTA_WSS_BIND": "nonsense:x"}, "wss_bind"),
        ({"OTA_ATTACH_URL": "http://broker:1883"}, "attach_url"),
        ({"OTA_ATTACH_URL": "mqtt://"}, "attach_url"),
        ({"OTA_ATTACH_URL": "mqtt://broker:99999"}, "attach_url"),
        ({"OTA_ATTACH_URL": "mqtt://broker:1883/path"}, "attach_url"),
        ({"OTA_ATTACH_GROUP": "a/b"}, "attach_group"),
        ({"OTA_ATTACH_CLIENT_ID": ""}, "attach_client_id"),
    ],
)
def test_bad_values_fail_with_the_key(tmp_path: Path, env: dict[str, str], key: str) -> None:
    """A bad value fails at load with the key (or variable) named."""
    with pytest.raises(ConfigError, match=key):
        prepare(load(None, cwd=tmp_path), {"OTA_DATA_DIR": str(tmp_path), **env})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("listeners: [", "not valid YAML"),
        ("- a\n- b\n", "mapping"),
        ("plugins: {}\n", "listeners.default"),
        ("listeners: {default: {bind: '127.0.0.1:0'}}\nplugins: {}\n", f"plugins.{PLUGIN_KEY}"),
        (
            f"listeners: {{default: {{bind: '127.0.0.1:0'}}}}\nplugins: {{{PLUGIN_KEY}: {{colour: red}}}}\n",
            f"plugins.{PLUGIN_KEY}.colour",
        ),
        (
            f"listeners: {{default: {{bind: '127.0.0.1:0'}}}}\nplugins: {{{PLUGIN_KEY}: {{max_payload_bytes: -1}}}}\n",
            "max_payload_bytes",
        ),
        (
            f"listeners: {{default: {{bind: '127.0.0.1:0'}}}}\n"
            f"plugins: {{{PLUGIN_KEY}: {{audit_retention_days: -1}}}}\n",
            "audit_retention_days",
        ),
    ],
)
def test_bad_files_fail_with_the_key(tmp_path: Path, text: str, key: str) -> None:
    """A malformed file fails at load, naming the key path and the reason."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        prepare(load(path), {"OTA_DATA_DIR": str(tmp_path)})


async def test_repo_config_keeps_amqtts_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.yaml keeps amqtt's format: amqtt's own loader accepts the file and instantiates the OTA plugin
    with the file's entry as it is (the environment's overrides are applied by `configure`, not by the
    plugin: it reads no environment)."""
    monkeypatch.setenv("OTA_DATA_DIR", str(tmp_path))
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    broker = Broker(raw)
    plugin = broker.plugins_manager.get_plugin("OtaPlugin")
    assert plugin is not None
    assert plugin.settings == validate(OtaConfig(**raw["plugins"][PLUGIN_KEY]))
    assert plugin.settings.data_dir != tmp_path


def test_overrides_reach_the_plugin_through_the_prepared_configuration(tmp_path: Path) -> None:
    """The amqtt configuration `prepare` returns carries the OTA entry with the environment applied, so the
    plugin amqtt builds from it holds the same settings as the tree, whatever the process's own environment."""
    env = {"OTA_DATA_DIR": str(tmp_path / "d"), "OTA_MQTTS_BIND": "", "OTA_AUTH_MODE": "open"}
    cfg, tree = prepare(load(None, cwd=tmp_path), env)
    entry = OtaConfig(**cfg["plugins"][PLUGIN_KEY])
    assert validate(entry) == tree.ota
    assert tree.ota.data_dir == tmp_path / "d" and tree.ota.auth_mode == "open"


@pytest.mark.parametrize(
    ("auth", "key"),
    [
        ({"accounts": {"a&b": {"password_hash": "$argon2id$x"}}}, "accounts.a&b"),
        ({"accounts": {"dash": {"password_hash": "plaintext"}}}, "accounts.dash.password_hash"),
        ({"accounts": {"dash": {"password_hash": "$argon2id$x", "subscribe": ["a/#/b"]}}}, r"subscribe\[0\]"),
        ({"accounts": {"dash": {"password": "x"}}}, "DeviceAuthPlugin"),
        ({"max_timestamp_skew_s": -1}, "max_timestamp_skew_s"),
    ],
)
def test_bad_auth_settings_fail_with_the_key(tmp_path: Path, auth: dict, key: str) -> None:
    """The device-auth plugin's accounts and options are checked at load, naming the key."""
    raw = yaml.safe_load(default_config_text())
    raw["plugins"]["plugins.device_auth.plugin.DeviceAuthPlugin"] = auth
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=key):
        prepare(load(path), {"OTA_DATA_DIR": str(tmp_path)})


def test_defaults_document_every_limit() -> None:
    """config.yaml lists every MQTT limit with its default value."""
    from broker.limits import LimitsConfig

    entry = yaml.safe_load(default_config_text())["plugins"]["broker.limits.MqttLimits"]
    defaults = LimitsConfig()
    assert set(entry) == set(LimitsConfig.__dataclass_fields__)
    for key, value in entry.items():
        assert value == getattr(defaults, key), key


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"max_packet_size_kb": 0}, "max_packet_size_kb"),
        ({"max_inflight_messages": -3}, "max_inflight_messages"),
        ({"retry_interval_s": "soon"}, "retry_interval_s"),
        ({"max_queue": 5}, "max_queue"),
        ({"session_expiry_interval": -1}, "session_expiry_interval"),
    ],
)
def test_bad_limits_fail_with_the_key(tmp_path: Path, change: dict, key: str) -> None:
    """The MQTT limits and amqtt's session expiry are checked at load, naming the key."""
    raw = yaml.safe_load(default_config_text())
    if "session_expiry_interval" in change:
        raw.update(change)
    else:
        raw["plugins"]["broker.limits.MqttLimits"].update(change)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=key):
        prepare(load(path), {"OTA_DATA_DIR": str(tmp_path)})


def _check(tmp_path: Path, **ota: object) -> str:
    """`check-config`'s text for the repo config with `ota` keys changed (no environment overrides)."""
    doc = yaml.safe_load(default_config_text())
    doc["plugins"][PLUGIN_KEY] |= {"data_dir": str(tmp_path / "data"), **ota}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    loaded = load(path)
    amqtt_config, tree = prepare(loaded, env={}, dry_run=True)
    return effective_config(tree, amqtt_config)


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("# warning:")]


@pytest.mark.parametrize("url", ["https://gw.example:8443", "https://gw.example:0", "https://[::1]:9000/ota"])
def test_check_config_warns_when_the_public_url_names_a_port(tmp_path: Path, url: str) -> None:
    """A public URL naming a port is flagged with iotkit-embedded v3's limitation."""
    [warning] = _warnings(_check(tmp_path, public_url=url))
    assert "names port" in warning and "iotkit-embedded v3" in warning and "443" in warning


@pytest.mark.parametrize("url", ["https://gw.example", "https://gw.example:443", "https://10.0.0.5/ota"])
def test_public_url_without_a_port_or_with_443_needs_no_warning(tmp_path: Path, url: str) -> None:
    """No port, or the default 443 (which is then dropped from the URL), is what every SDK parses."""
    text = _check(tmp_path, public_url=url)
    assert _warnings(text) == []
    assert ":443" not in text


def test_default_public_url_on_443_names_no_port(tmp_path: Path) -> None:
    """With HTTPS bound on 443 the built-in public URL is https://<hostname>, no port."""
    settings = resolve(OtaConfig(https_bind="0.0.0.0:443"), {})
    assert settings.public_port is None and settings.public_url.count(":") == 1
    assert resolve(OtaConfig(public_url="https://127.0.0.1:0"), {}).public_url_for(443) == "https://127.0.0.1"


@pytest.mark.parametrize(
    ("key_type", "warned"), [(trustme.KeyType.ECDSA, True), (trustme.KeyType.RSA, False)]
)
def test_check_config_warns_about_certificates_the_c_sdks_cannot_verify(
    tmp_path: Path, key_type: trustme.KeyType, warned: bool
) -> None:
    """An operator's elliptic-curve certificate is flagged (Aliyun's C SDKs cannot connect); an RSA one is not."""
    ca = trustme.CA(key_type=key_type)
    server = ca.issue_cert("gw.example", key_type=key_type)
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    server.cert_chain_pems[0].write_to_path(str(cert))
    server.private_key_pem.write_to_path(str(key))
    found = _warnings(_check(tmp_path, public_url="https://gw.example", tls_cert=str(cert), tls_key=str(key)))
    assert bool(found) == warned, found
    if warned:
        assert "tls_cert" in found[0] and "C SDK" in found[0]


def test_tls_profile_setting_and_override(tmp_path: Path) -> None:
    """tls_profile defaults to compatible, OTA_TLS_PROFILE overrides it, an unknown one fails with the key."""
    assert resolve(OtaConfig(), {}).tls_profile == "compatible"
    assert resolve(OtaConfig(), {"OTA_TLS_PROFILE": "modern"}).tls_profile == "modern"
    with pytest.raises(ConfigError, match=r"tls_profile: 'legacy' is not one of compatible, modern"):
        resolve(OtaConfig(), {"OTA_TLS_PROFILE": "legacy"})
    assert any(
        "tls_profile is modern" in w
        for w in _warnings(_check(tmp_path, public_url="https://gw", tls_profile="modern"))
    )


def test_closed_sets_of_values_are_enums() -> None:
    """auth_mode, download_offload and tls_profile resolve to enum members spelled as in config.yaml; the
    TLS profiles are exactly those firmware_store knows; an unknown value names the key and the choices."""
    from firmware_store.tls import PROFILES
    from plugins.ota.settings import AuthMode, DownloadOffload, TlsProfile

    settings = resolve(OtaConfig(), {"OTA_AUTH_MODE": "open", "OTA_TLS_PROFILE": "modern"})
    assert settings.auth_mode is AuthMode.OPEN and settings.auth_mode == "open"
    assert settings.tls_profile is TlsProfile.MODERN and settings.download_offload is DownloadOffload.NONE
    assert tuple(TlsProfile) == PROFILES
    with pytest.raises(ConfigError, match=r"auth_mode: 'whatever' is not one of device-secret, open"):
        resolve(OtaConfig(auth_mode="whatever"), {})
    with pytest.raises(ConfigError, match=r"download_offload: 'varnish' is not one of '', 'nginx'"):
        resolve(OtaConfig(download_offload="varnish", public_url="https://x.example"), {})


def test_configure_builds_the_one_settings_tree_and_touches_nothing(tmp_path: Path) -> None:
    """`configure` reads the OTA_* overrides once into one tree (OTA settings, auth accounts, MQTT limits,
    the MQTT bind), lists the overrides used, and creates no data directory."""
    from broker.config import configure
    from broker.limits import LimitsConfig

    text = default_config_text() + (
        "  broker.limits.MqttLimits:\n    max_inflight_messages: 7\n"
        "  plugins.device_auth.plugin.DeviceAuthPlugin:\n    max_timestamp_skew_s: 30\n"
    )
    doc = yaml.safe_load(text)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {"OTA_DATA_DIR": str(tmp_path / "d"), "OTA_AUTH_MODE": "open", "OTA_MQTT_BIND": "127.0.0.1:1999"}
    tree = configure(load(path), env)
    assert tree.ota.data_dir == tmp_path / "d" and tree.ota.auth_mode == "open"
    assert tree.ota_entry.auth_mode == "open" and tree.overrides == (
        "OTA_AUTH_MODE",
        "OTA_DATA_DIR",
        "OTA_MQTT_BIND",
    )
    assert tree.limits == LimitsConfig(max_inflight_messages=7)
    assert tree.auth is not None and tree.auth.max_timestamp_skew_s == 30
    assert str(tree.mqtt_bind) == "127.0.0.1:1999"
    assert tree.amqtt_config(dry_run=True)["listeners"]["default"]["bind"] == "127.0.0.1:1999"
    assert not (tmp_path / "d").exists()

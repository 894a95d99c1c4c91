"""Load the broker configuration: `--config`, else `./config.yaml`, else the built-in defaults; then the
`OTA_*` environment overrides and the MQTT-over-TLS and WebSocket listeners. Fails fast with the key path
and reason."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from dacite import Config as DaciteConfig
from dacite import DaciteError, from_dict

from broker.limits import LimitsConfig
from firmware_store.tls import COMPATIBLE, c_sdk_problem, ensure_tls
from plugins.device_auth.plugin import DeviceAuthConfig, config_problem
from plugins.ota.settings import PLUGIN_KEY, ConfigError, OtaConfig, Settings, parse_bind, resolve

AUTH_PLUGIN_KEY = "plugins.device_auth.plugin.DeviceAuthPlugin"

__all__ = ["ConfigError", "Loaded", "default_config_text", "load", "prepare", "warnings"]

log = logging.getLogger("ota.config")


@dataclass(frozen=True, slots=True)
class Loaded:
    source: str
    raw: dict[str, Any]


def default_config_text() -> str:
    return resources.files("broker").joinpath("default_config.yaml").read_text(encoding="utf-8")


def load(path: Path | None, cwd: Path | None = None) -> Loaded:
    """Read the configuration file named, or ./config.yaml, or the built-in defaults."""
    if path is None:
        candidate = (cwd or Path.cwd()) / "config.yaml"
        if candidate.exists():
            path = candidate
    if path is None:
        return Loaded("built-in defaults", _parse(default_config_text(), "built-in defaults"))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    return Loaded(str(path), _parse(text, str(path)))


def _parse(text: str, source: str) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: must be a mapping with 'listeners' and 'plugins'")
    if not isinstance(doc.get("listeners"), dict) or not isinstance(doc["listeners"].get("default"), dict):
        raise ConfigError(f"{source}: listeners.default: a 'default' listener is required")
    plugins = doc.get("plugins")
    if not isinstance(plugins, dict) or PLUGIN_KEY not in plugins:
        raise ConfigError(f"{source}: plugins.{PLUGIN_KEY}: the OTA plugin entry is required")
    return doc


def ota_settings(raw: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    entry = raw["plugins"][PLUGIN_KEY] or {}
    if not isinstance(entry, dict):
        raise ConfigError(f"plugins.{PLUGIN_KEY}: must be a mapping")
    known = set(OtaConfig.__dataclass_fields__)
    for key in entry:
        if key not in known:
            raise ConfigError(f"plugins.{PLUGIN_KEY}.{key}: unknown key (known: {', '.join(sorted(known))})")
    return resolve(OtaConfig(**entry), env)


def check_auth(raw: Mapping[str, Any]) -> None:
    """Check the device-auth plugin's entry (accounts, patterns, options), naming the key."""
    entry = raw["plugins"].get(AUTH_PLUGIN_KEY)
    if entry is None:
        return
    key = f"plugins.{AUTH_PLUGIN_KEY}"
    try:
        config = from_dict(DeviceAuthConfig, entry or {}, config=DaciteConfig(strict=True))
    except DaciteError as e:
        raise ConfigError(f"{key}: {e}") from e
    problem = config_problem(config)
    if problem:
        raise ConfigError(f"{key}.{problem}")


LIMITS_PLUGIN_KEY = "broker.limits.MqttLimits"


def check_limits(raw: Mapping[str, Any]) -> None:
    """Check the MQTT limits entry, naming the key."""
    key = f"plugins.{LIMITS_PLUGIN_KEY}"
    try:
        from_dict(LimitsConfig, raw["plugins"].get(LIMITS_PLUGIN_KEY) or {}, config=DaciteConfig(strict=True))
    except (DaciteError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from e
    expiry = raw.get("session_expiry_interval")
    if expiry is not None and (not isinstance(expiry, int) or isinstance(expiry, bool) or expiry <= 0):
        raise ConfigError(f"session_expiry_interval: must be a positive number of seconds, not {expiry!r}")


def prepare(
    loaded: Loaded, env: Mapping[str, str] | None = None, *, dry_run: bool = False
) -> tuple[dict[str, Any], Settings]:
    """The amqtt configuration to run, with overrides applied and TLS material in place.

    `dry_run` (`ota-broker check-config`) validates the same and touches nothing: the TLS listener names
    the generated certificate's paths without generating it (nor the data directory).
    """
    env = os.environ if env is None else env
    cfg = copy.deepcopy(loaded.raw)
    check_auth(cfg)
    check_limits(cfg)
    if "OTA_MQTT_BIND" in env:
        cfg["listeners"]["default"]["bind"] = str(parse_bind(env["OTA_MQTT_BIND"], "OTA_MQTT_BIND"))
    else:
        parse_bind(str(cfg["listeners"]["default"].get("bind", "")), "listeners.default.bind")
    settings = ota_settings(cfg, env)
    listeners = cfg["listeners"]
    secure = {"tls": ("tcp", settings.mqtts_bind), "wss": ("ws", settings.wss_bind)}
    if any(bind is not None and name not in listeners for name, (_, bind) in secure.items()):
        if settings.tls_cert and settings.tls_key:
            cert, key = settings.tls_cert, settings.tls_key
        elif dry_run:
            cert, key = settings.data_dir / "tls" / "server.crt", settings.data_dir / "tls" / "server.key"
        else:
            files = ensure_tls(settings.data_dir / "tls", settings.public_host, settings.tls_profile)
            cert, key = files.cert, files.key
        for name, (kind, bind) in secure.items():
            if bind is not None and name not in listeners:
                listeners[name] = {
                    "type": kind,
                    "bind": str(bind),
                    "ssl": True,
                    "certfile": str(cert),
                    "keyfile": str(key),
                }
    if settings.ws_bind is not None and "ws" not in listeners:  # MQTT over WebSockets, at /mqtt
        listeners["ws"] = {"type": "ws", "bind": str(settings.ws_bind)}
    if not dry_run:
        for warning in warnings(settings):
            log.warning("%s", warning)
    return cfg, settings


def warnings(settings: Settings) -> list[str]:
    """What in a valid configuration keeps some devices out: Aliyun's C SDKs (static-RSA TLS suites and
    RSA certificates only) and iotkit-embedded v3's URL parsing (a port in a URL becomes part of the
    host name). Printed by `check-config` and logged at start."""
    found = []
    port = settings.public_port
    if port is not None and not (port == 0 and settings.https_bind.port == 443):
        found.append(
            f"public_url {settings.public_url} names port {port}: iotkit-embedded v3 devices cannot "
            "download from it (their HTTP client keeps host:port as the host name); serve downloads on "
            "443 and give public_url without a port (docs/deploy.md)"
        )
    if settings.tls_profile != COMPATIBLE:
        found.append(
            f"tls_profile is {settings.tls_profile}: Aliyun's C SDKs (LinkSDK C v4, iotkit-embedded v3) "
            "cannot connect, they offer only TLS 1.2 static-RSA suites"
        )
    elif settings.tls_cert is not None:
        problem = c_sdk_problem(settings.tls_cert)
        if problem:
            found.append(f"tls_cert: {problem}: Aliyun's C SDK devices cannot connect")
    return found

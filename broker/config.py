"""The broker's settings, loaded once: `--config`, else `./config.yaml`, else the built-in defaults, read
(`load`), then validated with the `OTA_*` environment overrides applied into one typed tree (`configure`,
`BrokerSettings`), which the CLI passes down. Fails fast with the key path and reason.

config.yaml keeps amqtt's format (`listeners:`, `plugins:`); each part of the tree is typed where it is
used: the OTA service's settings (OTA, TLS, admin API, auth mode, listener binds) in
`plugins.ota.settings`, the device-auth accounts in `plugins.device_auth.gate`, the MQTT limits in
`broker.limits`. `BrokerSettings.amqtt_config` is what amqtt runs: the file's listeners with
`OTA_MQTT_BIND` applied and the MQTT-over-TLS and WebSocket listeners added."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from dacite import Config as DaciteConfig
from dacite import DaciteError, from_dict

from broker.limits import LimitsConfig
from firmware_store.tls import COMPATIBLE, c_sdk_problem, ensure_tls
from plugins.device_auth.gate import DeviceAuthConfig, config_problem
from plugins.ota.settings import (
    ENV,
    PLUGIN_KEY,
    Bind,
    ConfigError,
    OtaConfig,
    Settings,
    apply_env,
    parse_bind,
    validate,
)

AUTH_PLUGIN_KEY = "plugins.device_auth.plugin.DeviceAuthPlugin"

__all__ = [
    "BrokerSettings",
    "ConfigError",
    "Loaded",
    "configure",
    "default_config_text",
    "load",
    "prepare",
    "warnings",
]

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


def ota_entry(raw: Mapping[str, Any], env: Mapping[str, str]) -> OtaConfig:
    """The OTA plugin's entry as config.yaml spells it, with the `OTA_*` overrides (`ENV`) applied."""
    entry = raw["plugins"][PLUGIN_KEY] or {}
    if not isinstance(entry, dict):
        raise ConfigError(f"plugins.{PLUGIN_KEY}: must be a mapping")
    known = set(OtaConfig.__dataclass_fields__)
    for key in entry:
        if key not in known:
            raise ConfigError(f"plugins.{PLUGIN_KEY}.{key}: unknown key (known: {', '.join(sorted(known))})")
    return apply_env(OtaConfig(**entry), env)


def check_auth(raw: Mapping[str, Any]) -> DeviceAuthConfig | None:
    """Check the device-auth plugin's entry (accounts, patterns, options), naming the key."""
    entry = raw["plugins"].get(AUTH_PLUGIN_KEY)
    if entry is None:
        return None
    key = f"plugins.{AUTH_PLUGIN_KEY}"
    try:
        config = from_dict(DeviceAuthConfig, entry or {}, config=DaciteConfig(strict=True))
    except DaciteError as e:
        raise ConfigError(f"{key}: {e}") from e
    problem = config_problem(config)
    if problem:
        raise ConfigError(f"{key}.{problem}")
    return config


LIMITS_PLUGIN_KEY = "broker.limits.MqttLimits"


def check_limits(raw: Mapping[str, Any]) -> LimitsConfig:
    """Check the MQTT limits entry, naming the key."""
    key = f"plugins.{LIMITS_PLUGIN_KEY}"
    try:
        limits = from_dict(
            LimitsConfig, raw["plugins"].get(LIMITS_PLUGIN_KEY) or {}, config=DaciteConfig(strict=True)
        )
    except (DaciteError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from e
    expiry = raw.get("session_expiry_interval")
    if expiry is not None and (not isinstance(expiry, int) or isinstance(expiry, bool) or expiry <= 0):
        raise ConfigError(f"session_expiry_interval: must be a positive number of seconds, not {expiry!r}")
    return limits


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """The one settings tree of `ota-broker`: config.yaml with the `OTA_*` overrides applied, validated.

    Built once by `configure`; `ota` holds the OTA service's settings (and with them TLS, the admin API,
    the auth mode and the listener binds), `auth` the device-auth accounts (None: no such plugin entry),
    `limits` the MQTT limits (`broker.limits.LimitsConfig`, as that module declares them)."""

    source: str
    ota: Settings
    ota_entry: OtaConfig  # the OTA plugin's keys as config.yaml spells them, overrides applied
    overrides: tuple[str, ...]  # the OTA_* variables that changed something
    auth: DeviceAuthConfig | None
    limits: LimitsConfig
    mqtt_bind: Bind
    raw: Mapping[str, Any]  # the file as read, in amqtt's format

    def amqtt_config(self, *, dry_run: bool = False) -> dict[str, Any]:
        """The configuration amqtt runs: the file's, with `OTA_MQTT_BIND` applied and the MQTT-over-TLS and
        WebSocket listeners added; TLS material is generated under the data folder when needed.

        `dry_run` (`ota-broker check-config`) touches nothing: the TLS listeners name the generated
        certificate's paths without generating it (nor the data directory)."""
        settings = self.ota
        cfg = copy.deepcopy(dict(self.raw))
        cfg["plugins"][PLUGIN_KEY] = asdict(self.ota_entry)  # the entry with its overrides
        listeners = cfg["listeners"]
        listeners["default"]["bind"] = str(self.mqtt_bind)
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
        return cfg


def configure(loaded: Loaded, env: Mapping[str, str] | None = None) -> BrokerSettings:
    """The settings tree of `loaded` with the `OTA_*` overrides of `env` (default: the process's)
    applied: the one place they are read. Touches nothing on disk."""
    env = os.environ if env is None else env
    raw = loaded.raw
    auth = check_auth(raw)
    limits = check_limits(raw)
    if "OTA_MQTT_BIND" in env:
        mqtt_bind = parse_bind(env["OTA_MQTT_BIND"], "OTA_MQTT_BIND")
    else:
        mqtt_bind = parse_bind(str(raw["listeners"]["default"].get("bind", "")), "listeners.default.bind")
    entry = ota_entry(raw, env)
    overrides = tuple(v for v in sorted((*ENV, "OTA_MQTT_BIND")) if v in env)
    ota = validate(entry)  # the overrides are in `entry` already
    return BrokerSettings(loaded.source, ota, entry, overrides, auth, limits, mqtt_bind, raw)


def prepare(
    loaded: Loaded, env: Mapping[str, str] | None = None, *, dry_run: bool = False
) -> tuple[dict[str, Any], BrokerSettings]:
    """`configure`, then the amqtt configuration to run (`BrokerSettings.amqtt_config`); the warnings are
    logged unless `dry_run`."""
    tree = configure(loaded, env)
    cfg = tree.amqtt_config(dry_run=dry_run)
    if not dry_run:
        for warning in warnings(tree.ota):
            log.warning("%s", warning)
    return cfg, tree


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

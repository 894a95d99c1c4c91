"""The OTA plugin's configuration: one typed config, `OTA_*` environment overrides, validated at load.

The plugin's entry under `plugins:` in `config.yaml` fills `OtaConfig` (amqtt hands it over as this
dataclass); `resolve()` applies the environment and checks every value, failing with the key path and
the reason.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

from firmware_store.tls import PROFILES

PLUGIN_KEY = "plugins.ota.plugin.OtaPlugin"
AUTH_MODES = ("device-secret", "open")
DOWNLOAD_OFFLOADS = ("", "nginx")
TLS_PROFILES = PROFILES


class ConfigError(ValueError):
    """A configuration value is not acceptable; the message names the key."""


@dataclass
class OtaConfig:
    """Keys of the OTA plugin's entry in `config.yaml`, with their defaults (SPEC §2)."""

    data_dir: str = "./data"
    auth_mode: str = "device-secret"
    https_bind: str = "0.0.0.0:8443"
    public_url: str = ""
    download_offload: str = ""
    admin_bind: str = "127.0.0.1:8080"
    admin_token: str = ""
    admin_tls: bool = False
    mqtts_bind: str = "0.0.0.0:8883"
    ws_bind: str = ""
    wss_bind: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_profile: str = "compatible"
    link_ttl_hours: float = 24.0
    max_payload_bytes: int = 65536
    max_upload_mb: int = 1024
    progress_per_second: float = 5.0
    progress_burst: int = 20
    mqtt_download_bytes_per_second: int = 1_048_576
    max_downloads_per_device: int = 2
    http_header_timeout_s: float = 10.0
    tick_seconds: float = 1.0


ENV: Mapping[str, str] = {
    "OTA_DATA_DIR": "data_dir",
    "OTA_AUTH_MODE": "auth_mode",
    "OTA_HTTPS_BIND": "https_bind",
    "OTA_PUBLIC_URL": "public_url",
    "OTA_DOWNLOAD_OFFLOAD": "download_offload",
    "OTA_ADMIN_BIND": "admin_bind",
    "OTA_MQTTS_BIND": "mqtts_bind",
    "OTA_WS_BIND": "ws_bind",
    "OTA_WSS_BIND": "wss_bind",
    "OTA_TLS_PROFILE": "tls_profile",
}


@dataclass(frozen=True, slots=True)
class Bind:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path
    auth_mode: str
    https_bind: Bind
    public_url: str  # may carry port 0: replaced by the port the HTTPS endpoint bound
    download_offload: str  # "" (the broker serves downloads) or "nginx" (links nginx can check)
    admin_bind: Bind
    admin_token: str
    admin_tls: bool
    mqtts_bind: Bind | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_profile: str  # "compatible" (also the Aliyun C SDKs' static-RSA suites) or "modern"
    link_ttl_s: int
    max_payload_bytes: int
    max_upload_bytes: int
    progress_per_second: float
    progress_burst: int
    mqtt_download_bytes_per_second: int  # firmware served over MQTT, per device
    max_downloads_per_device: int
    http_header_timeout_s: float
    tick_seconds: float
    ws_bind: Bind | None = None  # MQTT over WebSockets, off by default
    wss_bind: Bind | None = None  # MQTT over secure WebSockets, off by default

    @property
    def public_host(self) -> str:
        return urlsplit(self.public_url).hostname or ""

    def public_url_for(self, https_port: int) -> str:
        """The public URL, with a port of 0 replaced by the port the HTTPS endpoint bound."""
        parts = urlsplit(self.public_url)
        if parts.port == 0:
            host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
            bound = parts._replace(netloc=f"{host}:{https_port}").geturl()
            return without_default_port(bound).rstrip("/")
        return self.public_url.rstrip("/")

    @property
    def public_port(self) -> int | None:
        """The port the public URL names (None when it names none: devices use 443)."""
        return urlsplit(self.public_url).port


def without_default_port(url: str) -> str:
    """`url` without `:443`: download URLs never name the default port (iotkit-embedded v3 cannot parse
    a URL that names one)."""
    parts = urlsplit(url)
    if parts.port != 443:
        return url
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{host}" if userinfo else str(host)
    return parts._replace(netloc=netloc).geturl()


def parse_bind(value: str, key: str) -> Bind:
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: {value!r} is not host:port (port 0-65535)")
    return Bind(host, int(port))


def apply_env(config: OtaConfig, env: Mapping[str, str]) -> OtaConfig:
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    for var, key in ENV.items():
        if var in env:
            values[key] = env[var]
    return OtaConfig(**values)


def resolve(config: OtaConfig, env: Mapping[str, str] | None = None) -> Settings:
    """Apply `OTA_*` overrides to `config` and validate every key."""
    cfg = apply_env(config, os.environ if env is None else env)
    key = f"plugins.{PLUGIN_KEY}"
    if cfg.auth_mode not in AUTH_MODES:
        raise ConfigError(f"{key}.auth_mode: {cfg.auth_mode!r} is not one of {', '.join(AUTH_MODES)}")
    https = parse_bind(cfg.https_bind, f"{key}.https_bind")
    if cfg.download_offload not in DOWNLOAD_OFFLOADS:
        raise ConfigError(f"{key}.download_offload: {cfg.download_offload!r} is not one of '', 'nginx'")
    if cfg.download_offload and not cfg.public_url.strip():
        raise ConfigError(f"{key}.public_url: must name the nginx server when download_offload is set")
    public_url = cfg.public_url.strip() or f"https://{socket.gethostname()}:{https.port}"
    parts = urlsplit(public_url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or port == -1:
        raise ConfigError(f"{key}.public_url: {public_url!r} must be an https:// URL with a host")
    public_url = without_default_port(public_url)
    if cfg.tls_profile not in TLS_PROFILES:
        raise ConfigError(f"{key}.tls_profile: {cfg.tls_profile!r} is not one of {', '.join(TLS_PROFILES)}")
    if (cfg.tls_cert == "") != (cfg.tls_key == ""):
        raise ConfigError(f"{key}.tls_cert/tls_key: give both or neither")
    numbers = (
        "link_ttl_hours",
        "max_payload_bytes",
        "max_upload_mb",
        "progress_per_second",
        "progress_burst",
        "mqtt_download_bytes_per_second",
        "max_downloads_per_device",
        "http_header_timeout_s",
        "tick_seconds",
    )
    for name in numbers:
        if not isinstance(getattr(cfg, name), int | float) or getattr(cfg, name) <= 0:
            raise ConfigError(f"{key}.{name}: must be a positive number")
    return Settings(
        data_dir=Path(cfg.data_dir),
        auth_mode=cfg.auth_mode,
        https_bind=https,
        public_url=public_url,
        download_offload=cfg.download_offload,
        admin_bind=parse_bind(cfg.admin_bind, f"{key}.admin_bind"),
        admin_token=cfg.admin_token,
        admin_tls=bool(cfg.admin_tls),
        mqtts_bind=parse_bind(cfg.mqtts_bind, f"{key}.mqtts_bind") if cfg.mqtts_bind.strip() else None,
        tls_cert=Path(cfg.tls_cert) if cfg.tls_cert else None,
        tls_key=Path(cfg.tls_key) if cfg.tls_key else None,
        tls_profile=cfg.tls_profile,
        link_ttl_s=int(cfg.link_ttl_hours * 3600),
        max_payload_bytes=int(cfg.max_payload_bytes),
        max_upload_bytes=int(cfg.max_upload_mb) * 1024 * 1024,
        progress_per_second=float(cfg.progress_per_second),
        progress_burst=int(cfg.progress_burst),
        mqtt_download_bytes_per_second=int(cfg.mqtt_download_bytes_per_second),
        max_downloads_per_device=int(cfg.max_downloads_per_device),
        http_header_timeout_s=float(cfg.http_header_timeout_s),
        tick_seconds=float(cfg.tick_seconds),
        ws_bind=parse_bind(cfg.ws_bind, f"{key}.ws_bind") if cfg.ws_bind.strip() else None,
        wss_bind=parse_bind(cfg.wss_bind, f"{key}.wss_bind") if cfg.wss_bind.strip() else None,
    )

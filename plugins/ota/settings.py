"""The OTA plugin's configuration: one typed config, `OTA_*` environment overrides, validated at load.

The plugin's entry under `plugins:` in `config.yaml` fills `OtaConfig` (the keys as written, with their
defaults); `resolve()` applies an environment's overrides (`ENV`, the one table of `OTA_*` overrides of
this entry; `broker.config.configure` is the one caller that reads the process's) and `validate()` checks
every value into `Settings`, failing with the key path and the reason. Closed sets of values
are enums (`AuthMode`, `DownloadOffload`, `TlsProfile`); being `StrEnum`s they are written and compared
as the strings config.yaml uses. `Settings` is also what the CLI reads to find the management API
(`local_admin_url`, `admin_token_file`, `admin_ca_file`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

PLUGIN_KEY = "plugins.ota.plugin.OtaPlugin"
_E = TypeVar("_E", bound=StrEnum)


class AuthMode(StrEnum):
    """Who may connect: devices with Aliyun's signed login (and configured accounts), or anyone (labs)."""

    DEVICE_SECRET = "device-secret"  # noqa: S105 - a mode's name, not a secret
    OPEN = "open"


class DownloadOffload(StrEnum):
    """Who serves firmware downloads: the broker itself, or an nginx in front that checks the links."""

    NONE = ""
    NGINX = "nginx"


class TlsProfile(StrEnum):
    """The TLS listeners' profile (`firmware_store.tls.PROFILES`): `compatible` also offers the static-RSA
    suites of Aliyun's C SDKs; `modern` only forward-secret ones."""

    COMPATIBLE = "compatible"
    MODERN = "modern"


AUTH_MODES = tuple(AuthMode)
DOWNLOAD_OFFLOADS = tuple(DownloadOffload)
TLS_PROFILES = tuple(TlsProfile)


class ConfigError(ValueError):
    """A configuration value is not acceptable; the message names the key."""


@dataclass
class OtaConfig:
    """Keys of the OTA plugin's entry in `config.yaml`, with their defaults."""

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
    max_downloads: int = 0  # 0: sized from the machine (`auto_max_downloads`)
    control_lag_target_ms: float = 250.0
    http_header_timeout_s: float = 10.0
    tick_seconds: float = 1.0
    audit_retention_days: float = 365.0  # the audit log keeps a change this long; 0: for ever
    # Attached mode: with attach_url set, `ota-broker run` starts no broker of its own and attaches the
    # OTA service as a client to this one (plugins.ota.attached).
    attach_url: str = ""
    attach_username: str = ""
    attach_password: str = ""
    attach_group: str = "ota"
    attach_client_id: str = "ota-broker"
    attach_ca_file: str = ""
    # Where the service's state lives: "" for SQLite in the data folder (ota.db), or a PostgreSQL URL
    # (postgresql://user:password@host:port/database) shared by every replica of an attached service.
    database_url: str = ""


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
    "OTA_MAX_DOWNLOADS": "max_downloads",
    "OTA_ATTACH_URL": "attach_url",
    "OTA_ATTACH_USERNAME": "attach_username",
    "OTA_ATTACH_PASSWORD": "attach_password",
    "OTA_ATTACH_GROUP": "attach_group",
    "OTA_ATTACH_CLIENT_ID": "attach_client_id",
    "OTA_DATABASE_URL": "database_url",
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
    auth_mode: AuthMode
    https_bind: Bind
    public_url: str  # may carry port 0: replaced by the port the HTTPS endpoint bound
    download_offload: DownloadOffload
    admin_bind: Bind
    admin_token: str
    admin_tls: bool
    mqtts_bind: Bind | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_profile: TlsProfile
    link_ttl_s: int
    max_payload_bytes: int
    max_upload_bytes: int
    progress_per_second: float
    progress_burst: int
    mqtt_download_bytes_per_second: int  # firmware served over MQTT, per device
    max_downloads_per_device: int
    http_header_timeout_s: float
    tick_seconds: float
    max_downloads: int = 256  # firmware downloads at once, HTTPS and MQTT streams together (503 beyond)
    control_lag_target_s: float = 0.25  # event-loop lag beyond which transfers are admitted more slowly
    ws_bind: Bind | None = None  # MQTT over WebSockets, off by default
    wss_bind: Bind | None = None  # MQTT over secure WebSockets, off by default
    attach_url: str = ""  # an external broker to attach to (attached mode), "" for the embedded broker
    attach_username: str = ""
    attach_password: str = ""
    attach_group: str = "ota"
    attach_client_id: str = "ota-broker"
    attach_ca_file: str = ""
    database_url: str = ""  # a PostgreSQL URL, "" for SQLite in the data folder
    audit_retention_s: float = 365 * 86400  # 0: the audit log keeps everything

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

    @property
    def local_admin_url(self) -> str:
        """Where this machine reaches the management API: `admin_bind` (an any-address bind on loopback),
        over https when `admin_tls` is set."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104 - compared, not bound
            self.admin_bind.host, self.admin_bind.host
        )
        scheme = "https" if self.admin_tls else "http"
        return (
            f"{scheme}://[{host}]:{self.admin_bind.port}"
            if ":" in host
            else f"{scheme}://{host}:{self.admin_bind.port}"
        )

    @property
    def admin_token_file(self) -> Path:
        """Where the broker writes the admin token it generates (unless `admin_token` is set)."""
        return self.data_dir / "admin.token"

    @property
    def admin_ca_file(self) -> Path | None:
        """The CA that signed the certificate of an `admin_tls` API: the generated one, unless `tls_cert`
        names a certificate of the operator's (then None: the system's trust store)."""
        return None if self.tls_cert is not None else self.data_dir / "tls" / "ca.crt"


def masked_url(url: str, mask: str = "***") -> str:
    """`url` with its userinfo (a user and a password) replaced by `mask`, to print or log it."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if not sep or "@" not in authority:
        return url
    return f"{scheme}://{mask}@{authority.rpartition('@')[2]}{slash}{path}"


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


def resolve(config: OtaConfig, env: Mapping[str, str]) -> Settings:
    """Apply the `OTA_*` overrides in `env` to `config` and validate every key."""
    return validate(apply_env(config, env))


def validate(cfg: OtaConfig) -> Settings:
    """Validate every key of an entry whose overrides are applied already (`broker.config.configure` applies
    them, once, and hands the result to amqtt's plugin section): reads no environment."""
    key = f"plugins.{PLUGIN_KEY}"
    auth_mode = _member(AuthMode, cfg.auth_mode, f"{key}.auth_mode")
    https = parse_bind(cfg.https_bind, f"{key}.https_bind")
    offload = _member(DownloadOffload, cfg.download_offload, f"{key}.download_offload")
    tls_profile = _member(TlsProfile, cfg.tls_profile, f"{key}.tls_profile")
    if offload and not str(cfg.public_url).strip():
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
        "control_lag_target_ms",
    )
    for name in numbers:
        if not isinstance(getattr(cfg, name), int | float) or getattr(cfg, name) <= 0:
            raise ConfigError(f"{key}.{name}: must be a positive number")
    max_downloads = _count(cfg.max_downloads, f"{key}.max_downloads")
    retention = cfg.audit_retention_days
    if isinstance(retention, bool) or not isinstance(retention, int | float) or retention < 0:
        raise ConfigError(f"{key}.audit_retention_days: must be a number of days, 0 or more (0: for ever)")
    attach_url = str(cfg.attach_url).strip()
    if attach_url:
        parts = urlsplit(attach_url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if (
            parts.scheme not in ("mqtt", "mqtts")
            or not parts.hostname
            or port == -1
            or parts.path not in ("", "/")
        ):
            raise ConfigError(
                f"{key}.attach_url: {attach_url!r} must be mqtt://host[:port] or mqtts://host[:port]"
            )
    database_url = str(cfg.database_url).strip()
    if database_url:
        parts = urlsplit(database_url)
        if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
            raise ConfigError(
                f"{key}.database_url: must be postgresql://[user[:password]@]host[:port]/database, "
                f"not {masked_url(database_url)!r}"
            )
    for name in ("attach_group", "attach_client_id"):
        value = str(getattr(cfg, name))
        if not value or any(c in value for c in "/+#") or len(value) > 64:
            raise ConfigError(f"{key}.{name}: {value!r} must be 1-64 characters without / + #")
    return Settings(
        data_dir=Path(cfg.data_dir),
        auth_mode=auth_mode,
        https_bind=https,
        public_url=public_url,
        download_offload=offload,
        admin_bind=parse_bind(cfg.admin_bind, f"{key}.admin_bind"),
        admin_token=cfg.admin_token,
        admin_tls=bool(cfg.admin_tls),
        mqtts_bind=parse_bind(cfg.mqtts_bind, f"{key}.mqtts_bind") if cfg.mqtts_bind.strip() else None,
        tls_cert=Path(cfg.tls_cert) if cfg.tls_cert else None,
        tls_key=Path(cfg.tls_key) if cfg.tls_key else None,
        tls_profile=tls_profile,
        link_ttl_s=int(cfg.link_ttl_hours * 3600),
        max_payload_bytes=int(cfg.max_payload_bytes),
        max_upload_bytes=int(cfg.max_upload_mb) * 1024 * 1024,
        progress_per_second=float(cfg.progress_per_second),
        progress_burst=int(cfg.progress_burst),
        mqtt_download_bytes_per_second=int(cfg.mqtt_download_bytes_per_second),
        max_downloads_per_device=int(cfg.max_downloads_per_device),
        http_header_timeout_s=float(cfg.http_header_timeout_s),
        tick_seconds=float(cfg.tick_seconds),
        max_downloads=max_downloads or auto_max_downloads(),
        control_lag_target_s=float(cfg.control_lag_target_ms) / 1000,
        ws_bind=parse_bind(cfg.ws_bind, f"{key}.ws_bind") if cfg.ws_bind.strip() else None,
        wss_bind=parse_bind(cfg.wss_bind, f"{key}.wss_bind") if cfg.wss_bind.strip() else None,
        attach_url=attach_url,
        attach_username=str(cfg.attach_username),
        attach_password=str(cfg.attach_password),
        attach_group=str(cfg.attach_group),
        attach_client_id=str(cfg.attach_client_id),
        attach_ca_file=str(cfg.attach_ca_file),
        database_url=database_url,
        audit_retention_s=float(retention) * 86400,
    )


def auto_max_downloads(cpus: int | None = None) -> int:
    """The default bound on downloads at once: 128 per CPU core, within 64..1024. A TLS download holds
    about 0.4 MiB while it runs (a read of the file and the TLS buffers), so 256 on a 2-core gateway is
    about 100 MiB at most; the transfer window keeps fewer running when the machine cannot serve them
    all without slowing its MQTT side."""
    cores = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(64, min(1024, 128 * cores))


def _count(value: Any, key: str) -> int:
    """A whole number >= 0 (0: the default), from config.yaml or an `OTA_*` variable's text."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or number < 0 or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{key}: {value!r} must be a whole number >= 0 (0: sized from the machine)")
    return number


def _member(kind: type[_E], value: Any, key: str) -> _E:
    """`value` as a member of `kind`, or a ConfigError naming the key and the allowed values."""
    try:
        return kind(value)
    except ValueError:
        quoted = any(not m.value for m in kind)  # an empty value reads only when quoted
        allowed = ", ".join(repr(m.value) if quoted else m.value for m in kind)
        raise ConfigError(f"{key}: {value!r} is not one of {allowed}") from None

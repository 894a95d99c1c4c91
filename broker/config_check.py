"""`ota-broker check-config`: the effective configuration as YAML, with secrets masked.

Effective means what `ota-broker run` would use: the file (or the built-in defaults) with the `OTA_*`
environment overrides applied, the MQTT-over-TLS listener added, the public URL resolved. The admin token
and the accounts' password hashes are masked; paths (TLS certificate and key) are shown, never contents.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

import yaml

from broker.config import AUTH_PLUGIN_KEY, BrokerSettings, warnings
from plugins.ota.settings import PLUGIN_KEY, ConfigError, OtaConfig, Settings, masked_url

MASK = "********"

__all__ = ["MASK", "effective_config"]


def effective_config(tree: BrokerSettings, amqtt_config: Mapping[str, Any]) -> str:
    """The YAML `check-config` prints: a comment header, then the configuration `run` would use."""
    settings, entry = tree.ota, tree.ota_entry
    _check_files(settings)
    cfg = copy.deepcopy(dict(amqtt_config))
    plugins = cfg["plugins"]
    ota = asdict(entry)
    ota["public_url"] = settings.public_url
    for secret in ("admin_token", "attach_password"):
        if ota[secret]:
            ota[secret] = MASK
    for url in ("attach_url", "database_url"):  # a password in the URL's userinfo
        ota[url] = masked_url(ota[url], MASK)
    plugins[PLUGIN_KEY] = {f.name: ota[f.name] for f in fields(OtaConfig)}
    auth = plugins.get(AUTH_PLUGIN_KEY)
    if isinstance(auth, dict) and isinstance(auth.get("accounts"), dict):
        for account in auth["accounts"].values():
            if isinstance(account, dict) and "password_hash" in account:
                account["password_hash"] = MASK
    header = [
        f"# configuration: {tree.source}: valid",
        f"# environment overrides: {', '.join(tree.overrides) if tree.overrides else 'none'}",
        f"# data directory: {settings.data_dir.resolve()}",
        f"# admin token: {_token_source(entry, settings)}",
        "# secrets are masked; this is what `ota-broker run` would use",
        *(f"# warning: {w}" for w in warnings(settings)),
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def _token_source(entry: OtaConfig, settings: Settings) -> str:
    if entry.admin_token:
        return "set in the configuration (masked)"
    return f"{settings.data_dir / 'admin.token'} (generated at first start)"


def _check_files(settings: Settings) -> None:
    """A configured certificate or key that cannot be read would stop `run`: say so now."""
    key = f"plugins.{PLUGIN_KEY}"
    for name, path in (("tls_cert", settings.tls_cert), ("tls_key", settings.tls_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{key}.{name}: {path} is not a readable file")

"""Run the broker: build amqtt's `Broker` from the prepared configuration, start it, stop on signals."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker
from amqtt.events import BrokerEvents

from broker import datadir, logs
from broker.hardened import HardenedBroker
from firmware_store.tls import reload_certificates
from plugins.device_auth.gate import DeviceAuthConfig
from plugins.ota.attached import AttachedService, AttachError
from plugins.ota.plugin import OtaPlugin
from plugins.ota.settings import PLUGIN_KEY, ConfigError, OtaConfig, Settings, validate

log = logging.getLogger("ota.broker")


SWITCH_INTERVAL_S = 0.001
GC_THRESHOLDS = (50_000, 20, 100)


class StartError(RuntimeError):
    """The broker or the OTA service could not start."""


@dataclass
class RunningBroker:
    broker: Broker
    plugin: OtaPlugin
    mqtt_address: tuple[str, int]
    mqtts_address: tuple[str, int] | None

    @property
    def https_address(self) -> tuple[str, int]:
        assert self.plugin.https_address is not None
        return self.plugin.https_address

    @property
    def admin_address(self) -> tuple[str, int]:
        assert self.plugin.admin_address is not None
        return self.plugin.admin_address

    async def stop(self) -> None:
        await self.broker.shutdown()
        log.info("stopped")


def _bound(broker: Broker, listener: str) -> tuple[str, int] | None:
    server = broker._servers.get(listener)  # amqtt keeps the bound sockets only here
    if server is None or server.instance is None:
        return None
    name = server.instance.sockets[0].getsockname()
    return str(name[0]), int(name[1])


def _data_dir(config: dict[str, Any]) -> Path | None:
    """The OTA service's data folder (persistent MQTT sessions live in its database too)."""
    entry = config.get("plugins", {}).get(PLUGIN_KEY)
    if entry is None:
        return None
    try:
        return validate(OtaConfig(**(entry or {}))).data_dir
    except (TypeError, ConfigError):
        return None  # the OTA plugin reports its own configuration errors


_LISTENER_NAMES = {"default": "MQTT listener", "tls": "MQTT/TLS listener"}
_BIND_ERRORS = (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)


async def start(config: dict[str, Any]) -> RunningBroker:
    """Start the broker and its OTA service; raises StartError naming the cause when anything fails,
    after closing whatever the attempt had opened (listeners, database connections, sites).

    The data folder is checked first (`broker.datadir`), then every TLS certificate and key, so the
    common failures are found before anything is opened at all."""
    data_dir = _data_dir(config)
    try:
        if data_dir is not None:
            datadir.prepare(data_dir)
    except datadir.DataDirError as e:
        raise StartError(str(e)) from e
    _check_certificates(config)
    broker = HardenedBroker(config, session_db=None if data_dir is None else data_dir / datadir.DATABASE)
    try:
        with logs.errors_reported_by_caller("amqtt.broker", "ota.plugin"):
            try:
                await broker.start()
            except Exception as e:
                raise StartError(_listener_failure(broker, e)) from e
            plugin = broker.plugins_manager.get_plugin("OtaPlugin")
            if not isinstance(plugin, OtaPlugin):
                raise StartError("the OTA plugin is not configured")
            if plugin.start_error is not None:
                raise StartError(_service_failure(plugin, plugin.start_error)) from plugin.start_error
    except BaseException:
        await _close_failed(broker)
        raise
    mqtt = _bound(broker, "default")
    assert mqtt is not None
    running = RunningBroker(broker, plugin, mqtt, _bound(broker, "tls"))
    log.info("mqtt listening on %s:%d", *mqtt)
    if running.mqtts_address:
        log.info("mqtts listening on %s:%d", *running.mqtts_address)
    return running


async def _close_failed(broker: HardenedBroker) -> None:
    """Close what a failed start opened, the newest first: the listeners bound, the OTA plugin's sites and
    database (its `close`, through the plugin manager), then the sessions' database. A started broker
    closes all that itself; one whose listeners failed cannot `shutdown()` (amqtt refuses the transition)."""
    if broker.transitions.state == "started":
        await broker.shutdown()
        return
    for server in broker._servers.values():  # amqtt keeps the bound sockets only here
        await server.close_instance()
    await broker.plugins_manager.fire_event(BrokerEvents.PRE_SHUTDOWN, wait=True)
    await broker.plugins_manager.close()
    store = broker._store  # HardenedBroker's SessionStore, opened before the listeners
    if store is not None:
        await store.close()


def _check_certificates(config: dict[str, Any]) -> None:
    """Every TLS listener's certificate and key, and the OTA plugin's, load into a server context."""
    pairs: list[tuple[str, str, str]] = []
    for name, listener in config.get("listeners", {}).items():
        if listener.get("ssl") and listener.get("certfile") and listener.get("keyfile"):
            label = _LISTENER_NAMES.get(name, f"listener {name!r}")
            pairs.append((f"the {label}'s", str(listener["certfile"]), str(listener["keyfile"])))
    entry = config.get("plugins", {}).get(PLUGIN_KEY) or {}
    if entry.get("tls_cert") and entry.get("tls_key"):
        pairs.append(("the HTTPS", str(entry["tls_cert"]), str(entry["tls_key"])))
    for whose, cert, key in pairs:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            reason = (
                f"not a PEM certificate chain with its matching, unencrypted private key ({e.reason})"
                if isinstance(e, ssl.SSLError)
                else _why(e)
            )
            raise StartError(f"{whose} certificate {cert} or key {key} cannot be used: {reason}") from e


def _listener_failure(broker: HardenedBroker, error: BaseException) -> str:
    """Which MQTT listener failed and why, from the first configured one amqtt did not bind."""
    cause = _os_error(error)
    for name, listener in broker.listeners_config.items():
        if "bind" in listener and name not in broker._servers:
            label = _LISTENER_NAMES.get(name, f"listener {name!r}")
            if cause is not None and cause.errno in _BIND_ERRORS:
                return f"the {label} cannot listen on {listener['bind']}: {_why(cause)}"
            return f"the {label} ({listener['bind']}): {_why(cause) if cause else _innermost(error)}"
    return f"the MQTT broker: {_innermost(error)}"


def _service_failure(plugin: OtaPlugin, error: BaseException) -> str:
    cause = _os_error(error)
    if cause is not None and cause.errno in _BIND_ERRORS:
        settings = plugin.settings
        which, bind = (
            ("HTTPS download listener", settings.https_bind)
            if plugin.https_address is None
            else ("admin API listener", settings.admin_bind)
        )
        return f"the {which} cannot listen on {bind}: {_why(cause)}"
    return f"the OTA service: {_why(cause) if cause else _innermost(error)}"


def _os_error(error: BaseException) -> OSError | None:
    """The first OSError (not a TLS error) in `error`'s chain of causes."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, ssl.SSLError) and seen.errno:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _innermost(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return str(error) or type(error).__name__


def _why(error: OSError | ValueError) -> str:
    if isinstance(error, OSError) and error.errno in _BIND_ERRORS:
        return os.strerror(error.errno).lower()  # not asyncio's "error while attempting to bind on ..."
    if isinstance(error, OSError) and error.errno and error.strerror:
        where = f" ({error.filename})" if error.filename else ""
        return error.strerror.lower() + where
    return str(error)


async def serve_attached(settings: Settings, auth: DeviceAuthConfig | None) -> int:
    """Attached mode: the OTA service as a client of the external broker `settings.attach_url`, no broker
    of its own (`auth`: the device-auth accounts, for the external broker's auth hooks); until SIGINT or
    SIGTERM, then stop as `serve` does."""
    service = AttachedService(settings, auth)
    try:
        await service.start()
    except AttachError as e:
        raise StartError(str(e)) from e
    except Exception as e:
        raise StartError(f"the OTA service could not start: {type(e).__name__}: {e}") from e
    _tune_for_serving()
    await _until_signalled()
    await service.stop()
    log.info("stopped")
    return 0


def _reload_certificates() -> None:
    """SIGHUP: every TLS listener's certificate and key loaded again from their files (a renewal), without
    dropping a connection."""
    log.info("SIGHUP: loading the TLS certificates again")
    for line in reload_certificates():
        (log.warning if "not reloaded" in line or "WARNING" in line else log.info)("%s", line)


def _tune_for_serving() -> None:
    """The interpreter tuned for serving, once the service has started."""
    # The database and firmware reads run in worker threads that need the GIL for a moment per call; with
    # the default 5 ms switch interval each hand-off can wait that long behind a busy event loop.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # What exists at start lives as long as the process: out of the collector's way. Young objects are
    # collected every 50,000 allocations instead of 700, so a fleet's worth of connections is not walked
    # over and over while it connects (the collector cost about a third of a 10,000-device connect storm).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_certificates)
    log.info("ready")
    await stop.wait()
    log.info("stopping")


async def serve(config: dict[str, Any]) -> int:
    """Run until SIGINT or SIGTERM; then close listeners, finish database writes and return 0."""
    running = await start(config)
    _tune_for_serving()
    await _until_signalled()
    await running.stop()
    return 0

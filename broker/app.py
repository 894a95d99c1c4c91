"""Run the broker: build amqtt's `Broker` from the prepared configuration, start it, stop on signals."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amqtt.broker import Broker

from broker import limits
from broker.hardened import HardenedBroker
from plugins.ota.plugin import OtaPlugin
from plugins.ota.settings import PLUGIN_KEY, ConfigError, OtaConfig, resolve

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


def _session_db(config: dict[str, Any]) -> Path | None:
    """Persistent MQTT sessions live in the OTA service's database."""
    entry = config.get("plugins", {}).get(PLUGIN_KEY)
    if entry is None:
        return None
    try:
        return resolve(OtaConfig(**(entry or {}))).data_dir / "ota.db"
    except (TypeError, ConfigError):
        return None  # the OTA plugin reports its own configuration errors


async def start(config: dict[str, Any]) -> RunningBroker:
    """Start the broker and its OTA service; raises StartError (after cleaning up) when either fails."""
    limits.apply(config.get("plugins", {}).get("broker.limits.MqttLimits"))
    try:
        broker = HardenedBroker(config, session_db=_session_db(config))
        await broker.start()
    except Exception as e:
        raise StartError(f"the MQTT broker could not start: {e}") from e
    plugin = broker.plugins_manager.get_plugin("OtaPlugin")
    if not isinstance(plugin, OtaPlugin) or plugin.start_error is not None:
        await broker.shutdown()
        reason = (
            "the OTA plugin is not configured" if plugin is None else str(getattr(plugin, "start_error", ""))
        )
        raise StartError(f"the OTA service could not start: {reason}")
    mqtt = _bound(broker, "default")
    assert mqtt is not None
    running = RunningBroker(broker, plugin, mqtt, _bound(broker, "tls"))
    log.info("mqtt listening on %s:%d", *mqtt)
    if running.mqtts_address:
        log.info("mqtts listening on %s:%d", *running.mqtts_address)
    return running


async def serve(config: dict[str, Any]) -> int:
    """Run until SIGINT or SIGTERM; then close listeners, finish database writes and return 0."""
    running = await start(config)
    # The database and firmware reads run in worker threads that need the GIL for a moment per call; with
    # the default 5 ms switch interval each hand-off can wait that long behind a busy event loop.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # What exists at start lives as long as the process: out of the collector's way. Young objects are
    # collected every 50,000 allocations instead of 700, so a fleet's worth of connections is not walked
    # over and over while it connects (the collector cost about a third of a 10,000-device connect storm).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("ready")
    await stop.wait()
    log.info("stopping")
    await running.stop()
    return 0

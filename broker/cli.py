"""`ota-broker`: run the broker, or manage devices, firmware and jobs through the management API."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from argon2 import PasswordHasher

from broker import app as broker_app
from broker.config import ConfigError, load, prepare
from plugins.ota.cli import device_app, firmware_app, job_app

cli = typer.Typer(
    help="A self-hosted OTA service for MQTT devices (Aliyun OTA protocol).", no_args_is_help=True
)
cli.add_typer(device_app, name="device")
cli.add_typer(firmware_app, name="firmware")
cli.add_typer(job_app, name="job")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if level.upper() != "DEBUG":
        for noisy in ("amqtt", "transitions", "aiohttp.access"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@cli.command()
def run(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="amqtt config file (default: ./config.yaml, else built-in)."),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Start the broker, the OTA service, the firmware HTTPS endpoint and the management API."""
    setup_logging(log_level)
    log = logging.getLogger("ota.broker")
    try:
        loaded = load(config)
        amqtt_config, settings = prepare(loaded)
    except ConfigError as e:
        log.error("configuration error: %s", e)
        raise typer.Exit(2) from e
    log.info("configuration: %s; data in %s", loaded.source, settings.data_dir.resolve())
    try:
        code = asyncio.run(broker_app.serve(amqtt_config))
    except broker_app.StartError as e:
        log.error("%s", e)
        raise typer.Exit(1) from e
    raise typer.Exit(code)


@cli.command("hash-password")
def hash_password(
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
) -> None:
    """Print an argon2 hash for an application account's `password_hash` in config.yaml."""
    print(PasswordHasher().hash(password))


def main() -> None:
    cli()

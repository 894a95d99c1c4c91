"""`ota-broker`: run the broker, check its configuration or its health, or manage devices, firmware and
jobs through the management API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Annotated, NoReturn

import asyncpg
import typer
from argon2 import PasswordHasher

from broker import app as broker_app
from broker import backup as backups
from broker import datadir, logs
from broker.config import BrokerSettings, ConfigError, configure, load, warnings
from broker.config_check import effective_config
from firmware_store.links import nginx_secure_link
from plugins.ota.cli import AdminEndpoint, account_app, device_app, firmware_app, job_app
from plugins.ota.settings import Settings, masked_url
from plugins.ota.store.copy import CopyError, copy_sqlite_to_postgres
from plugins.ota.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

cli = typer.Typer(
    help="A self-hosted OTA service for MQTT devices (Aliyun OTA protocol).", no_args_is_help=True
)
cli.add_typer(device_app, name="device")
cli.add_typer(firmware_app, name="firmware")
cli.add_typer(job_app, name="job")
cli.add_typer(account_app, name="account")


def settings_for(config: Path | None) -> BrokerSettings:
    """The settings `ota-broker run --config <config>` would use (file, else ./config.yaml, else the
    built-in defaults; `OTA_*` overrides applied); exit status 2, naming the key, when they are not valid."""
    try:
        return configure(load(config))
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        raise typer.Exit(2) from e


def _client_settings() -> Settings:
    """What the API's clients (health, device, firmware, job) read to find the management API."""
    return settings_for(None).ota


@cli.callback()
def _root(ctx: typer.Context) -> None:
    # Every subcommand that talks to the management API finds it through the same settings as `run`.
    ctx.obj = _client_settings


def setup_logging(level: str, fmt: logs.LogFormat = logs.LogFormat.TEXT) -> None:
    logs.setup(level, fmt)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="amqtt config file (default: ./config.yaml, else built-in)."),
]


@cli.command()
def run(
    config: ConfigOption = None,
    log_level: Annotated[
        str, typer.Option("--log-level", envvar="OTA_LOG_LEVEL", help="debug, info, warning or error.")
    ] = "info",
    log_format: Annotated[
        logs.LogFormat,
        typer.Option(
            "--log-format",
            envvar="OTA_LOG_FORMAT",
            help="text (human-readable lines) or json (one JSON object per line).",
        ),
    ] = logs.LogFormat.TEXT,
) -> None:
    """Start the broker, the OTA service, the firmware HTTPS endpoint and the management API.

    Exit status 2 for a configuration error, 1 when the broker cannot start (one line names the cause),
    0 after SIGINT or SIGTERM.
    """
    datadir.restrict_umask()  # before anything is written: the data folder holds device secrets
    setup_logging(log_level, log_format)
    log = logging.getLogger("ota.broker")
    try:
        tree = configure(load(config))  # the settings, loaded once, then passed down
    except ConfigError as e:
        log.error("configuration error: %s", e)
        raise typer.Exit(2) from e
    settings = tree.ota
    try:
        datadir.prepare(settings.data_dir)  # before the configuration writes TLS material into the folder
    except datadir.DataDirError as e:
        log.error("could not start: %s", e)
        _exit_after_failed_start()
    try:
        amqtt_config = tree.amqtt_config()
    except (OSError, ValueError) as e:  # unreadable or damaged TLS files under the data folder
        log.error(
            "could not start: the TLS files in %s cannot be used: %s (move them aside: new ones are generated)",
            settings.data_dir / "tls",
            e,
        )
        _exit_after_failed_start()
    for warning in warnings(settings):
        log.warning("%s", warning)
    log.info("configuration: %s; data in %s", tree.source, settings.data_dir.resolve())
    try:
        if settings.attach_url:  # attached mode: no broker of its own, no MQTT listeners
            code = asyncio.run(broker_app.serve_attached(settings, tree.auth))
        else:
            code = asyncio.run(broker_app.serve(amqtt_config))
    except broker_app.StartError as e:
        log.error("could not start: %s", e)
        _exit_after_failed_start()
    raise typer.Exit(code)


_THREADS_WAIT_S = 2.0


def _exit_after_failed_start() -> NoReturn:
    """Exit 1, so that systemd's and Docker's restart policies see the failure.

    The start path closes what it opened; a worker thread some library still left behind (an aiosqlite
    connection opened by code that failed before it could be closed) must not keep a process with nothing
    listening alive, so after a short wait the process ends without waiting for such threads."""
    deadline = time.monotonic() + _THREADS_WAIT_S
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(
        t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()
    ):
        logging.shutdown()
        sys.stderr.flush()
        os._exit(1)
    raise typer.Exit(1)


@cli.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Validate a configuration and print the effective settings (OTA_* overrides applied, secrets masked).

    Changes nothing: no data directory, TLS material or token is created. Exit status 2, with the key
    path and the reason, when the configuration is not valid.
    """
    try:
        tree = configure(load(config))
        text = effective_config(tree, tree.amqtt_config(dry_run=True))
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    sys.stdout.write(text)


@cli.command()
def health(
    admin_url: Annotated[
        str | None,
        typer.Option(
            "--admin-url",
            envvar="OTA_ADMIN_URL",
            help="Base URL of the management API (default: from the settings' admin_bind / OTA_ADMIN_BIND).",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the answer.")] = 3.0,
) -> None:
    """Exit 0 when the broker's management API answers GET /api/v1/health, else 1 (container healthchecks)."""
    endpoint = AdminEndpoint(admin_url, _client_settings)
    url = endpoint.url + "/api/v1/health"
    if not url.startswith(("http://", "https://")):
        print(f"unhealthy: {url}: not an http(s) URL", file=sys.stderr)
        raise typer.Exit(1)
    verify = endpoint.verify()
    context = verify if isinstance(verify, ssl.SSLContext) else None
    # Straight to the broker: never through an HTTP(S)_PROXY of the environment.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=timeout) as answer:
            doc = json.loads(answer.read(4096))
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts and refused connections are OSErrors
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        raise typer.Exit(1) from e
    status = doc.get("status") if isinstance(doc, dict) else None
    if status != "ok":
        print(f"unhealthy: {url}: status {status!r}", file=sys.stderr)
        raise typer.Exit(1)
    print(f"ok: {url}")


@cli.command()
def simulate(
    devices: Annotated[
        int | None, typer.Option("--devices", "-n", help="How many devices (default with --secrets: all).")
    ] = None,
    product_key: Annotated[str, typer.Option("--product-key", "-p")] = "pk",
    version: Annotated[str, typer.Option(help="The version devices inform at start.")] = "1.0.0",
    fail_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of upgrades that fail.")] = 0.0,
    fail_step: Annotated[
        str | None, typer.Option(help="Report this failure step (-2, -3, -4); default: drawn per failure.")
    ] = None,
    interrupt_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of downloads cut once and resumed with Range.")
    ] = 0.0,
    download_speed: Annotated[
        int | None, typer.Option(min=1, help="Bytes/s per device (default: unlimited).")
    ] = None,
    flash_seconds: Annotated[float, typer.Option(min=0.0, help="Time to 'flash' after verifying.")] = 0.0,
    reboot: Annotated[
        bool, typer.Option(help="Reconnect after flashing, before informing the new version.")
    ] = True,
    processes: Annotated[int, typer.Option(min=1, help="Worker processes, each with devices/K devices.")] = 1,
    host: Annotated[str, typer.Option(help="The broker's MQTT host.")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="MQTT port (default 1883, 8883 with --tls).")] = None,
    tls: Annotated[bool, typer.Option(help="MQTT over TLS.")] = False,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            help="CA to trust for MQTT/TLS and HTTPS (default: the data folder's tls/ca.crt, if any)."
        ),
    ] = None,
    secrets: Annotated[
        Path | None,
        typer.Option(help="CSV (pk,dn,secret or dn,secret) or JSON (device import answer): signed logins."),
    ] = None,
    name_prefix: Annotated[
        str, typer.Option(help="Device names without --secrets: <prefix>00000...")
    ] = "dev",
    connect_rate: Annotated[
        float, typer.Option(min=0.0, help="New connections per second; 0: unpaced.")
    ] = 200.0,
    idle_exit: Annotated[
        float, typer.Option(min=0.0, help="End this long after the last notice once no device is busy.")
    ] = 30.0,
    duration_limit: Annotated[
        float, typer.Option(min=0.001, help="End after this many seconds at most.")
    ] = 600.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the failure and interruption draws.")] = 0,
    log_level: Annotated[str, typer.Option("--log-level")] = "warning",
) -> None:
    """Simulate Aliyun-SDK devices over real MQTT and HTTPS: inform, take notices, download, report, upgrade.

    Ends when all devices upgraded (or could not log in); or none is busy and --idle-exit s passed without a
    notice; or at --duration-limit. Ctrl-C ends early, with the summary.

    Exit status 0; 1 when no device could log in, the limit cut busy devices off or a worker process died;
    130 after Ctrl-C.
    """
    from simulator import model  # noqa: PLC0415 - the fleet loads only for this command

    try:
        from simulator import display  # noqa: PLC0415 - paho-mqtt (the `simulator` extra) only for this command
    except model.ClientMissing as e:
        print(f"simulate: {e}", file=sys.stderr)
        raise typer.Exit(2) from e

    setup_logging(log_level)
    if ca_file is None:  # the CA the broker generated, when this runs beside it (as `run` finds its folder)
        generated = settings_for(None).ota.data_dir / "tls" / "ca.crt"
        if generated.is_file():
            ca_file = generated
            print(f"simulate: trusting {generated} (the broker's generated CA; --ca-file to choose)")
    options = model.SimulationOptions(
        devices=devices,
        product_key=product_key,
        version=version,
        host=host,
        port=port if port is not None else (8883 if tls else 1883),
        tls=tls,
        ca_file=ca_file,
        secrets=secrets,
        name_prefix=name_prefix,
        fail_rate=fail_rate,
        fail_step=fail_step,
        interrupt_rate=interrupt_rate,
        download_speed=download_speed,
        flash_seconds=flash_seconds,
        reboot=reboot,
        connect_rate=connect_rate,
        idle_exit=idle_exit,
        duration_limit=duration_limit,
        processes=processes,
        seed=seed,
    )
    try:
        options.check()
        model.plan_devices(options)
    except model.SimulatorError as e:
        print(f"simulate: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    result = asyncio.run(display.run_with_display(options, live=sys.stdout.isatty()))
    for line in display.summary_lines(result):
        print(line)
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"results written to {json_out}")
    if result.end_reason == model.EndReason.INTERRUPTED:
        raise typer.Exit(130)
    busy_cut = result.counts["unfinished"] > 0 and result.end_reason == model.EndReason.DURATION_LIMIT
    none_online = bool(result.devices) and result.counts["offline"] == len(result.devices)
    raise typer.Exit(1 if busy_cut or none_online or result.end_reason == model.EndReason.ABORTED else 0)


@cli.command("nginx-link")
def nginx_link(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="amqtt config file (default: ./config.yaml, else built-in)."),
    ] = None,
) -> None:
    """Print nginx's secure_link directives for the download offload (docs/nginx-offload.md).

    The output holds the link secret: `(umask 077; ota-broker nginx-link > /etc/nginx/ota-broker-link.conf)`.
    """
    key_file = settings_for(config).ota.data_dir / "link.key"
    if not key_file.is_file():
        print(f"{key_file} does not exist yet: start the broker once, it makes the key", file=sys.stderr)
        raise typer.Exit(1)
    sys.stdout.write(nginx_secure_link(key_file.read_text().strip().encode()))


@cli.command("copy-database")
def copy_database(
    to: Annotated[
        str,
        typer.Option(
            "--to",
            envvar="OTA_DATABASE_URL",
            help="The empty PostgreSQL database: postgresql://user@host/db.",
        ),
    ],
    config: ConfigOption = None,
) -> None:
    """Copy the embedded SQLite database (<data_dir>/ota.db) into an empty PostgreSQL database: devices and
    their secrets, firmware, jobs, tasks and their history, with their ids (docs/scale-out.md).

    Stop the broker first (its last writes would miss the copy). Firmware files, keys and certificates stay
    in the data folder: replicas share that folder. Exit status 1, with nothing written, when the
    destination is not empty or cannot be reached.
    """
    data_dir = settings_for(config).ota.data_dir
    try:
        copied = asyncio.run(copy_sqlite_to_postgres(data_dir / "ota.db", to))
    except (CopyError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        print(f"copy failed: {e}", file=sys.stderr)
        raise typer.Exit(1) from e
    for table, rows in copied.items():
        print(f"{table:15} {rows:>10,} rows")
    print(f"copied {data_dir / 'ota.db'} to {masked_url(to)}")


@cli.command("backup")
def backup_command(
    destination: Annotated[Path, typer.Argument(help="A new (or empty) folder for the backup.")],
    config: ConfigOption = None,
) -> None:
    """Back up the embedded broker's state while it runs: a consistent copy of its database (devices and their
    secrets, firmware, jobs, tasks, history, MQTT sessions), the firmware files it refers to, each checked
    against its sha256, and the data folder's keys, tokens and certificates. Exit status 1, saying why, when
    it cannot be made."""
    ota = settings_for(config).ota
    if ota.database_url:
        print(
            "this broker keeps its state in PostgreSQL (database_url): back the database up with pg_dump, and "
            f"the data folder {ota.data_dir} (firmware files, keys, certificates) with a file copy",
            file=sys.stderr,
        )
        raise typer.Exit(1)
    try:
        made = backups.backup(ota.data_dir, destination, len(SQLITE_MIGRATIONS))
    except backups.BackupError as e:
        print(str(e), file=sys.stderr)
        raise typer.Exit(1) from e
    _summary(made)
    print(f"backed up {ota.data_dir} to {made.folder}; restore it with: ota-broker restore {made.folder}")


@cli.command("restore")
def restore_command(
    source: Annotated[Path, typer.Argument(help="A folder made by `ota-broker backup`.")],
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="Where to restore (new or empty); default: the settings' data_dir."),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Restore a backup into a new or empty data folder, after checking it whole (its database's integrity
    and schema version, every firmware file's sha256); then start the broker on that folder. Exit status 1,
    with nothing written, when the backup or the destination will not do."""
    target = data_dir or settings_for(config).ota.data_dir
    try:
        made = backups.restore(source, target, len(SQLITE_MIGRATIONS))
    except backups.BackupError as e:
        print(str(e), file=sys.stderr)
        raise typer.Exit(1) from e
    _summary(made)
    print(f"restored {source} into {made.folder}")


def _summary(made: backups.Summary) -> None:
    for table, rows in made.rows.items():
        print(f"{table:15} {rows:>10,} rows")
    print(f"{'firmware files':15} {made.blobs:>10,} ({made.blob_bytes:,} bytes)")


@cli.command("hash-password")
def hash_password(
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True)],
) -> None:
    """Print an argon2 hash for an application account's `password_hash` in config.yaml."""
    print(PasswordHasher().hash(password))


def main() -> None:
    cli()

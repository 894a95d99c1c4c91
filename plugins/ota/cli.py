"""The operator's CLI (`ota-broker device|firmware|job ...`): a client of the management API, nothing
more. It finds the API at `--admin-url` / `OTA_ADMIN_URL`, else where the broker's settings put it
(`admin_bind`, `OTA_ADMIN_BIND`, on loopback when it binds every address; https with `admin_tls`), and its
token in `--token` / `OTA_ADMIN_TOKEN`, else the settings' `admin_token`, else `<data_dir>/admin.token`
(`OTA_DATA_DIR`). An https API is checked against `OTA_ADMIN_CACERT`, else the generated CA,
`<data_dir>/tls/ca.crt`, when it exists. The settings are those `ota-broker run` would use (config.yaml
and the `OTA_*` overrides), loaded only when an option leaves something to find; the root command hands
the loader to its subcommands in the context (`settings_loader`)."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.padding import Padding
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from plugins.device_auth.signing import login_for
from plugins.ota.core.topics import DeviceRef, TopicKind, topic_name
from plugins.ota.settings import Settings

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

AdminUrl = Annotated[
    str | None,
    typer.Option(
        "--admin-url",
        envvar="OTA_ADMIN_URL",
        help="Base URL of the management API (default: from the settings' admin_bind / OTA_ADMIN_BIND).",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="OTA_ADMIN_TOKEN",
        help="Admin token (default: the settings' admin_token, else <data dir>/admin.token).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]
SettingsLoader = Callable[[], Settings]

device_app = typer.Typer(help="Register and inspect devices.", no_args_is_help=True)
firmware_app = typer.Typer(help="Upload and manage firmware.", no_args_is_help=True)
job_app = typer.Typer(help="Start, follow and cancel upgrade jobs.", no_args_is_help=True)


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(1)


def settings_loader(ctx: typer.Context) -> SettingsLoader:
    """The loader of the broker's settings that the root command (`ota-broker`) put in its context."""
    loader = ctx.find_root().obj
    if not callable(loader):
        fail("the broker's settings are not available: run this as `ota-broker ...`")
    return loader  # type: ignore[no-any-return]


class AdminEndpoint:
    """Where the management API is and how to trust it: `url` (given, else from the settings), and for an
    https URL the CA in `OTA_ADMIN_CACERT`, else the broker's generated CA when it exists. The settings
    are loaded at most once, and only when `url`, the CA or the token is not given."""

    def __init__(self, url: str | None, load: SettingsLoader) -> None:
        self._load = load
        self._settings: Settings | None = None
        self.url = (url or self.settings.local_admin_url).rstrip("/")

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = self._load()
        return self._settings

    def verify(self) -> ssl.SSLContext | bool:
        """What an https client checks the API's certificate with (True: the system's trust store)."""
        if not self.url.startswith("https://"):
            return True
        given = os.environ.get("OTA_ADMIN_CACERT")
        ca = Path(given) if given else self.settings.admin_ca_file
        # An https admin API (admin_tls) serves the broker's own certificate: trust its CA when present.
        return ssl.create_default_context(cafile=str(ca)) if ca is not None and ca.is_file() else True

    def token(self, given: str | None) -> str:
        """`given` (--token / OTA_ADMIN_TOKEN), else the settings' admin_token, else the token file."""
        if given is not None:
            return given
        if self.settings.admin_token:
            return self.settings.admin_token
        path = self.settings.admin_token_file
        try:
            return path.read_text().strip()
        except OSError:
            fail(f"no admin token: pass --token, set OTA_ADMIN_TOKEN, or run where {path} exists")


class Api:
    def __init__(self, ctx: typer.Context, url: str | None, token: str | None) -> None:
        endpoint = AdminEndpoint(url, settings_loader(ctx))
        self.url = endpoint.url
        self.host = httpx.URL(self.url).host or "127.0.0.1"
        token = endpoint.token(token)
        verify = endpoint.verify()
        self._client_args: dict[str, Any] = {
            "base_url": f"{self.url}/api/v1",
            "headers": {"Authorization": f"Bearer {token}"},
            "timeout": 60,
            "verify": verify,
        }

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._client() as client:
            response = self._send(client, method, path, **kwargs)
        return response.json() if response.content else None

    def every(self, path: str, params: dict[str, str] | None = None) -> list[Any]:
        """Every item of a paged list: the pages the API links to (`Link: <...>; rel="next"`), in order."""
        items: list[Any] = []
        target: str | httpx.URL = path
        with self._client() as client:
            for _ in range(_MAX_PAGES):
                response = self._send(client, "GET", target, params=params)
                items.extend(response.json())
                following = response.links.get("next", {}).get("url")
                if not following:
                    return items
                target, params = httpx.URL(self.url).join(following), None
        fail(f"GET {path}: more than {_MAX_PAGES} pages")

    def _client(self) -> httpx.Client:
        return httpx.Client(**self._client_args)

    def _send(
        self, client: httpx.Client, method: str, path: str | httpx.URL, **kwargs: Any
    ) -> httpx.Response:
        try:
            response = client.request(method, path, **kwargs)
        except httpx.TransportError as e:
            fail(f"cannot reach the management API at {self.url} ({e}); is `ota-broker run` running?")
        if response.status_code >= 400:
            try:
                body = response.json()
                fail(f"{body.get('message', response.text)} ({response.status_code} {body.get('error', '')})")
            except ValueError:
                fail(f"{response.status_code} {response.text[:200]}")
        return response


_MAX_PAGES = 100_000


def show_json(value: Any) -> None:
    console.print_json(json.dumps(value))


# ------------------------------------------------------------------------------------------ devices


@device_app.command("add")
def device_add(
    ctx: typer.Context,
    product_key: str,
    device_name: str,
    secret: Annotated[str | None, typer.Option(help="Device secret (default: generated).")] = None,
    mqtt_host: Annotated[
        str | None, typer.Option(help="Host for the example commands (default: the API's).")
    ] = None,
    mqtt_port: Annotated[int, typer.Option(help="MQTT port for the example commands.")] = 1883,
    admin_url: AdminUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Register a device; print its secret and ready mosquitto_pub/mosquitto_sub commands that log in as it."""
    body: dict[str, Any] = {"product_key": product_key, "device_name": device_name}
    if secret:
        body["device_secret"] = secret
    api = Api(ctx, admin_url, token)
    created = api.call("POST", "/devices", json=body)
    if as_json:
        show_json(created)
        return
    console.print(f"device {product_key}/{device_name} registered")
    console.print(f"device_secret: {created['device_secret']}", highlight=False)
    _print_login_examples(
        product_key, device_name, created["device_secret"], mqtt_host or api.host, mqtt_port
    )


def _print_login_examples(product_key: str, device_name: str, secret: str, host: str, port: int) -> None:
    device = DeviceRef(product_key, device_name)
    sub = login_for(device, secret, client_id_part=f"{product_key}.{device_name}.sub")
    pub = login_for(device, secret, client_id_part=f"{product_key}.{device_name}.pub")
    inform = json.dumps({"id": 1, "params": {"version": "1.0.0"}})
    console.print("\nlog in as this device (Aliyun one-device-one-secret, hmacsha256):", highlight=False)
    console.print(
        f"  mosquitto_sub -h {host} -p {port} -i '{sub.client_id}' -u '{sub.username}' -P '{sub.password}'"
        f" -t '{topic_name(TopicKind.UPGRADE, device)}' -v",
        highlight=False,
    )
    console.print(
        f"  mosquitto_pub -h {host} -p {port} -i '{pub.client_id}' -u '{pub.username}' -P '{pub.password}'"
        f" -t '{topic_name(TopicKind.INFORM, device)}' -m '{inform}'",
        highlight=False,
    )


def _parse_device(text: str) -> DeviceRef:
    try:
        return DeviceRef.parse(text)
    except ValueError as e:
        fail(str(e))


def _device_call(
    ctx: typer.Context,
    method: str,
    device: str,
    suffix: str,
    admin_url: str | None,
    token: str | None,
    **kw: Any,
) -> Any:
    ref = _parse_device(device)
    return Api(ctx, admin_url, token).call(
        method, f"/devices/{ref.product_key}/{ref.device_name}{suffix}", **kw
    )


@device_app.command("disable")
def device_disable(ctx: typer.Context, device: str, admin_url: AdminUrl = None, token: Token = None) -> None:
    """Refuse the device's logins from now on and close its connections."""
    _device_call(ctx, "PATCH", device, "", admin_url, token, json={"enabled": False})
    console.print(f"device {device} disabled")


@device_app.command("enable")
def device_enable(ctx: typer.Context, device: str, admin_url: AdminUrl = None, token: Token = None) -> None:
    """Accept the device's logins again."""
    _device_call(ctx, "PATCH", device, "", admin_url, token, json={"enabled": True})
    console.print(f"device {device} enabled")


@device_app.command("groups")
def device_groups(
    ctx: typer.Context,
    device: str,
    groups: Annotated[
        list[str] | None, typer.Argument(help="Its groups from now on (none: in no group).")
    ] = None,
    admin_url: AdminUrl = None,
    token: Token = None,
) -> None:
    """Put a device in these groups (replacing the ones it had): a job may target a group (job create --group)."""
    answer = _device_call(ctx, "PATCH", device, "", admin_url, token, json={"groups": list(groups or [])})
    console.print(f"device {device} groups: {', '.join(answer['groups']) or 'none'}", highlight=False)


@device_app.command("delete")
def device_delete(ctx: typer.Context, device: str, admin_url: AdminUrl = None, token: Token = None) -> None:
    """Delete a device with no unfinished task (its task history stays)."""
    _device_call(ctx, "DELETE", device, "", admin_url, token)
    console.print(f"device {device} deleted")


@device_app.command("rotate-secret")
def device_rotate_secret(
    ctx: typer.Context,
    device: str,
    secret: Annotated[str | None, typer.Option(help="The new secret (default: generated).")] = None,
    admin_url: AdminUrl = None,
    token: Token = None,
) -> None:
    """Give the device a new secret; its open connections are closed and must log in again."""
    answer = _device_call(
        ctx, "POST", device, "/secret", admin_url, token, json={"device_secret": secret} if secret else {}
    )
    console.print(f"device_secret: {answer['device_secret']}", highlight=False)


@device_app.command("import")
def device_import(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    admin_url: AdminUrl = None,
    token: Token = None,
) -> None:
    """Register devices from a CSV file (product_key,device_name[,device_secret]); prints the created devices
    with their secrets as CSV on stdout, and a summary on stderr."""
    answer = Api(ctx, admin_url, token).call(
        "POST", "/devices/import", content=file.read_bytes(), headers={"Content-Type": "text/csv"}
    )
    for d in answer["created"]:
        print(f"{d['product_key']},{d['device_name']},{d['device_secret']}")
    for e in answer["errors"]:
        err.print(f"line {e['line']}: {e['message']}", highlight=False)
    err.print(
        f"{len(answer['created'])} created, {answer['existing']} already existed, {len(answer['errors'])} refused"
    )
    if answer["errors"]:
        raise typer.Exit(1)


@device_app.command("list")
def device_list(
    ctx: typer.Context,
    product_key: Annotated[str | None, typer.Option()] = None,
    module: Annotated[str | None, typer.Option()] = None,
    version: Annotated[str | None, typer.Option()] = None,
    online: Annotated[bool | None, typer.Option("--online/--offline", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="Devices whose name contains this, in any case.")] = None,
    group: Annotated[str | None, typer.Option(help="Devices in this group.")] = None,
    admin_url: AdminUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """List devices with their module versions (searched and paged by the broker: every match, however many)."""
    chosen = {"product_key": product_key, "module": module, "version": version, "name": name, "group": group}
    params = {k: v for k, v in chosen.items() if v}
    if online is not None:
        params["online"] = "true" if online else "false"
    devices = Api(ctx, admin_url, token).every("/devices", params)
    if as_json:
        show_json(devices)
        return
    table = Table("device", "online", "modules", "groups", "last seen")
    for d in devices:
        modules = ", ".join(f"{m}={v}" for m, v in d["modules"].items())
        table.add_row(
            f"{d['product_key']}/{d['device_name']}",
            "yes" if d["online"] else "no",
            modules,
            ", ".join(d.get("groups", [])),
            d["last_seen"],
        )
    console.print(table)


@device_app.command("show")
def device_show(
    ctx: typer.Context, device: str, admin_url: AdminUrl = None, token: Token = None, as_json: AsJson = False
) -> None:
    """Show one device (pk/dn) and its tasks, newest first."""
    found = _device_call(ctx, "GET", device, "", admin_url, token)
    if as_json:
        show_json(found)
        return
    console.print(
        f"[bold]{device}[/bold]  online: {'yes' if found['online'] else 'no'}  last seen: {found['last_seen']}"
    )
    for module, version in found["modules"].items():
        console.print(f"  {module}: {version}", highlight=False)
    _task_table(found["tasks"], with_job=True)


# ----------------------------------------------------------------------------------------- firmware


def _firmware_table(items: list[dict[str, Any]]) -> None:
    table = Table("id", "product", "module", "version", "size", "sign", "status")
    for f in items:
        table.add_row(
            str(f["id"]),
            f["product_key"],
            f["module"],
            f["version"],
            str(f["size"]),
            f"{f['sign_method']} {f['sign'][:12]}…",
            f["status"],
        )
    console.print(table)


@firmware_app.command("add")
def firmware_add(
    ctx: typer.Context,
    files: Annotated[
        list[Path],
        typer.Argument(
            exists=True, dir_okay=False, readable=True, help="One file, or up to 20 for a multi-file package."
        ),
    ],
    product_key: Annotated[str, typer.Option("--product-key")],
    version: Annotated[str, typer.Option("--version")],
    module: Annotated[str, typer.Option("--module")] = "default",
    sign_method: Annotated[str, typer.Option("--sign-method", help="Md5 or SHA256.")] = "Md5",
    src_version: Annotated[
        str | None, typer.Option("--src-version", help="Differential package from.")
    ] = None,
    description: Annotated[str, typer.Option("--description")] = "",
    verify: Annotated[bool, typer.Option("--verify", help="Require a verify job before batch jobs.")] = False,
    admin_url: AdminUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Upload a firmware (one file, or several as one package); prints its id, sizes and digests."""
    data = {
        "product_key": product_key,
        "version": version,
        "module": module,
        "sign_method": sign_method,
        "description": description,
        "verify": "true" if verify else "false",
    }
    if src_version:
        data["src_version"] = src_version
    with contextlib.ExitStack() as opened:
        parts = [
            ("file", (p.name, opened.enter_context(p.open("rb")), "application/octet-stream")) for p in files
        ]
        created = Api(ctx, admin_url, token).call("POST", "/firmware", data=data, files=parts)
    if as_json:
        show_json(created)
        return
    console.print(
        f"firmware {created['id']}: {created['product_key']}/{created['module']} {created['version']}",
        highlight=False,
    )
    for f in created["files"]:
        name = f"{f['name']}: " if f["name"] else ""
        console.print(f"  {name}size {f['size']}  md5 {f['md5']}  sha256 {f['sha256']}", highlight=False)


@firmware_app.command("list")
def firmware_list(
    ctx: typer.Context, admin_url: AdminUrl = None, token: Token = None, as_json: AsJson = False
) -> None:
    """List firmware."""
    items = Api(ctx, admin_url, token).every("/firmware")
    show_json(items) if as_json else _firmware_table(items)


@firmware_app.command("show")
def firmware_show(
    ctx: typer.Context,
    firmware_id: int,
    admin_url: AdminUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Show one firmware: what it is, its sums, and the files of a package."""
    found = Api(ctx, admin_url, token).call("GET", f"/firmware/{firmware_id}")
    if as_json:
        show_json(found)
        return
    table = Table("field", "value", show_header=False)
    for key in ("id", "product_key", "module", "version", "src_version", "size", "status", "sign_method"):
        table.add_row(key, "" if found.get(key) is None else str(found[key]))
    for key in ("md5", "sha256", "description", "created_at"):
        table.add_row(key, str(found.get(key) or ""))
    console.print(table)
    if found.get("files"):
        files = Table("file", "size", "md5", "sha256")
        for f in found["files"]:
            files.add_row(f["name"] or "", str(f["size"]), f["md5"], f["sha256"])
        console.print(files)


@firmware_app.command("delete")
def firmware_delete(
    ctx: typer.Context, firmware_id: int, admin_url: AdminUrl = None, token: Token = None
) -> None:
    """Delete firmware no unfinished job uses."""
    Api(ctx, admin_url, token).call("DELETE", f"/firmware/{firmware_id}")
    console.print(f"firmware {firmware_id} deleted")


# --------------------------------------------------------------------------------------------- jobs


def _job_line(job: dict[str, Any]) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in job["counts"].items() if v)
    line = f"job {job['id']} ({job['type']}, firmware {job['firmware_id']}): {job['state']}; {counts}"
    waiting = job.get("waiting_for_capacity") or 0
    if waiting:  # admission control holds their notices until transfers end
        line += f"; {waiting} queued waiting for download capacity"
    return line


def _task_table(tasks: list[dict[str, Any]], *, with_job: bool = False) -> None:
    table = Table(*(["job"] if with_job else []), "device", "module", "state", "progress", "attempts", "desc")
    for t in tasks:
        cells = [str(t["job_id"])] if with_job else []
        table.add_row(
            *cells, t["device"], t["module"], t["state"], f"{t['progress']}%", str(t["attempts"]), t["desc"]
        )
    console.print(table)


@job_app.command("create")
def job_create(
    ctx: typer.Context,
    firmware: Annotated[int, typer.Option("--firmware", help="Firmware id.")],
    device: Annotated[
        list[str] | None, typer.Option("--device", help="pk/dn; repeat. Default: the product.")
    ] = None,
    group: Annotated[
        str | None, typer.Option("--group", help="The product's devices in this group (not with --device).")
    ] = None,
    devices_file: Annotated[
        Path | None, typer.Option("--devices-file", help="CSV or text: pk/dn or pk,dn per line.", exists=True)
    ] = None,
    src_version: Annotated[
        list[str] | None, typer.Option("--src-version", help="Only devices on it; repeat.")
    ] = None,
    job_type: Annotated[str, typer.Option("--type", help="static, dynamic or verify.")] = "static",
    gray: Annotated[
        float | None, typer.Option("--gray", help="Percent of the matched devices (sample).")
    ] = None,
    schedule_at: Annotated[str | None, typer.Option("--schedule-at", help="ISO 8601 start time.")] = None,
    end_at: Annotated[
        str | None, typer.Option("--end-at", help="ISO 8601 end: unfinished tasks cancelled.")
    ] = None,
    rate: Annotated[int | None, typer.Option("--rate", help="At most this many notices per minute.")] = None,
    timeout_minutes: Annotated[
        float | None, typer.Option("--timeout-minutes", help="No success that long after the first progress.")
    ] = None,
    notify_timeout_minutes: Annotated[
        float | None,
        typer.Option(
            "--notify-timeout-minutes",
            help="No progress that long after the notice (default 1440; 0: never).",
        ),
    ] = None,
    download_protocol: Annotated[
        str, typer.Option("--download-protocol", help="https, or mqtt for devices with no HTTP stack.")
    ] = "https",
    retries: Annotated[
        int, typer.Option("--retries", help="Re-notify a failed task up to this many times.")
    ] = 0,
    retry_interval: Annotated[float, typer.Option("--retry-interval-minutes")] = 0.0,
    phases: Annotated[str | None, typer.Option("--phases", help="Percentages, e.g. 10,30,60.")] = None,
    success_threshold: Annotated[
        float | None, typer.Option("--success-threshold", help="% to start next")
    ] = None,
    error_count: Annotated[
        int | None, typer.Option("--error-threshold-count", help="Pause at this many")
    ] = None,
    error_percent: Annotated[float | None, typer.Option("--error-threshold-percent")] = None,
    confirm: Annotated[bool, typer.Option("--confirm", help="Tasks wait for confirmation.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Cancel devices' tasks in other jobs.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Run unverified firmware.")] = False,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="key=value for the notice's extData.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show whom the job would notify, and start nothing.")
    ] = False,
    seed: Annotated[
        str | None, typer.Option("--seed", help="A dry run's seed: start exactly the devices it showed.")
    ] = None,
    admin_url: AdminUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Start an upgrade job (every option of POST /api/v1/jobs); with --dry-run, show what it would start."""
    body: dict[str, Any] = {"firmware_id": firmware, "type": job_type, "download_protocol": download_protocol}
    listed = list(device or [])
    if devices_file is not None:
        listed += _read_device_list(devices_file)
    optional = {
        "devices": listed or None,
        "src_versions": src_version or None,
        "gray_percent": gray,
        "schedule_at": schedule_at,
        "end_at": end_at,
        "rate_per_minute": rate,
        "timeout_minutes": timeout_minutes,
        "notify_timeout_minutes": notify_timeout_minutes,
        "retry_count": retries or None,
        "retry_interval_minutes": retry_interval or None,
        "need_confirm": confirm or None,
        "overwrite": overwrite or None,
        "force": force or None,
        "seed": seed,
        "group": group,
    }
    body |= {k: v for k, v in optional.items() if v is not None}
    if phases:
        try:
            rollout: dict[str, Any] = {"phases": [float(p) for p in phases.split(",")]}
        except ValueError:
            fail("--phases takes percentages separated by commas, e.g. 10,30,60")
        for key, value in (
            ("success_threshold", success_threshold),
            ("error_threshold_count", error_count),
            ("error_threshold_percent", error_percent),
        ):
            if value is not None:
                rollout[key] = value
        body["rollout"] = rollout
    if tag:
        pairs = [t.partition("=") for t in tag]
        if any(not sep or not k for k, sep, _ in pairs):
            fail("--tag takes key=value")
        body["tags"] = {k: v for k, _, v in pairs}
    if dry_run:
        preview = Api(ctx, admin_url, token).call("POST", "/jobs/preview", json=body)
        show_json(preview) if as_json else _show_preview(preview)
        return
    job = Api(ctx, admin_url, token).call("POST", "/jobs", json=body)
    show_json(job) if as_json else console.print(_job_line(job), highlight=False)


def _show_preview(preview: dict[str, Any]) -> None:
    fw = preview["firmware"]
    whom = (
        f"every device of product {fw['product_key']}"
        if preview["whole_product"]
        else f"the devices of product {fw['product_key']} in group {preview['group']}"
        if preview.get("group")
        else "the devices listed"
    )
    console.print(
        f"Would notify {preview['tasks']} device(s) of {preview['devices']} matched ({whom}) with "
        f"{fw['module']} {fw['version']} (firmware {fw['id']}); nothing was started.",
        highlight=False,
    )
    if len(preview["phases"]) > 1:
        console.print("Phases: " + ", ".join(str(n) for n in preview["phases"]), highlight=False)
    for reason, count in preview["skipped_reasons"].items():
        console.print(f"Skipped: {count} ({reason})", highlight=False)
    table = Table("Device", "State", "Phase", "Note", title=f"Sample ({len(preview['sample'])})")
    for t in preview["sample"]:
        table.add_row(t["device"], t["state"], str(t["phase"]), t["desc"] or "")
    console.print(table)
    console.print(
        f"To start exactly these: the same command without --dry-run, with --seed {preview['seed']}"
    )


def _read_device_list(path: Path) -> list[str]:
    devices = []
    for raw in path.read_text(encoding="utf-8-sig").splitlines():
        line = raw.strip()
        if not line or line.lower().startswith("product_key"):
            continue
        pk, sep, dn = line.partition("," if "," in line else "/")
        devices.append(f"{pk.strip()}/{dn.split(',')[0].strip()}" if sep else line)
    return devices


def _job_action(
    ctx: typer.Context, action: str, job_id: int, admin_url: str | None, token: str | None, **kwargs: Any
) -> None:
    job = Api(ctx, admin_url, token).call("POST", f"/jobs/{job_id}/{action}", **kwargs)
    console.print(_job_line(job), highlight=False)


@job_app.command("pause")
def job_pause(ctx: typer.Context, job_id: int, admin_url: AdminUrl = None, token: Token = None) -> None:
    """Stop sending new notices (devices already upgrading carry on)."""
    _job_action(ctx, "pause", job_id, admin_url, token)


@job_app.command("resume")
def job_resume(ctx: typer.Context, job_id: int, admin_url: AdminUrl = None, token: Token = None) -> None:
    """Resume a paused job (failures so far no longer count toward its error threshold)."""
    _job_action(ctx, "resume", job_id, admin_url, token)


@job_app.command("confirm")
def job_confirm(
    ctx: typer.Context,
    job_id: int,
    device: Annotated[list[str] | None, typer.Option("--device", help="pk/dn; repeat. Default: all.")] = None,
    admin_url: AdminUrl = None,
    token: Token = None,
) -> None:
    """Confirm tasks waiting in `confirm`."""
    _job_action(ctx, "confirm", job_id, admin_url, token, json={"devices": device} if device else {})


@job_app.command("rerun")
def job_rerun(ctx: typer.Context, job_id: int, admin_url: AdminUrl = None, token: Token = None) -> None:
    """Queue the job's failed and timed-out tasks again."""
    _job_action(ctx, "rerun", job_id, admin_url, token)


@job_app.command("history")
def job_history(
    ctx: typer.Context, job_id: int, device: str, admin_url: AdminUrl = None, token: Token = None
) -> None:
    """Every state change and progress report of one device's task."""
    ref = _parse_device(device)
    found = Api(ctx, admin_url, token).call(
        "GET", f"/jobs/{job_id}/tasks/{ref.product_key}/{ref.device_name}/history"
    )
    table = Table("at", "state", "progress", "desc")
    for h in found["history"]:
        table.add_row(h["at"], h["state"], f"{h['progress']}%", h["desc"])
    console.print(table)


@job_app.command("report")
def job_report(ctx: typer.Context, job_id: int, admin_url: AdminUrl = None, token: Token = None) -> None:
    """The job's tasks as CSV on stdout."""
    api = Api(ctx, admin_url, token)
    try:
        with httpx.Client(**api._client_args) as client:
            response = client.get(f"/jobs/{job_id}/report.csv")
    except httpx.TransportError as e:
        fail(f"cannot reach the management API at {api.url} ({e})")
    if response.status_code >= 400:
        fail(f"{response.status_code} {response.text[:200]}")
    sys.stdout.write(response.text)


@job_app.command("list")
def job_list(
    ctx: typer.Context, admin_url: AdminUrl = None, token: Token = None, as_json: AsJson = False
) -> None:
    """List jobs, newest first."""
    jobs = Api(ctx, admin_url, token).every("/jobs")
    if as_json:
        show_json(jobs)
        return
    for job in jobs:
        console.print(_job_line(job), highlight=False)


@job_app.command("show")
def job_show(
    ctx: typer.Context,
    job_id: int,
    follow: Annotated[bool, typer.Option("--follow", help="Draw live progress until the job ends.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --follow.")] = 1.0,
    admin_url: AdminUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """Show a job's state and counts; with --follow, live progress bars per device."""
    api = Api(ctx, admin_url, token)
    job = api.call("GET", f"/jobs/{job_id}")
    if not follow:
        show_json(job) if as_json else console.print(_job_line(job), highlight=False)
        return
    with Live(
        _follow_view(job, api.call("GET", f"/jobs/{job_id}/tasks")), console=console, auto_refresh=False
    ) as live:
        while job["state"] in ("scheduled", "running", "paused"):
            time.sleep(interval)
            job = api.call("GET", f"/jobs/{job_id}")
            live.update(_follow_view(job, api.call("GET", f"/jobs/{job_id}/tasks")), refresh=True)


def _follow_view(job: dict[str, Any], tasks: list[dict[str, Any]]) -> Group:
    """The job's line, then per device a row of fixed columns (its name, its bar, its percent, its state), so
    a bar is never squeezed away, and under it the reason or last report, wrapped to the terminal's width,
    never cut."""
    shown = [t for t in tasks if t["state"] != "skipped"]
    name_width = min(max((len(t["device"]) for t in shown), default=8), 28)
    parts: list[Any] = [_job_line(job)]
    for t in shown:
        row = Table.grid(padding=(0, 1))
        row.add_column(no_wrap=True, width=name_width, overflow="ellipsis")
        row.add_column(no_wrap=True, width=BAR_WIDTH)
        row.add_column(no_wrap=True, justify="right", width=4)
        row.add_column(no_wrap=True)
        bar = ProgressBar(total=100, completed=t["progress"], width=BAR_WIDTH)
        if t["state"] in ("failed", "timed_out"):
            bar.complete_style = bar.finished_style = "red"
        row.add_row(t["device"], bar, f"{t['progress']}%", t["state"])
        parts.append(row)
        if t["desc"]:
            parts.append(Padding(Text(t["desc"], overflow="fold"), (0, 0, 0, 2)))
    return Group(*parts)


BAR_WIDTH = 20


@job_app.command("tasks")
def job_tasks(
    ctx: typer.Context, job_id: int, admin_url: AdminUrl = None, token: Token = None, as_json: AsJson = False
) -> None:
    """List a job's tasks."""
    tasks = Api(ctx, admin_url, token).every(f"/jobs/{job_id}/tasks")
    show_json(tasks) if as_json else _task_table(tasks)


@job_app.command("cancel")
def job_cancel(
    ctx: typer.Context,
    job_id: int,
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help="Only tasks in this state (queued, notified, ...); repeat."),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="Only this device's task (pk/dn).")] = None,
    admin_url: AdminUrl = None,
    token: Token = None,
) -> None:
    """Cancel a job's unfinished tasks (all, those in some states, or one device's)."""
    if device:
        ref = _parse_device(device)
        task = Api(ctx, admin_url, token).call(
            "POST", f"/jobs/{job_id}/tasks/{ref.product_key}/{ref.device_name}/cancel"
        )
        console.print(f"{task['device']}: {task['state']}", highlight=False)
        return
    _job_action(ctx, "cancel", job_id, admin_url, token, json={"states": state} if state else {})


# ------------------------------------------------------------------------------------------- accounts

account_app = typer.Typer(help="Operator accounts, their roles and API tokens (admin).", no_args_is_help=True)
Password = Annotated[
    bool,
    typer.Option("--password", help="Ask for a password (the console's sign-in), at least 10 characters."),
]


def _ask_password() -> str:
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@account_app.command("add")
def account_add(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Option("--role", help="viewer, operator or admin.")] = "viewer",
    password: Password = False,
    admin_url: AdminUrl = None,
    token: Token = None,
) -> None:
    """Add an account: a viewer reads; an operator also runs firmware and jobs; an admin does everything."""
    body = {"name": name, "role": role} | ({"password": _ask_password()} if password else {})
    made = Api(ctx, admin_url, token).call("POST", "/accounts", json=body)
    console.print(f"account {made['name']} ({made['role']}) added", highlight=False)


@account_app.command("list")
def account_list(
    ctx: typer.Context, admin_url: AdminUrl = None, token: Token = None, as_json: AsJson = False
) -> None:
    """List the accounts."""
    accounts = Api(ctx, admin_url, token).every("/accounts", {})
    if as_json:
        show_json(accounts)
        return
    table = Table("account", "role", "password", "disabled", "created")
    for a in accounts:
        table.add_row(
            a["name"],
            a["role"],
            "yes" if a["has_password"] else "no",
            "yes" if a["disabled"] else "",
            a["created_at"],
        )
    console.print(table)


@account_app.command("set")
def account_set(
    ctx: typer.Context,
    name: str,
    role: Annotated[str | None, typer.Option("--role", help="viewer, operator or admin.")] = None,
    password: Password = False,
    disabled: Annotated[bool | None, typer.Option("--disable/--enable", show_default=False)] = None,
    admin_url: AdminUrl = None,
    token: Token = None,
) -> None:
    """Change an account's role, password, or whether it is disabled (a disabled account's tokens stop)."""
    body: dict[str, Any] = {}
    if role is not None:
        body["role"] = role
    if password:
        body["password"] = _ask_password()
    if disabled is not None:
        body["disabled"] = disabled
    if not body:
        fail("nothing to change: give --role, --password, --disable or --enable")
    made = Api(ctx, admin_url, token).call("PATCH", f"/accounts/{quote(name, safe='')}", json=body)
    console.print(
        f"account {made['name']}: {made['role']}{', disabled' if made['disabled'] else ''}", highlight=False
    )


@account_app.command("delete")
def account_delete(ctx: typer.Context, name: str, admin_url: AdminUrl = None, token: Token = None) -> None:
    """Delete an account and its tokens."""
    Api(ctx, admin_url, token).call("DELETE", f"/accounts/{quote(name, safe='')}")
    console.print(f"account {name} deleted", highlight=False)


@account_app.command("token")
def account_token(
    ctx: typer.Context,
    name: str,
    label: Annotated[str, typer.Option("--label", help="What the token is for.")] = "",
    admin_url: AdminUrl = None,
    token: Token = None,
) -> None:
    """Issue an API token for an account; it is printed this once (the broker keeps only its sha256)."""
    made = Api(ctx, admin_url, token).call(
        "POST", f"/accounts/{quote(name, safe='')}/tokens", json={"label": label}
    )
    console.print(f"token {made['id']} of {name}: {made['token']}", highlight=False, soft_wrap=True)


@account_app.command("revoke")
def account_revoke(
    ctx: typer.Context, name: str, token_id: int, admin_url: AdminUrl = None, token: Token = None
) -> None:
    """Revoke one of an account's tokens: it stops working at once."""
    Api(ctx, admin_url, token).call("DELETE", f"/accounts/{quote(name, safe='')}/tokens/{token_id}")
    console.print(f"token {token_id} of {name} revoked", highlight=False)


@account_app.command("audit")
def account_audit(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", help="The newest this many.")] = 50,
    admin_url: AdminUrl = None,
    token: Token = None,
    as_json: AsJson = False,
) -> None:
    """The audit log: every change made through the API (and every one refused), newest first."""
    entries = Api(ctx, admin_url, token).call("GET", "/audit", params={"limit": str(limit)})
    if as_json:
        show_json(entries)
        return
    table = Table("when", "who", "role", "what", "on", "status", "from")
    for e in entries:
        table.add_row(e["at"], e["actor"], e["role"], e["action"], e["target"], str(e["status"]), e["remote"])
    console.print(table)

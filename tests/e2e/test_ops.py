"""Operations: Prometheus metrics on the admin listener, logs (text and JSON lines, every device line
naming `pk/dn`), `ota-broker check-config` and `ota-broker health`.

Brokers run in this process on 127.0.0.1 port 0, or as a `python -m broker run` process started and
stopped here by its PID; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from broker import app as broker_app
from broker import logs
from broker.cli import cli
from broker.config_check import MASK
from firmware_store.tls import ensure_tls
from plugins.ota.settings import OtaConfig, resolve
from tests.e2e.processes import Launched, json_message
from tests.support import TOKEN, Device, Env, Tls, broker_config, eventually

FIRMWARE = bytes(range(256)) * 1200
REPO = Path(__file__).resolve().parents[2]
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$0123456789abcdef0123456789abcdef0123456789a"

# --------------------------------------------------------------------------------------------- metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(env: Env, token: str | None = TOKEN, expect: int = 200) -> Samples:
    host, port = env.running.admin_address
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with env.http.get(f"http://{host}:{port}/metrics", headers=headers) as r:
        text = await r.text()
        assert r.status == expect, f"{r.status}: {text}"
        if expect != 200:
            return {}
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{key} not among {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


async def seed_flow(env: Env, d: Device) -> int:
    """Inform 1.0.0, upload, job, notice, HTTPS download, progress, inform 2.0.0: the job's id."""
    await d.inform("1.0.0")
    await eventually(lambda: env.find("/devices/pk/dev1"), what="pk/dev1 to be recorded")
    fw = await env.upload(FIRMWARE, version="2.0.0")
    job = await env.job(fw["id"], ["pk/dev1"])
    [notice] = await d.notices()
    status, _, body = await env.download(notice["data"]["url"])
    assert status == 200 and body == FIRMWARE
    await d.progress("50", "downloading")
    await env.task_state(job["id"], "pk/dev1", "in_progress")
    await d.inform("2.0.0")
    await env.task_state(job["id"], "pk/dev1", "succeeded")
    return int(job["id"])


async def test_metrics_count_the_seed_flow(env: Env, tmp_path: Path) -> None:
    """/metrics (admin or metrics token): devices, messages by kind, notices, tasks, downloads, rejects, db time."""
    await scrape(env, token=None, expect=401)
    await scrape(env, token="nope", expect=401)
    metrics_token = (tmp_path / "data" / "metrics.token").read_text().strip()
    assert metrics_token and metrics_token != TOKEN
    host, port = env.running.admin_address
    async with env.http.get(
        f"http://{host}:{port}/api/v1/devices", headers={"Authorization": f"Bearer {metrics_token}"}
    ) as r:
        assert r.status == 401, "the metrics token opens /metrics only"

    d = await env.device("pk", "dev1").connect()
    await d.publish("/ota/device/inform/pk/dev1", b"{not json")
    await d.publish("/some/app/topic", b"hello")
    await seed_flow(env, d)

    samples = await scrape(env, token=metrics_token)
    assert {k for k in await scrape(env) if k[0].startswith("ota_")} == {
        k for k in samples if k[0].startswith("ota_")
    }, "the admin token reads the same metrics"
    assert value(samples, "ota_devices_connected") == 1
    assert value(samples, "ota_mqtt_clients_connected") == 1
    assert value(samples, "ota_mqtt_messages_received_total", kind="inform") == 3
    assert value(samples, "ota_mqtt_messages_received_total", kind="progress") == 1
    assert value(samples, "ota_mqtt_messages_received_total", kind="firmware_get") == 0
    assert value(samples, "ota_mqtt_messages_received_total", kind="other") == 1
    assert value(samples, "ota_mqtt_messages_sent_total", kind="upgrade") == 1
    assert value(samples, "ota_notices_sent_total", delivery="push") == 1
    assert value(samples, "ota_notices_sent_total", delivery="pull") == 0
    assert value(samples, "ota_rejected_inputs_total", reason="bad_inform") == 1
    assert value(samples, "ota_tasks", state="succeeded") == 1
    assert sum(v for (name, _), v in samples.items() if name == "ota_tasks") == 1
    assert value(samples, "ota_download_bytes_total") == len(FIRMWARE)
    assert value(samples, "ota_downloads_active") == 0
    assert value(samples, "ota_downloads_total", outcome="ok") == 1
    assert value(samples, "ota_db_query_seconds_count", op="read") > 0
    assert value(samples, "ota_db_query_seconds_count", op="write") > 0
    assert value(samples, "process_resident_memory_bytes") > 0
    delivered = getattr(env.running.broker, "delivered_count", None)
    has_deliveries = any(name == "ota_mqtt_broker_deliveries_total" for name, _ in samples)
    assert has_deliveries == isinstance(delivered, int)

    status, _, _ = await env.download(f"{env.running.plugin.public_url}/firmware/1?s=x&e=1&t=y")
    assert status == 403
    samples = await scrape(env)
    assert value(samples, "ota_downloads_total", outcome="refused") == 1

    d.disconnect()

    async def offline() -> bool:
        return value(await scrape(env), "ota_devices_connected") == 0

    await eventually(offline, what="the device to count as disconnected")


async def test_two_brokers_in_one_process_keep_their_own_metrics(env: Env, tmp_path: Path, tls: Tls) -> None:
    """Each broker has its own registry: a second broker in the process starts, and counts only its own."""
    other = await broker_app.start(broker_config(tmp_path / "other", tls))
    try:
        d = await env.device("pk", "dev1").connect()
        await d.inform("1.0.0")
        await eventually(lambda: env.find("/devices/pk/dev1"), what="pk/dev1 to be recorded")
        host, port = other.admin_address
        async with env.http.get(
            f"http://{host}:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            other_text = await r.text()
        assert 'ota_mqtt_messages_received_total{kind="inform"} 0.0' in other_text
        assert value(await scrape(env), "ota_mqtt_messages_received_total", kind="inform") == 1
    finally:
        await other.stop()


# ------------------------------------------------------------------------------------------------ logs


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """`logs.setup` writing JSON lines to a buffer; the root logger restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    logs.setup("info", logs.LogFormat.JSON, stream)
    yield stream
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def test_json_lines_carry_ts_level_logger_message_and_device(log_stream: io.StringIO) -> None:
    """One JSON object per line: ts, level, logger, message; device when given; a traceback as exc."""
    log = logging.getLogger("ota.test")
    log.info("pk/dev1 informed default version %s", "1.0.0", extra={"device": "pk/dev1"})
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("failed with\nnewlines")
    first, second = (json.loads(line) for line in log_stream.getvalue().splitlines())
    assert set(first) == {"ts", "level", "logger", "message", "device"}
    assert first["ts"].endswith("Z") and first["ts"][:2] == "20"
    assert (first["level"], first["logger"], first["device"]) == ("info", "ota.test", "pk/dev1")
    assert first["message"] == "pk/dev1 informed default version 1.0.0"
    assert second["level"] == "error" and "device" not in second
    assert second["message"] == "failed with\nnewlines"
    assert "ValueError: boom" in second["exc"]


async def test_every_log_line_about_a_device_names_it(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Seed flow, a rejected message, a refused download and a disable: device lines say pk/dn and carry it."""
    caplog.set_level(logging.INFO)
    d = await env.device("pk", "dev1").connect()
    await d.publish("/ota/device/progress/pk/dev1", b"[]")
    await seed_flow(env, d)
    job = await env.job((await env.upload(FIRMWARE, version="3.0.0"))["id"], ["pk/dev1"])
    [_, notice] = await d.notices(2)
    await env.api("POST", f"/jobs/{job['id']}/cancel", expect=200)
    status, _, _ = await env.download(notice["data"]["url"])
    assert status == 403
    await env.api("PATCH", "/devices/pk/dev1", expect=200, json={"enabled": False})

    about = [r for r in caplog.records if r.name.startswith("ota.") and "pk/dev1" in r.getMessage()]
    kinds = " | ".join(r.getMessage() for r in about)
    for needle in ("informed", "rejected from", "in_progress", "succeeded", "download refused", "disabled"):
        assert needle in kinds, f"no log line with {needle!r} among: {kinds}"
    for record in about:
        assert getattr(record, "device", None) == "pk/dev1", f"no device field: {record.getMessage()}"
    for record in caplog.records:
        if hasattr(record, "device"):
            assert record.device in record.getMessage(), record.getMessage()


async def test_refused_logins_and_topics_name_the_device(
    tmp_path: Path, tls: Tls, caplog: pytest.LogCaptureFixture
) -> None:
    """device-secret mode: a refused CONNECT claiming to be pk/ghost names it in the text and the device field."""
    from tests.e2e.test_security import Peer

    caplog.set_level(logging.INFO, logger="ota.auth")
    running = await broker_app.start(broker_config(tmp_path / "data", tls, auth_mode="device-secret"))
    ghost = Peer(
        running.mqtt_address[1], "pk", "ghost", "g|securemode=3,signmethod=hmacsha256|", "ghost&pk", "00"
    )
    try:
        assert await ghost.attempt() == 5
    finally:
        ghost.disconnect()
        await running.stop()
    [line] = [r for r in caplog.records if r.getMessage().startswith("refused CONNECT")]
    assert "device pk/ghost" in line.getMessage() and getattr(line, "device", None) == "pk/ghost"


async def test_run_logs_json_lines(tmp_path: Path) -> None:
    """`run --log-format json`: every line one JSON object; the device's lines carry `device`; SIGTERM exits 0."""
    broker = Launched(
        [sys.executable, "-m", "broker", "run", "--log-format", "json"],
        tmp_path,
        tmp_path / "data",
        {"OTA_AUTH_MODE": "open"},
    )
    try:
        await asyncio.to_thread(broker.start, json_message)
        d = Device(broker.ports["mqtt"], "pk", "dev1", username="dev1&pk")
        await d.connect()
        try:
            await d.inform("1.0.0")
            await eventually(
                lambda: any("informed" in json_message(line) for line in broker.lines), what="the inform line"
            )
        finally:
            d.disconnect()
        assert await asyncio.to_thread(broker.stop, signal.SIGTERM) == 0, broker.log
    finally:
        broker.close()
    docs = [json.loads(line) for line in broker.lines]  # every line parses
    assert all({"ts", "level", "logger", "message"} <= set(doc) for doc in docs), docs
    [informed] = [doc for doc in docs if "informed" in doc["message"]]
    assert informed["device"] == "pk/dev1" and informed["logger"] == "ota.service", informed
    assert docs[-1]["message"] == "stopped"


# -------------------------------------------------------------------------------------- check-config


def check_config(tmp_path: Path, text: str | None, **env: str) -> Any:
    args = ["check-config"]
    if text is not None:
        (tmp_path / "config.yaml").write_text(text)
        args += ["-c", str(tmp_path / "config.yaml")]
    clean = {k: None for k in ("OTA_DATA_DIR", "OTA_AUTH_MODE", "OTA_MQTT_BIND", "OTA_PUBLIC_URL")}
    return CliRunner().invoke(cli, args, env={**clean, **env})


def config_text(**ota: Any) -> str:
    doc = {
        "listeners": {"default": {"type": "tcp", "bind": "0.0.0.0:1883"}},
        "plugins": {
            "plugins.device_auth.plugin.DeviceAuthPlugin": {
                "accounts": {"dash": {"password_hash": HASH, "subscribe": ["/ota/#"]}}
            },
            "plugins.ota.plugin.OtaPlugin": ota,
        },
    }
    return yaml.safe_dump(doc)


def test_check_config_prints_effective_settings_masked_and_touches_nothing(tmp_path: Path) -> None:
    """Overrides applied, public URL resolved, token and password hashes masked; no data dir, TLS or token made."""
    data = tmp_path / "data"
    result = check_config(
        tmp_path,
        config_text(admin_token="s3cret-admin-token", public_url="https://gw.example:8443"),
        OTA_DATA_DIR=str(data),
        OTA_AUTH_MODE="open",
        OTA_MQTT_BIND="127.0.0.1:1999",
        OTA_ATTACH_URL="mqtt://svc:url-pw@broker.example:1883",
        OTA_ATTACH_PASSWORD="s3cret-attach-pw",
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "s3cret-admin-token" not in out and HASH not in out
    assert "s3cret-attach-pw" not in out and "url-pw" not in out
    assert (
        "# environment overrides: OTA_ATTACH_PASSWORD, OTA_ATTACH_URL, OTA_AUTH_MODE, OTA_DATA_DIR, OTA_MQTT_BIND"
        in out
    )
    doc = yaml.safe_load(out)
    ota = doc["plugins"]["plugins.ota.plugin.OtaPlugin"]
    assert (ota["data_dir"], ota["auth_mode"], ota["admin_token"]) == (str(data), "open", MASK)
    assert ota["public_url"] == "https://gw.example:8443"
    assert ota["link_ttl_hours"] == 24  # defaults filled in
    assert (ota["attach_url"], ota["attach_password"]) == (f"mqtt://{MASK}@broker.example:1883", MASK)
    accounts = doc["plugins"]["plugins.device_auth.plugin.DeviceAuthPlugin"]["accounts"]
    assert accounts["dash"]["password_hash"] == MASK
    assert doc["listeners"]["default"]["bind"] == "127.0.0.1:1999"
    generated = ensure_tls(tmp_path / "elsewhere" / "tls", None)
    tls = doc["listeners"]["tls"]
    assert Path(tls["certfile"]) == data / "tls" / generated.cert.name
    assert Path(tls["keyfile"]) == data / "tls" / generated.key.name
    assert not data.exists(), "check-config must not create the data directory or TLS material"


def test_check_config_built_in_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without -c and without ./config.yaml: the built-in defaults, valid, nothing created in ./data."""
    monkeypatch.chdir(tmp_path)
    result = check_config(tmp_path, None)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# configuration: built-in defaults: valid\n")
    assert "# environment overrides: none" in result.stdout
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (config_text(auth_mode="maybe"), "plugins.plugins.ota.plugin.OtaPlugin.auth_mode"),
        (config_text(colour="blue"), "plugins.plugins.ota.plugin.OtaPlugin.colour"),
        (config_text(tls_cert="/nonexistent/c.pem", tls_key="/nonexistent/k.pem"), "OtaPlugin.tls_cert"),
        (config_text().replace("0.0.0.0:1883", "nowhere"), "listeners.default.bind"),
        ("listeners: [", "not valid YAML"),
    ],
)
def test_check_config_names_the_key_and_exits_2(tmp_path: Path, text: str, key: str) -> None:
    """An invalid configuration: exit status 2 and a message naming the key path."""
    result = check_config(tmp_path, text)
    assert result.exit_code == 2, result.output
    assert "configuration error:" in result.stderr and key in result.stderr, result.stderr
    assert result.stdout == ""


# -------------------------------------------------------------------------------------------- health


async def test_health_exits_0_when_the_api_answers_else_1(env: Env) -> None:
    """`ota-broker health` is 0 against a running broker's admin listener, 1 when nothing listens."""
    host, port = env.running.admin_address
    ok = await asyncio.to_thread(CliRunner().invoke, cli, ["health", "--admin-url", f"http://{host}:{port}"])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("ok: ")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    down = await asyncio.to_thread(
        CliRunner().invoke, cli, ["health", "--admin-url", f"http://127.0.0.1:{free}", "--timeout", "1"]
    )
    assert down.exit_code == 1, down.output
    assert "unhealthy" in down.stderr


@pytest.mark.parametrize(
    ("bind", "admin_tls", "url"),
    [
        (None, False, "http://127.0.0.1:8080"),
        ("0.0.0.0:8080", False, "http://127.0.0.1:8080"),
        ("127.0.0.1:9000", False, "http://127.0.0.1:9000"),
        ("[::]:9000", False, "http://[::1]:9000"),
        ("10.0.0.5:81", False, "http://10.0.0.5:81"),
        ("0.0.0.0:8443", True, "https://127.0.0.1:8443"),
    ],
)
def test_clients_find_the_admin_listener_from_its_bind(bind: str | None, admin_tls: bool, url: str) -> None:
    """The API's clients ask OTA_ADMIN_BIND's port, on loopback when it binds every address, over https
    when admin_tls is set."""
    env = {} if bind is None else {"OTA_ADMIN_BIND": bind}
    assert resolve(OtaConfig(admin_tls=admin_tls), env).local_admin_url == url


async def test_every_client_command_uses_the_settings_of_config_yaml(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no --admin-url nor --token, `device`, `firmware`, `job` and `health` find the API and its token
    in ./config.yaml as `run` would (admin_bind, admin_token); a broken config.yaml exits 2 naming the key."""
    host, port = env.running.admin_address
    for name in ("OTA_ADMIN_URL", "OTA_ADMIN_TOKEN", "OTA_ADMIN_BIND", "OTA_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    entry = config["plugins"]["plugins.ota.plugin.OtaPlugin"]
    entry |= {"admin_bind": f"{host}:{port}", "admin_token": TOKEN, "data_dir": str(tmp_path / "none")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    for args in (["device", "list", "--json"], ["firmware", "list", "--json"], ["job", "list", "--json"]):
        answer = await asyncio.to_thread(CliRunner().invoke, cli, args)
        assert answer.exit_code == 0, (args, answer.output)
        assert json.loads(answer.stdout) == []
    health = await asyncio.to_thread(CliRunner().invoke, cli, ["health"])
    assert health.exit_code == 0 and f":{port}/api/v1/health" in health.stdout, health.output
    entry["admin_bind"] = "nowhere"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    broken = await asyncio.to_thread(CliRunner().invoke, cli, ["device", "list"])
    assert broken.exit_code == 2 and "admin_bind" in broken.stderr, broken.output


@pytest.mark.parametrize(
    "args",
    [
        ["device", "show", "nodev"],
        ["device", "disable", "nodev"],
        ["device", "enable", "pk/"],
        ["device", "delete", "/dn"],
        ["device", "rotate-secret", "pk/dn/x"],
        ["job", "history", "1", "nodev"],
    ],
)
def test_every_command_naming_a_device_says_what_is_wrong_with_a_malformed_one(args: list[str]) -> None:
    """Before any call to the API (none listens here): the device's form, not the API's 404."""
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    result = CliRunner().invoke(cli, [*args, "--admin-url", f"http://127.0.0.1:{port}", "--token", "t"])
    assert result.exit_code == 1, result.output
    said = result.output
    assert said.startswith("error:") and (
        "not of the form product_key/device_name" in said or "must be" in said
    )

"""Property-based fuzzing through a real broker: whatever a device publishes on its own topics,
whatever is posted to the firmware upload form and whatever JSON reaches the API, the process keeps
serving, answers 2xx or a 4xx JSON error (never 5xx), writes no file outside its firmware store and
loses nothing recorded: another device's task in progress and its version stay exactly as they were.

The broker runs for the whole module in a background thread with its own event loop, so the
(synchronous) hypothesis tests drive it with paho-mqtt 1.x clients and httpx as outside clients would.
Everything talks to 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from broker import app as broker_app
from tests.support import TOKEN, Tls, broker_config

START_S = 20.0  # the broker thread must be serving within this
STOP_S = 15.0  # and must have stopped within this after being told to
WAIT_S = 10.0  # any other wait
FIRMWARE = b"\x7fELF fuzz victim firmware " + bytes(range(256)) * 2

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
    """Poll `check` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------- the broker thread


class BrokerThread:
    """`broker.app.start(config)` on its own event loop in a thread, until `stop()`."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.error: BaseException | None = None
        self.mqtt_address: tuple[str, int] = ("", 0)
        self.admin_address: tuple[str, int] = ("", 0)
        self.https_address: tuple[str, int] = ("", 0)
        self.thread = threading.Thread(target=self._run, name="fuzz-broker", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start() or stop(), not lost in the thread
            self.error = e
            self.ready.set()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        running = await broker_app.start(self.config)
        try:
            self.mqtt_address = running.mqtt_address
            self.admin_address = running.admin_address
            self.https_address = running.https_address
            self.ready.set()
            await self._stop.wait()
        finally:
            await running.stop()

    def start(self) -> BrokerThread:
        self.thread.start()
        assert self.ready.wait(START_S), f"the broker thread was not serving within {START_S}s"
        if self.error is not None:
            raise AssertionError(f"the broker did not start: {self.error!r}") from self.error
        return self

    def stop(self) -> None:
        if self.thread.is_alive() and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(STOP_S)
        assert not self.thread.is_alive(), f"the broker thread did not stop within {STOP_S}s"
        assert self.error is None, f"the broker thread failed: {self.error!r}"


# ------------------------------------------------------------------------------------------ clients


class SyncDevice:
    """A device on a real MQTT connection (paho-mqtt 1.x, its own network thread), used synchronously."""

    def __init__(self, port: int, pk: str, dn: str) -> None:
        self.pk, self.dn = pk, dn
        self.client = mqtt.Client(client_id=f"{pk}.{dn}.fuzz", clean_session=True, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(f"{dn}&{pk}", "x")
        self._lock = threading.Lock()
        self.received: list[tuple[str, bytes]] = []
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(WAIT_S):
            self.close()
            raise AssertionError(f"{pk}/{dn} did not connect within {WAIT_S}s")

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, rc: int) -> None:
        if rc == 0:
            self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((msg.topic, bytes(msg.payload)))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, topic: str, payload: bytes | str) -> None:
        """Publish at QoS 1 and wait (bounded) for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published(), f"{self.pk}/{self.dn}: no PUBACK for a publish on {topic}"

    def send(self, kind: str, params: dict[str, Any]) -> None:
        self.publish(topic_of(kind, self.pk, self.dn), json.dumps({"id": 1, "params": params}))

    def messages(self, topic: str) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p in self.received if t == topic]

    def topics(self) -> set[str]:
        with self._lock:
            return {t for t, _ in self.received}


def topic_of(kind: str, pk: str, dn: str) -> str:
    return {
        "inform": f"/ota/device/inform/{pk}/{dn}",
        "progress": f"/ota/device/progress/{pk}/{dn}",
        "get": f"/sys/{pk}/{dn}/thing/ota/firmware/get",
        "request": f"/ota/device/request/{pk}/{dn}",
    }[kind]


ATTACKER_TOPICS = [topic_of(kind, "pk", "attacker") for kind in ("inform", "progress", "get", "request")]


@dataclass
class World:
    """The module's broker, its data folder and the clients and records every test shares."""

    base: Path
    data_dir: Path
    tls: Tls
    broker: BrokerThread
    http: httpx.Client
    victim: SyncDevice
    attacker: SyncDevice
    firmware: dict[str, Any] = field(default_factory=dict)  # the victim's firmware
    job_id: int = 0  # the victim's job
    barriers: int = 0

    def api(self, method: str, path: str, expect: int | None = 200, **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        if expect is not None:
            assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json() if r.content else None

    def upload(self, data: bytes, product_key: str, version: str) -> Any:
        r = self.http.post(
            "/firmware",
            data={"product_key": product_key, "version": version},
            files={"file": ("fw.bin", data, "application/octet-stream")},
        )
        assert r.status_code == 201, r.text
        return r.json()

    def victim_task(self) -> dict[str, Any]:
        tasks = {t["device"]: t for t in self.api("GET", f"/jobs/{self.job_id}/tasks")}
        return tasks["pk/victim"]

    def assert_victim_unchanged(self) -> None:
        task = self.victim_task()
        assert (task["state"], task["progress"]) == ("in_progress", 30), task
        device = self.api("GET", "/devices/pk/victim")
        assert device["modules"] == {"default": "1.0.0"}, device
        blob = self.data_dir / "firmware" / self.firmware["sha256"][:2] / self.firmware["sha256"]
        assert blob.read_bytes() == FIRMWARE, "the victim's firmware file was changed or removed"

    def sync_attacker(self) -> None:
        """Wait until the broker has handled everything the attacker sent before: its inform of a fresh
        version published last (one device's messages are handled in order) is recorded."""
        self.barriers += 1
        version = f"barrier.{self.barriers}"
        self.attacker.send("inform", {"version": version})

        def recorded() -> bool:
            doc = self.api("GET", "/devices/pk/attacker", expect=None)
            return isinstance(doc, dict) and doc.get("modules", {}).get("default") == version

        wait_for(recorded, f"the attacker's inform of {version} to be recorded")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One broker for the module; pk/victim on 1.0.0 with its task of a static job in progress at 30%."""
    base = tmp_path_factory.mktemp("fuzz")
    data_dir = base / "nested" / "data"
    tls = Tls.make(tmp_path_factory.mktemp("fuzz-tls"))
    config = broker_config(data_dir, tls, auth_mode="open", progress_burst=100000, progress_per_second=100000)
    broker = BrokerThread(config).start()
    closers: list[Callable[[], None]] = [broker.stop]
    try:
        host, port = broker.admin_address
        http = httpx.Client(
            base_url=f"http://{host}:{port}/api/v1",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=WAIT_S,
        )
        closers.append(http.close)
        victim = SyncDevice(broker.mqtt_address[1], "pk", "victim")
        closers.append(victim.close)
        attacker = SyncDevice(broker.mqtt_address[1], "pk", "attacker")
        closers.append(attacker.close)

        w = World(base, data_dir, tls, broker, http, victim, attacker)
        victim.send("inform", {"version": "1.0.0"})
        attacker.send("inform", {"version": "1.0.0"})
        wait_for(
            lambda: (
                (w.api("GET", "/devices/pk/victim", expect=None) or {}).get("modules") == {"default": "1.0.0"}
            ),
            "pk/victim to be recorded on 1.0.0",
        )
        w.firmware = w.upload(FIRMWARE, "pk", "2.0.0")
        job = w.api(
            "POST",
            "/jobs",
            expect=201,
            json={"firmware_id": w.firmware["id"], "type": "static", "devices": ["pk/victim"]},
        )
        w.job_id = job["id"]
        wait_for(lambda: victim.messages("/ota/device/upgrade/pk/victim"), "the victim's notice")
        victim.send("progress", {"step": "30", "desc": "downloading"})
        wait_for(
            lambda: (t := w.victim_task())["state"] == "in_progress" and t["progress"] == 30,
            "the victim's task to be in progress at 30%",
        )
        w.assert_victim_unchanged()
        yield w
    finally:
        for close in reversed(closers):
            close()


# ---------------------------------------------------------------------------------------- strategies

NASTY = [
    "",
    ".",
    "..",
    "../../x",
    "../../../../../../tmp/ota-fuzz-escape",
    "/etc/passwd",
    "..\\..\\x",
    "firmware/../../x",
    "%2e%2e%2f%2e%2e%2fx",
    "a\x00b",
    "\x00",
    "\r\n",
    'quo"te',
    "x" * 5000,
    "ü" * 3000,
    "🔥" * 100,
    "版本",
    "\u202e\u0000\ufeff",
]
PLAUSIBLE = [
    "1.0.0",
    "2.0.0",
    "30",
    "100",
    "-1",
    "-2",
    "-3",
    "-4",
    "0",
    "101",
    "-5",
    "MCU",
    "default",
    "pk",
    "pk/victim",
    "pk/attacker",
    "Md5",
    "SHA256",
]

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)
texts = st.sampled_from(NASTY + PLAUSIBLE) | st.text(max_size=64)
names = st.from_regex(r"[A-Za-z0-9_.:@\-]{1,64}", fullmatch=True)
versions = st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){0,3}", fullmatch=True)
printable = st.text(st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=40)


def perturbed(
    valid: st.SearchStrategy[dict[str, Any]], keys: list[str], fuzz: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """A valid document with up to two of `keys` given a `fuzz` value, maybe one removed and maybe
    unknown keys added: most requests get past the first check and succeed or fail deeper."""

    def apply(parts: tuple[dict[str, Any], dict[str, Any], list[str], dict[str, Any]]) -> dict[str, Any]:
        doc, replaced, removed, extra = parts
        out = {**extra, **doc, **replaced}
        for key in removed:
            out.pop(key, None)
        return out

    return st.tuples(
        valid,
        st.lists(st.sampled_from(keys), max_size=2, unique=True).flatmap(
            lambda chosen: st.fixed_dictionaries(dict.fromkeys(chosen, fuzz))
        ),
        st.lists(st.sampled_from(keys), max_size=1),
        st.dictionaries(st.text(max_size=12), json_values, max_size=2),
    ).map(apply)


field_values = texts | json_values
steps = st.sampled_from(["1", "30", "42", "99", "100", "-1", "-2", "-3", "-4"])
device_docs = perturbed(
    st.fixed_dictionaries(
        {
            "id": st.integers(0, 2**53) | st.text(st.characters(categories=["N", "L"]), max_size=20),
            "params": perturbed(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "version": versions,
                        "step": steps,
                        "module": st.sampled_from(["default", "MCU"]),
                        "desc": st.text(max_size=200),
                    },
                ),
                ["version", "step", "module", "desc"],
                field_values,
            ),
        }
    ),
    ["id", "params"],
    field_values,
)


def some_of(options: dict[str, st.SearchStrategy[Any]], max_size: int) -> st.SearchStrategy[dict[str, Any]]:
    """A few of `options`' keys, each with a value from its strategy."""
    return st.lists(st.sampled_from(sorted(options)), max_size=max_size, unique=True).flatmap(
        lambda keys: st.fixed_dictionaries({k: options[k] for k in keys})
    )


def assert_api_answer(r: httpx.Response, what: str) -> None:
    """2xx with a JSON body, or a 4xx JSON error with `error` and `message`; never 5xx."""
    event(f"HTTP {r.status_code}")
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:500]}"
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, f"{what}: {r.status_code}"
    if r.status_code >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), (what, r.headers)
        body = r.json()
        assert isinstance(body, dict), (what, body)
        assert isinstance(body.get("error"), str) and body["error"], (what, body)
        assert isinstance(body.get("message"), str) and body["message"], (what, body)
    elif r.content:
        r.json()


# ------------------------------------------------------------------------------------- device topics


def test_arbitrary_bytes_on_own_topics_change_nothing_else(world: World) -> None:
    """Any bytes a device publishes on its own OTA topics are acked, the API answers, another device's task stays."""

    @FUZZ
    @given(topic=st.sampled_from(ATTACKER_TOPICS), payload=st.binary(max_size=4096))
    def run(topic: str, payload: bytes) -> None:
        world.attacker.publish(topic, payload)
        world.assert_victim_unchanged()

    run()
    world.sync_attacker()
    world.assert_victim_unchanged()
    assert_no_foreign_messages(world)


def test_json_shaped_documents_on_own_topics_change_nothing_else(world: World) -> None:
    """JSON of any shape a device publishes on its own OTA topics leaves another device's task and version as is."""

    @FUZZ
    @given(
        topic=st.sampled_from(ATTACKER_TOPICS),
        doc=device_docs | json_values,
        ascii_only=st.booleans(),
    )
    def run(topic: str, doc: Any, ascii_only: bool) -> None:
        world.attacker.publish(topic, json.dumps(doc, ensure_ascii=ascii_only).encode())
        world.assert_victim_unchanged()

    run()
    world.sync_attacker()
    world.assert_victim_unchanged()
    assert_no_foreign_messages(world)


def assert_no_foreign_messages(world: World) -> None:
    own = {
        "/ota/device/upgrade/pk/attacker",
        "/ota/device/request/pk/attacker",
        "/sys/pk/attacker/thing/ota/firmware/get_reply",
    }
    foreign = world.attacker.topics() - own
    assert not foreign, f"the attacker received messages on other devices' topics: {foreign}"


# ------------------------------------------------------------------------------------ firmware upload

ALLOWED_FILES = [
    re.compile(r"firmware/[0-9a-f]{2}/[0-9a-f]{64}"),
    re.compile(r"ota\.db.*"),
    re.compile(r"tls/.+"),
    re.compile(r"link\.key"),
    re.compile(r"admin\.token"),
    re.compile(r"metrics\.token"),
    re.compile(r"broker-auth\.token"),
    re.compile(r"\.lock"),  # what processes sharing the folder take turns on (its keys, its certificates)
]
ALLOWED_DIRS = [re.compile(r"firmware"), re.compile(r"firmware/tmp"), re.compile(r"firmware/[0-9a-f]{2}")]


def unexpected_paths(world: World) -> list[str]:
    """Everything under the module's folder that the broker may not have written."""
    found = []
    for path in world.base.rglob("*"):
        rel = path.relative_to(world.base).as_posix()
        if rel in ("nested", "nested/data"):
            continue
        if not rel.startswith("nested/data/"):
            found.append(rel)
            continue
        inner = rel.removeprefix("nested/data/")
        allowed = ALLOWED_DIRS if path.is_dir() else ALLOWED_FILES
        if not any(p.fullmatch(inner) for p in allowed):
            found.append(rel)
    return found


FORM_FIELDS = ["product_key", "version", "module", "sign_method", "src_version", "description"]
field_names = st.sampled_from([*FORM_FIELDS, "file"]) | st.sampled_from(NASTY) | st.text(max_size=24)
form_values = (
    st.sampled_from(NASTY + PLAUSIBLE)
    | st.text(max_size=64)
    | st.tuples(st.sampled_from(["x", "é", "../", "\x00"]), st.integers(4000, 4200)).map(
        lambda t: t[0] * t[1]
    )
)
form_fields = perturbed(
    st.fixed_dictionaries(
        {"product_key": st.sampled_from(["pk", "fz"]) | names, "version": versions},
        optional={
            "module": st.sampled_from(["default", "MCU"]),
            "sign_method": st.sampled_from(["Md5", "SHA256"]),
            "src_version": versions,
            "description": st.text(max_size=200),
        },
    ),
    FORM_FIELDS,
    form_values,
).map(lambda d: [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in d.items()])
file_parts = st.tuples(
    st.sampled_from([*NASTY, "fw.bin", "../../fw.bin", "/tmp/fw.bin"]) | st.text(max_size=40),
    st.binary(max_size=512) | st.just(FIRMWARE),
    st.sampled_from(["application/octet-stream", "text/plain", "", "../../x", "multipart/form-data"]),
)


def quote(text: str, raw: bool) -> bytes:
    """A Content-Disposition parameter: verbatim (raw), or escaped as browsers do (HTML5)."""
    if not raw:
        text = text.replace("\\", "\\\\").replace('"', "%22")
        text = "".join(f"%{ord(c):02X}" if ord(c) < 0x20 else c for c in text)
    return text.encode("utf-8")


def multipart(
    fields: list[tuple[str, str]],
    file: tuple[str, bytes, str] | None,
    file_at: int,
    raw: bool,
    boundary: str,
) -> bytes:
    parts = [
        b'Content-Disposition: form-data; name="' + quote(name, raw) + b'"\r\n\r\n' + value.encode()
        for name, value in fields
    ]
    if file is not None:
        filename, content, content_type = file
        head = b'Content-Disposition: form-data; name="file"; filename="' + quote(filename, raw) + b'"\r\n'
        if content_type:
            head += b"Content-Type: " + quote(content_type, raw) + b"\r\n"
        parts.insert(min(file_at, len(parts)), head + b"\r\n" + content)
    sep = f"--{boundary}\r\n".encode()
    return b"".join(sep + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()


def test_upload_form_answers_4xx_or_201_and_writes_only_the_store(world: World) -> None:
    """Any upload form answers 201 or a 4xx JSON error and writes no file outside firmware/<2 hex>/<64 hex>."""
    cwd_before = set(os.listdir())
    assert unexpected_paths(world) == []

    @FUZZ
    @given(
        known=form_fields,
        extra=st.lists(st.tuples(field_names, form_values), max_size=2),
        file=file_parts | st.none(),
        file_at=st.integers(0, 8),
        raw=st.booleans(),
        content_type=st.sampled_from(["form"] * 6 + ["no-boundary", "mixed", "text"]),
    )
    @example(  # a multipart Content-Type without its boundary parameter
        known=[("product_key", "fz"), ("version", "7.7.7")],
        extra=[],
        file=("fw.bin", b"firmware", "application/octet-stream"),
        file_at=0,
        raw=False,
        content_type="no-boundary",
    )
    def run(
        known: list[tuple[str, str]],
        extra: list[tuple[str, str]],
        file: tuple[str, bytes, str] | None,
        file_at: int,
        raw: bool,
        content_type: str,
    ) -> None:
        fields = known + extra
        boundary = f"fuzz{secrets.token_hex(12)}"
        body = multipart(fields, file, file_at, raw, boundary)
        header = {
            "form": f"multipart/form-data; boundary={boundary}",
            "no-boundary": "multipart/form-data",
            "mixed": f"multipart/mixed; boundary={boundary}",
            "text": "text/plain",
        }[content_type]
        r = world.http.post("/firmware", content=body, headers={"Content-Type": header})
        assert_api_answer(r, "POST /firmware")
        if r.status_code == 201:
            created = r.json()
            stored = (world.data_dir / "firmware" / created["sha256"][:2] / created["sha256"]).read_bytes()
            if raw:  # verbatim names may move part boundaries: the file is still a slice of what was sent
                assert stored in body, created
            else:
                assert stored in [value.encode() for _, value in fields] + ([file[1]] if file else []), (
                    created
                )
            assert created["sha256"] == hashlib.sha256(stored).hexdigest(), created
        assert unexpected_paths(world) == []

    run()
    assert set(os.listdir()) == cwd_before, "files appeared in the working directory"
    assert not Path("/tmp/ota-fuzz-escape").exists()
    world.assert_victim_unchanged()


# ------------------------------------------------------------------------------------------ JSON API


def json_body_bytes(body: Any) -> bytes:
    return json.dumps(body).encode()


def test_job_requests_answer_2xx_or_4xx(world: World) -> None:
    """Any JSON body posted to POST /api/v1/jobs answers 2xx or a 4xx JSON error, never 5xx."""
    other = world.upload(b"other product firmware", "fz", "9.0.0")
    world.api("POST", "/devices", expect=201, json={"product_key": "fz", "device_name": "d1"})
    refs = st.sampled_from(["pk/attacker", "pk/victim", "pk/nope", "fz/d1"])
    options = {
        "src_versions": st.lists(versions, max_size=3),
        "gray_percent": st.floats(0.01, 100),
        "overwrite": st.booleans(),
        "force": st.booleans(),
        "need_confirm": st.booleans(),
        "schedule_at": st.sampled_from(["2000-01-01T00:00:00Z", "2999-01-01T00:00:00+08:00"]),
        "end_at": st.sampled_from(["2998-01-01T00:00:00Z", "2999-12-31T23:59:59-23:59"]),
        "rate_per_minute": st.integers(1, 100_000),
        "timeout_minutes": st.floats(0.001, 1440 * 30),
        "retry_count": st.integers(0, 10),
        "retry_interval_minutes": st.floats(0, 1440),
        "rollout": st.fixed_dictionaries(
            {"phases": st.sampled_from([[100], [50, 50], [10, 20, 70], [0.5, 99.5]])},
            optional={
                "success_threshold": st.floats(0, 100),
                "error_threshold_count": st.integers(1, 10**9),
                "error_threshold_percent": st.floats(0.01, 100),
            },
        ),
        "tags": st.dictionaries(names, st.text(max_size=40), max_size=3),
    }
    valid_jobs = st.tuples(
        st.fixed_dictionaries(
            {"firmware_id": st.sampled_from([world.firmware["id"], other["id"]])},
            optional={
                "type": st.sampled_from(["static", "static", "dynamic", "verify"]),
                "devices": st.lists(refs, min_size=1, max_size=3),
            },
        ),
        some_of(options, 4),
    ).map(lambda t: {**t[0], **t[1]})
    nasty_values = (
        texts
        | json_values
        | st.sampled_from([0, -1, 2**63, 2**64, 10**30, -(2**63) - 1, 1e308, -1e308, 0.0001])
        | st.sampled_from(["2030-01-01T00:00:00", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+14:00"])
        | st.lists(refs | texts, max_size=3)
        | st.fixed_dictionaries({"phases": st.lists(st.integers(-5, 120) | st.floats(), max_size=22)})
    )
    job_docs = perturbed(valid_jobs, ["firmware_id", "type", "devices", *options], nasty_values)

    @FUZZ
    @given(body=job_docs | json_values)
    @example(body={"firmware_id": 2**63})  # one more than SQLite's largest integer
    def run(body: Any) -> None:
        if isinstance(body, dict) and body.get("overwrite") is True:
            # An operator may replace the victim's task on purpose: overwrite only on another product.
            body["firmware_id"] = other["id"]
        r = world.http.post(
            "/jobs", content=json_body_bytes(body), headers={"Content-Type": "application/json"}
        )
        assert_api_answer(r, f"POST /jobs {body!r:.300}")

    run()
    world.assert_victim_unchanged()


def test_device_registrations_answer_2xx_or_4xx(world: World) -> None:
    """Any JSON body posted to POST /api/v1/devices answers 2xx or a 4xx JSON error, never 5xx."""
    valid_devices = st.fixed_dictionaries(
        {
            "product_key": st.sampled_from(["pk", "fz"]) | names,
            "device_name": st.sampled_from(["victim", "attacker"]) | names,
        },
        optional={"device_secret": printable},
    )
    device_docs_api = perturbed(
        valid_devices,
        ["product_key", "device_name", "device_secret"],
        texts | json_values | st.sampled_from(["a" * 65, "s" * 129, "pk/x", "a b"]),
    )

    @FUZZ
    @given(body=device_docs_api | json_values)
    def run(body: Any) -> None:
        r = world.http.post(
            "/devices", content=json_body_bytes(body), headers={"Content-Type": "application/json"}
        )
        assert_api_answer(r, f"POST /devices {body!r:.300}")

    run()
    world.assert_victim_unchanged()


# ------------------------------------------------------------------------------------------- finally


def test_victim_still_completes_its_upgrade(world: World) -> None:
    """After all the fuzzing the victim downloads its firmware intact and its inform of 2.0.0 succeeds."""
    world.sync_attacker()
    world.assert_victim_unchanged()
    [notice] = world.victim.messages("/ota/device/upgrade/pk/victim")
    with httpx.Client(verify=world.tls.client_context(), timeout=WAIT_S) as https:
        r = https.get(notice["data"]["url"])
    assert r.status_code == 200, r.text[:200]
    assert r.content == FIRMWARE
    world.victim.send("inform", {"version": "2.0.0"})
    wait_for(lambda: world.victim_task()["state"] == "succeeded", "the victim's task to succeed")
    assert world.api("GET", "/devices/pk/victim")["modules"] == {"default": "2.0.0"}

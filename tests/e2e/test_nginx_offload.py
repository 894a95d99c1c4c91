"""Download offload end to end: a real Debian nginx (ngx_http_secure_link_module) runs the example
`deploy/nginx/ota-broker.conf` over the broker's `<data_dir>/firmware`, the broker runs with
`download_offload: nginx` and `public_url` pointing at nginx, and real MQTT devices get links nginx checks
by itself. nginx listens on a free 127.0.0.1 port with a trustme certificate; everything it writes (pid,
logs, temp files) stays in tmp_path, and only the nginx this test started is stopped.

Without nginx (or without its secure_link module) the tests are skipped, or fail when `CI` is set.
"""

from __future__ import annotations

import hashlib
import io
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from broker import app as broker_app
from firmware_store.links import MAX_URL_LEN, NGINX_MD5_FIELDS, LinkSigner, nginx_secure_link
from firmware_store.tls import write_private
from plugins.ota.settings import ConfigError, OtaConfig, resolve
from tests.support import Device, Env, Tls, broker_config, eventually, reporting

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "deploy" / "nginx" / "ota-broker.conf"
NGINX = "/usr/sbin/nginx"
FIRMWARE = os.urandom(300_000)
OTHER_FIRMWARE = os.urandom(200_000)
TTL_S = 24 * 3600
START_S = 10.0


def nginx_binary() -> str:
    """Debian's nginx with the secure_link module; skipped when absent (a failure under CI)."""
    binary = NGINX if os.access(NGINX, os.X_OK) else shutil.which("nginx")
    problem = None
    if binary is None:
        problem = "nginx is not installed (apt-get install -y nginx)"
    else:
        version = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10, check=False)
        if "--with-http_secure_link_module" not in version.stderr + version.stdout:
            problem = f"{binary} lacks ngx_http_secure_link_module"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    assert binary is not None
    return binary


def site_config(example: str, *, port: int, data_dir: Path, tls: Tls, link_conf: Path, log: Path) -> str:
    """The example config with this test's address, certificate, store, secret file and log."""
    replacements = {
        "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        "    listen [::]:443 ssl;\n": "",
        "/var/lib/ota-broker/tls/server.crt": str(tls.cert_file),
        "/var/lib/ota-broker/tls/server.key": str(tls.key_file),
        "/var/lib/ota-broker/firmware/": f"{data_dir}/firmware/",
        "/etc/nginx/ota-broker-link.conf": str(link_conf),
        "/var/log/nginx/ota-broker.access.log": str(log),
    }
    for old, new in replacements.items():
        assert old in example, f"{EXAMPLE.name} no longer contains {old!r}"
        example = example.replace(old, new)
    for line in example.splitlines():
        code = line.split("#", 1)[0]
        assert "/var/" not in code and "/etc/" not in code, f"an unreplaced path in {line!r}"
    return example


def main_config(directory: Path, site: Path) -> str:
    """A minimal nginx.conf that includes the site in http{}, as Debian's conf.d does."""
    user = f"user {pwd.getpwuid(0).pw_name};\n" if os.geteuid() == 0 else ""  # workers must read tmp_path
    temp = "".join(
        f"    {kind}_temp_path {directory / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"daemon off;\nmaster_process on;\nworker_processes 1;\n{user}"
        f"pid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'} info;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n    access_log {directory / 'default-access.log'};\n{temp}    include {site};\n}}\n"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    port: int
    directory: Path

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> str:
        return (self.directory / "access.log").read_text()

    @staticmethod
    def error_log_of(directory: Path) -> str:
        path = directory / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM to the master: it stops its worker and exits
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_nginx(binary: str, directory: Path, data_dir: Path, tls: Tls, link_conf: Path) -> Nginx:
    """Start nginx in the foreground on a free port; ready once it wrote its pid file (sockets bound)."""
    directory.mkdir()
    example = EXAMPLE.read_text()
    for _attempt in range(3):
        port = free_port()
        site = directory / "ota-broker.conf"
        site.write_text(
            site_config(
                example,
                port=port,
                data_dir=data_dir,
                tls=tls,
                link_conf=link_conf,
                log=directory / "access.log",
            )
        )
        conf = directory / "nginx.conf"
        conf.write_text(main_config(directory, site))
        pid_file = directory / "nginx.pid"
        pid_file.unlink(missing_ok=True)
        seen = len(Nginx.error_log_of(directory))
        with (directory / "stderr.log").open("ab") as stderr:
            process = subprocess.Popen(
                [binary, "-e", str(directory / "error.log"), "-p", str(directory), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        nginx = Nginx(process, port, directory)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline and process.poll() is None:
            if pid_file.exists() and pid_file.read_text().strip() == str(process.pid):
                return nginx
            time.sleep(0.02)
        nginx.stop()
        problem = Nginx.error_log_of(directory)[seen:]
        if "Address already in use" not in problem:
            raise AssertionError(f"nginx did not start:\n{problem}")
    raise AssertionError("nginx found no free port in 3 attempts")


@dataclass
class Offload:
    env: Env
    nginx: Nginx
    key: bytes  # the broker's link key (<data_dir>/link.key)

    @property
    def broker_base(self) -> str:
        host, port = self.env.running.https_address
        return f"https://{host}:{port}"

    def signer(self) -> LinkSigner:
        return LinkSigner(self.key, self.nginx.base, TTL_S, offload="nginx")


@pytest.fixture
async def offload(tmp_path: Path, tls: Tls) -> AsyncIterator[Offload]:
    """nginx on the example config, and the broker in `download_offload: nginx` mode behind it."""
    binary = nginx_binary()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # The broker keeps its link key in <data_dir>/link.key (made at first start when absent); it exists
    # before nginx starts here so that nginx's port is known when the broker starts with it as public_url.
    write_private(data_dir / "link.key", (secrets.token_bytes(32).hex() + "\n").encode())
    key = (data_dir / "link.key").read_text().strip().encode()
    link_conf = tmp_path / "ota-broker-link.conf"  # what an operator writes with the snippet function
    write_private(link_conf, nginx_secure_link(key).encode())
    nginx = start_nginx(binary, tmp_path / "nginx", data_dir, tls, link_conf)
    try:
        config = broker_config(data_dir, tls, download_offload="nginx", public_url=nginx.base)
        running = await broker_app.start(config)
        try:
            async with aiohttp.ClientSession() as http:
                env = Env(running, tls, http)
                try:
                    yield Offload(env, nginx, key)
                finally:
                    for d in env.devices:
                        d.disconnect()
        finally:
            await running.stop()
    finally:
        nginx.stop()


async def notified_url(env: Env, d: Device, firmware: bytes) -> tuple[Any, str]:
    """Upload `firmware`, start a job for `d`, and return the firmware record and the notice's URL."""
    fw = await env.upload(firmware)
    await env.job(fw["id"], [d.ref])
    [notice] = await d.notices()
    return fw, str(notice["data"]["url"])


def with_param(url: str, name: str, value: str) -> str:
    return re.sub(rf"([?&]{name}=)[^&]*", lambda m: m.group(1) + value, url)


def rebased(url: str, base: str) -> str:
    parts = urlsplit(url)
    return f"{base}{parts.path}?{parts.query}"


async def test_seed_flow_through_nginx(offload: Offload) -> None:
    """The notice's URL names nginx; nginx serves the exact bytes (200, HEAD, Range 206, 416) with
    Content-Length and the sha256 ETag; the task then succeeds as usual. The access log has no tag."""
    env = offload.env
    d = await reporting(env, "dev1")
    fw = await env.upload(FIRMWARE)
    job = await env.job(fw["id"], ["pk/dev1"])
    [notice] = await d.notices()
    url = notice["data"]["url"]
    assert url.startswith(f"{offload.nginx.base}/firmware/{fw['id']}?") and len(url) <= MAX_URL_LEN
    query = dict(parse_qsl(urlsplit(url).query))
    assert set(query) == {"b", "s", "e", "t"}
    assert query["b"] == fw["sha256"] and query["s"] == "pk/dev1"
    await env.task_state(job["id"], "pk/dev1", "notified")

    status, headers, body = await env.download(url)
    assert status == 200 and body == FIRMWARE
    assert headers["Content-Length"] == str(len(FIRMWARE)) and "Transfer-Encoding" not in headers
    assert headers["Server"] == "nginx" and headers["ETag"].strip('"') == fw["sha256"]
    assert headers["Content-Type"] == "application/octet-stream"

    status, headers, body = await env.download(url, {"Range": "bytes=1000-1999"})
    assert status == 206 and body == FIRMWARE[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(FIRMWARE)}"
    assert headers["Content-Length"] == "1000"
    status, _, body = await env.download(url, {"Range": f"bytes={len(FIRMWARE) - 10}-"})
    assert status == 206 and body == FIRMWARE[-10:]
    status, _, _ = await env.download(url, {"Range": f"bytes={len(FIRMWARE) + 5}-"})
    assert status == 416
    async with env.http.head(url, ssl=env.tls.client_context()) as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(len(FIRMWARE))

    await d.progress("50", "downloading")
    await d.inform("2.0.0")
    await env.task_state(job["id"], "pk/dev1", "succeeded")

    log = offload.nginx.access_log
    assert f"device=pk/dev1 blob={fw['sha256']} link=1" in log
    assert query["t"] not in log


async def test_nginx_refuses_tampered_and_expired_links(offload: Offload) -> None:
    """A link edited in its tag, subject, expiry, blob or firmware id, an incomplete one, one naming a path
    instead of a blob, and an expired one all get 403 from nginx, with none of the firmware's bytes."""
    env = offload.env
    d = await reporting(env, "dev1")
    await reporting(env, "dev2")
    other = await env.upload(OTHER_FIRMWARE, version="3.0.0")  # a real blob on disk, not dev1's
    fw, url = await notified_url(env, d, FIRMWARE)
    query = dict(parse_qsl(urlsplit(url).query))
    tag = query["t"]
    expired = offload.signer().mint(str(fw["id"]), "pk/dev1", time.time() - TTL_S - 60, blob=fw["sha256"])

    bad = {
        "tag": with_param(url, "t", ("A" if tag[0] != "A" else "B") + tag[1:]),
        "subject": with_param(url, "s", "pk/dev2"),
        "expiry": with_param(url, "e", str(int(query["e"]) + 3600)),
        "blob": with_param(url, "b", other["sha256"]),
        "firmware": url.replace(f"/firmware/{fw['id']}?", f"/firmware/{other['id']}?"),
        "no tag": re.sub(r"&t=[^&]*", "", url),
        "no expiry": re.sub(r"&e=[^&]*", "", url),
        "path as blob": with_param(url, "b", "..%2F..%2Flink.key"),
        "expired": expired,
    }
    for what, link in bad.items():
        status, _, body = await env.download(link)
        assert status == 403, f"{what}: {status}"
        assert FIRMWARE[:64] not in body and OTHER_FIRMWARE[:64] not in body, what
    status, _, body = await env.download(url)
    assert status == 200 and body == FIRMWARE
    assert "link=0" in offload.nginx.access_log  # the expired one, told apart in the log


async def test_broker_endpoint_accepts_the_same_links(offload: Offload) -> None:
    """The broker's own HTTPS endpoint serves the links nginx serves (nginx missing or bypassed), and it
    refuses tampered and expired ones the same way."""
    env = offload.env
    d = await reporting(env, "dev1")
    fw, url = await notified_url(env, d, FIRMWARE)
    direct = rebased(url, offload.broker_base)
    status, headers, body = await env.download(direct)
    assert status == 200 and body == FIRMWARE and headers["ETag"].strip('"') == fw["sha256"]
    status, _, body = await env.download(direct, {"Range": "bytes=0-99"})
    assert status == 206 and body == FIRMWARE[:100]

    query = dict(parse_qsl(urlsplit(url).query))
    expired = offload.signer().mint(str(fw["id"]), "pk/dev1", time.time() - TTL_S - 60, blob=fw["sha256"])
    for what, link in {
        "tag": with_param(direct, "t", "A" * 22),
        "subject": with_param(direct, "s", "pk/dev2"),
        "expiry": with_param(direct, "e", str(int(query["e"]) + 3600)),
        "blob": with_param(direct, "b", "0" * 64),
        "expired": rebased(expired, offload.broker_base),
    }.items():
        status, _, body = await env.download(link)
        assert status == 403 and FIRMWARE[:64] not in body, what


async def test_nginx_does_not_see_task_state(offload: Offload) -> None:
    """What docs/nginx-offload.md warns about: after the job is cancelled the broker refuses the link, but
    nginx, which cannot ask about tasks, serves it until it expires."""
    env = offload.env
    d = await reporting(env, "dev1")
    _, url = await notified_url(env, d, FIRMWARE)
    [job] = await env.api("GET", "/jobs", expect=200)
    await env.api("POST", f"/jobs/{job['id']}/cancel", expect=200)
    status, _, _ = await env.download(rebased(url, offload.broker_base))
    assert status == 403
    status, _, body = await env.download(url)
    assert status == 200 and body == FIRMWARE


async def test_nginx_limits_concurrent_downloads_per_device(offload: Offload) -> None:
    """The example config's `limit_conn`: a device's third concurrent download gets 429 from nginx."""
    env = offload.env
    big = os.urandom(24 * 1024 * 1024)  # far more than the socket buffers: unread downloads stay open
    d = await reporting(env, "dev1")
    form = aiohttp.FormData()
    form.add_field("product_key", "pk")
    form.add_field("version", "2.0.0")
    form.add_field("file", io.BytesIO(big), filename="big.bin", content_type="application/octet-stream")
    fw = await env.api("POST", "/firmware", expect=201, data=form)
    await env.job(fw["id"], ["pk/dev1"])
    [notice] = await d.notices()
    url = notice["data"]["url"]
    ctx = env.tls.client_context()
    async with env.http.get(url, ssl=ctx) as first, env.http.get(url, ssl=ctx) as second:
        assert first.status == second.status == 200
        assert await first.content.read(65536) and await second.content.read(65536)
        status, _, body = await env.download(url)
        assert status == 429 and big[:64] not in body
        first.close()
        second.close()

    async def downloads_again() -> bool:
        status, _, body = await env.download(url)
        return status == 200 and hashlib.sha256(body).hexdigest() == fw["sha256"]

    await eventually(downloads_again, what="a download once the others are gone")


def test_example_config_hashes_what_the_broker_signs() -> None:
    """The example's location captures `$ota_firmware` and documents the expression the broker signs."""
    text = EXAMPLE.read_text()
    assert f'# secure_link_md5 "{NGINX_MD5_FIELDS} <secret>";' in text
    assert (
        '"^/firmware/(?<ota_firmware>[0-9]{1,18}(\\.[0-9]{1,2})?)$"' in text
        and "map $arg_b $ota_blob" in text
    )


def test_offload_settings() -> None:
    """`download_offload` is "" or "nginx" (also from OTA_DOWNLOAD_OFFLOAD), and nginx needs a public_url."""
    settings = resolve(
        OtaConfig(), {"OTA_DOWNLOAD_OFFLOAD": "nginx", "OTA_PUBLIC_URL": "https://ota.example"}
    )
    assert settings.download_offload == "nginx" and settings.public_url == "https://ota.example"
    assert resolve(OtaConfig(), {}).download_offload == ""
    with pytest.raises(ConfigError, match=r"download_offload: 'varnish'"):
        resolve(OtaConfig(download_offload="varnish", public_url="https://ota.example"), {})
    with pytest.raises(ConfigError, match=r"public_url: must name the nginx server"):
        resolve(OtaConfig(download_offload="nginx"), {})


def test_nginx_link_command_prints_the_directives(tmp_path: Path) -> None:
    """`ota-broker nginx-link` prints the secure_link directives for the data dir's link key, and says
    what to do when the broker has not made the key yet."""
    from typer.testing import CliRunner

    from broker.cli import cli
    from firmware_store.links import offload_secret

    data = tmp_path / "data"
    runner = CliRunner()
    missing = runner.invoke(cli, ["nginx-link"], env={"OTA_DATA_DIR": str(data)})
    assert missing.exit_code == 1
    data.mkdir()
    (data / "link.key").write_text("ab" * 32 + "\n")
    done = runner.invoke(cli, ["nginx-link"], env={"OTA_DATA_DIR": str(data)})
    assert done.exit_code == 0, done.output
    assert "secure_link_md5" in done.output
    assert offload_secret(("ab" * 32).encode()) in done.output

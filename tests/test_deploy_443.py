"""Downloads on 443 as deployed: the systemd unit and the docker line give devices URLs without a port."""

from __future__ import annotations

import re
from pathlib import Path

from plugins.ota.settings import OtaConfig, apply_env, resolve

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "ota-broker.service"


def _unit_environment() -> dict[str, str]:
    env = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    return env


def test_systemd_unit_serves_downloads_on_443_with_only_the_bind_capability() -> None:
    """The unit binds HTTPS on 443 with CAP_NET_BIND_SERVICE, and its default public URL then names no port."""
    text = UNIT.read_text(encoding="utf-8")
    assert re.search(r"^AmbientCapabilities=CAP_NET_BIND_SERVICE$", text, re.M)
    assert re.search(r"^CapabilityBoundingSet=CAP_NET_BIND_SERVICE$", text, re.M)
    settings = resolve(apply_env(OtaConfig(), _unit_environment()), {})
    assert settings.https_bind.port == 443
    assert settings.public_port is None


def test_docker_line_publishes_443_with_a_public_url_without_port() -> None:
    """The documented `docker run` maps the host's 443 to the download port and sets a port-less public URL."""
    for path in (REPO / "Dockerfile", REPO / "docs" / "deploy.md"):
        [line] = re.findall(r"docker run .*? ota-broker$", path.read_text(encoding="utf-8"), re.S | re.M)
        assert "-p 443:8443" in line, path
        [url] = re.findall(r"OTA_PUBLIC_URL=(\S+)", line)
        assert re.fullmatch(r"https://[^:/\s]+", url), (path, url)

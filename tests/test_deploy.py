"""The deployment files say what docs/deploy.md promises: the Dockerfile wraps the single binary as a
non-root user with a /data volume and a health check; the systemd unit is valid and hardened; the build
script is sound bash. (No container engine or systemd runs in CI: the files are parsed and verified.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "deploy" / "systemd" / "ota-broker.service"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, args = line.strip().partition(" ")
            out.append((instruction.upper(), args.strip()))
    return out


def test_dockerfile_wraps_the_single_binary() -> None:
    """Build stage runs scripts/build-binary; the final stage holds the binary only, non-root, /data, health."""
    steps = dockerfile()
    froms = [args for instr, args in steps if instr == "FROM"]
    assert froms[0].startswith("python:3.11-slim-bookworm AS ")
    assert froms[-1] == "debian:bookworm-slim"
    final = steps[max(i for i, (instr, _) in enumerate(steps) if instr == "FROM") :]
    build = steps[: len(steps) - len(final)]
    assert any(instr == "RUN" and "scripts/build-binary" in args for instr, args in build)
    final_of = {instr: args for instr, args in final}
    copies = [args for instr, args in final if instr == "COPY"]
    assert copies == ["--from=build /src/dist/ota-broker /usr/local/bin/ota-broker"], copies
    user = final_of["USER"].split(":")[0]
    assert user not in ("root", "0"), user
    assert json.loads(final_of["VOLUME"]) == ["/data"]
    assert "OTA_DATA_DIR=/data" in final_of["ENV"]
    assert set(final_of["EXPOSE"].split()) == {"1883", "8883", "8443", "8080"}
    health = final_of["HEALTHCHECK"]
    assert json.loads(health[health.index("CMD") + 3 :].strip()) == ["/usr/local/bin/ota-broker", "health"]
    assert json.loads(final_of["ENTRYPOINT"]) == ["/usr/local/bin/ota-broker"]
    assert json.loads(final_of["CMD"]) == ["run"]
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv", "build", "dist", "data"} <= set(ignored)


def unit_entries() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_runs_the_binary_hardened() -> None:
    """Dedicated user, state in /var/lib/ota-broker, restart on failure, SIGTERM, and the sandbox settings."""
    service = {k: v[-1] for k, v in unit_entries()["Service"].items()}
    assert service["ExecStart"] == "/usr/local/bin/ota-broker run"
    assert service["User"] == service["Group"] == "ota-broker"
    assert service["StateDirectory"] == "ota-broker"
    assert service["Environment"] == "OTA_DATA_DIR=/var/lib/ota-broker"
    assert service["ReadWritePaths"] == "/var/lib/ota-broker"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 10
    for key, expected in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",  # binding 443 for downloads, nothing else
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
    }.items():
        assert service[key] == expected, key
    assert unit_entries()["Install"]["WantedBy"] == ["multi-user.target"]


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing to say (the binary path pointed at a stand-in executable)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    stand_in = tmp_path / "ota-broker"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    unit = tmp_path / "ota-broker.service"
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/ota-broker", str(stand_in)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "ota-broker" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    if found is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit offline: {security.stderr.strip()[:200]}")
    assert float(found.group(1)) <= 2.5, security.stdout


def test_build_script_is_sound_bash() -> None:
    """scripts/build-binary is executable, parses, and builds one file with the dynamically loaded parts."""
    script = REPO / "scripts" / "build-binary"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text(encoding="utf-8")
    for needed in ("--onefile", "--collect-data plugins.ota", "--collect-data broker", "dist/ota-broker"):
        assert needed in text, needed

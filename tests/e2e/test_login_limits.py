"""Failed logins cost bounded memory and time: many parallel wrong passwords for an application account
over real MQTT are refused, run at most `PASSWORD_CHECKS` argon2 checks at once and only a few in all,
are logged once per burst and counted for Prometheus; another account's right password still logs in
at once from the same address.

Every client here connects to 127.0.0.1 and is disconnected at teardown; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from plugins.device_auth.gate import PASSWORD_CHECKS, Gate
from plugins.device_auth.plugin import DeviceAuthPlugin
from plugins.device_auth.throttle import MAX_FAILURES
from tests.e2e.test_ops import scrape, value
from tests.e2e.test_security import DASH_PASSWORD, REFUSED, dash_hash, peer, secure_broker
from tests.support import Env, Tls

ATTEMPTS = 60
OPS_PASSWORD = "ops-pw"


@functools.cache
def ops_hash() -> str:
    return PasswordHasher().hash(OPS_PASSWORD)


@pytest.fixture
async def two_accounts(tmp_path: Path, tls: Tls) -> AsyncIterator[Env]:
    """A device-secret broker with the accounts "dash" and "ops"."""
    accounts = {
        "dash": {"password_hash": dash_hash(), "subscribe": ["/apps/+"]},
        "ops": {"password_hash": ops_hash(), "subscribe": ["/apps/+"]},
    }
    async with secure_broker(tmp_path / "data", tls, accounts=accounts) as env:
        yield env


def auth_plugin(env: Env) -> DeviceAuthPlugin:
    plugin = env.running.broker.plugins_manager.get_plugin("DeviceAuthPlugin")
    assert isinstance(plugin, DeviceAuthPlugin)
    return plugin


class Concurrency:
    """Wraps the gate's argon2 check (which still runs) to count checks and the most at once."""

    def __init__(self, gate: Gate) -> None:
        self._check = gate._check_password
        self._lock = threading.Lock()
        self.running = self.peak = self.calls = 0

    def __call__(self, password_hash: str, password: Any) -> bool:
        with self._lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
        try:
            return self._check(password_hash, password)
        finally:
            with self._lock:
                self.running -= 1


async def test_parallel_wrong_logins_are_bounded_refused_and_counted(
    two_accounts: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """60 parallel wrong passwords for "dash": all refused, ≤ PASSWORD_CHECKS argon2 checks at once and few in
    all, one block line, counted; "ops" with its right password still logs in at once."""
    env = two_accounts
    caplog.set_level(logging.INFO, logger="ota.auth")
    plugin = auth_plugin(env)
    checks = Concurrency(plugin.gate)
    monkeypatch.setattr(plugin.gate, "_check_password", checks)

    wrong = [peer(env, "apps", "dash", f"guess-{i}", "dash", f"guess-{i}") for i in range(ATTEMPTS)]
    codes = await asyncio.gather(*(p.attempt() for p in wrong))
    assert codes == [REFUSED] * ATTEMPTS
    assert checks.peak <= PASSWORD_CHECKS, f"{checks.peak} argon2 checks ran at once"
    wrong_checked = checks.calls
    assert wrong_checked <= MAX_FAILURES + PASSWORD_CHECKS, (
        f"{wrong_checked} argon2 checks for {ATTEMPTS} attempts"
    )

    started = time.monotonic()
    assert await peer(env, "apps", "ops", "ops-1", "ops", OPS_PASSWORD).attempt() == 0
    assert time.monotonic() - started < 2.0, "another account's login was held up"
    assert await peer(env, "apps", "dash", "dash-blocked", "dash", DASH_PASSWORD).attempt() == REFUSED

    lines = [r.getMessage() for r in caplog.records if r.name == "ota.auth"]
    blocks = [line for line in lines if "refused for" in line]
    assert len(blocks) == 1 and "'dash'" in blocks[0], lines
    assert len(lines) <= 2, f"one line per burst, not one per attempt: {lines}"
    assert not any(f"guess-{i}" in line for line in lines for i in range(ATTEMPTS))

    samples = await scrape(env)
    bad = value(samples, "ota_mqtt_logins_refused_total", reason="bad_password")
    throttled = value(samples, "ota_mqtt_logins_refused_total", reason="throttled")
    assert bad == wrong_checked and bad + throttled == ATTEMPTS + 1


async def test_an_address_spraying_accounts_is_refused_without_checks(two_accounts: Env) -> None:
    """Wrong passwords for many different account names from one address: later attempts are not checked."""
    env = two_accounts
    plugin = auth_plugin(env)
    accounts = plugin.config.accounts
    for i in range(MAX_FAILURES):
        accounts[f"user{i}"] = accounts["ops"]
    for i in range(MAX_FAILURES):
        assert await peer(env, "apps", "x", f"spray-{i}", f"user{i}", "wrong").attempt() == REFUSED
    started = time.monotonic()
    assert await peer(env, "apps", "ops", "ops-1", "ops", OPS_PASSWORD).attempt() == REFUSED
    assert time.monotonic() - started < 1.0

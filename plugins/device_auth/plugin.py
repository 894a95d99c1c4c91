"""`plugins.device_auth.plugin.DeviceAuthPlugin`: who may connect, and which topics each client may use.

In `device-secret` mode a device logs in with Aliyun's one-device-one-secret signature (`signing`); an
application (dashboard, script) logs in with an account from this plugin's configuration, whose password
is stored only as an argon2 hash and checked off the event loop. Every refused CONNECT is logged once
with the peer, the clientId and the reason, never the secret or the password. In `open` mode (labs)
everyone may connect and use any topic.

An argon2 check costs its memory (64 MiB by default) while it runs, so at most `PASSWORD_CHECKS` run at
once, and repeated wrong passwords per username and per client address are refused without a check for
a growing time (`throttle`): one log line when such a block starts, not one per attempt. Refusals are
counted by reason for Prometheus (`ota_mqtt_logins_refused`) when the directory offers a `LoginMetrics`.

The device registry lives in the OTA service; this plugin asks it through the `DeviceDirectory`
protocol, which the OTA plugin implements.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from amqtt.broker import BrokerContext
from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from plugins.broker_port import MqttBroker
from plugins.device_auth import acl
from plugins.device_auth.signing import CredentialsError, DeviceCredentials, Refusal, verify
from plugins.device_auth.throttle import WINDOW_S, LoginThrottle
from plugins.mqtt_topics import is_valid_filter
from plugins.ota.core.topics import DeviceRef

log = logging.getLogger("ota.auth")

OPEN = "open"
PASSWORD_CHECKS = 2  # argon2 checks running at once, at most (each holds its memory cost while it runs)
THROTTLED = "throttled"  # the refusal reason of an attempt refused without a password check


@runtime_checkable
class LoginMetrics(Protocol):
    """Where refused logins are counted (the OTA plugin's Prometheus metrics)."""

    def login_refused(self, reason: str) -> None: ...


@runtime_checkable
class DeviceDirectory(Protocol):
    """What the auth plugin needs to know about devices (implemented by the OTA plugin)."""

    @property
    def auth_mode(self) -> str: ...

    async def device_login(self, device: DeviceRef) -> tuple[str, bool] | None:
        """The device's secret and whether it is enabled; None for an unknown device."""
        ...


@dataclass
class AccountConfig:
    """An application account: an argon2 password hash and the topic patterns it may use."""

    password_hash: str
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)


@dataclass
class DeviceAuthConfig:
    accounts: dict[str, AccountConfig] = field(default_factory=dict)
    # When > 0, a device CONNECT whose clientId has no `timestamp=<ms or s>`, or one further than this
    # many seconds from the broker's clock, is refused: this bounds how long a captured password can be
    # replayed. 0 (the default) accepts any timestamp or none, as some SDKs send a fixed one.
    max_timestamp_skew_s: float = 0.0


class DeviceAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):  # type: ignore[misc]
    Config = DeviceAuthConfig

    def __init__(self, context: BrokerContext) -> None:
        super().__init__(context)
        self._hasher = PasswordHasher()
        self._directory: DeviceDirectory | None = None
        self._broker: MqttBroker | None = None
        self._password_checks = asyncio.Semaphore(PASSWORD_CHECKS)
        self.throttle = LoginThrottle()
        problem = config_problem(self.config)
        if problem:
            raise ValueError(problem)

    # ---------------------------------------------------------------------------------- directory

    def bind_broker(self, broker: MqttBroker) -> None:
        """ota-broker's broker hands itself over; the device directory is found through it."""
        self._broker = broker

    def directory(self) -> DeviceDirectory | None:
        if self._directory is None and self._broker is not None:
            # a runtime-checkable protocol is what isinstance checks against; mypy wants a concrete class
            self._directory = self._broker.find_plugin(DeviceDirectory)  # type: ignore[type-abstract]
        return self._directory

    def _open(self) -> bool:
        found = self.directory()
        return found is not None and found.auth_mode == OPEN

    # ------------------------------------------------------------------------------ authentication

    async def authenticate(self, *, session: Session) -> bool | None:
        if self._open():
            return True
        peer = f"{session.remote_address}:{session.remote_port}"
        client_id = str(session.client_id or "")[:96]
        account = self.config.accounts.get(session.username or "")
        if account is not None:
            return await self._account_login(session, account, peer)
        try:
            await self._check_device(session)
        except CredentialsError as e:
            self._count(e.refusal.name.lower())
            claimed = DeviceRef.from_username(session.username)  # the device it claimed to be, if any
            log.warning(
                "refused CONNECT from %s (%sclientId %r, username %r): %s",
                peer,
                "" if claimed is None else f"device {claimed}, ",
                client_id,
                str(session.username or "")[:80],
                e,
                extra={} if claimed is None else {"device": str(claimed)},
            )
            return False
        return True

    async def _account_login(self, session: Session, account: AccountConfig, peer: str) -> bool:
        username, address = str(session.username), str(session.remote_address)
        if self.throttle.refused(address, username, time.monotonic()):
            self._count(THROTTLED)
            return False
        async with self._password_checks:
            # Waiting here, the attempt may have become one of a burst that is blocked meanwhile.
            if self.throttle.refused(address, username, time.monotonic()):
                self._count(THROTTLED)
                return False
            ok = await asyncio.to_thread(self._check_password, account.password_hash, session.password)
        if ok:
            self.throttle.succeeded(username)
            return True
        self._count(Refusal.BAD_PASSWORD.name.lower())
        now = time.monotonic()
        blocks = self.throttle.failed(address, username, now)
        for block in blocks:
            log.warning(
                "%d wrong passwords %s %r within %gs: its logins are refused for %gs without a check%s",
                block.failures,
                "for account" if block.kind == "username" else "for different accounts from",
                block.key,
                WINDOW_S,
                block.seconds,
                f" ({block.refused_before} refused during its previous block)"
                if block.refused_before
                else "",
            )
        if not blocks and self.throttle.recent_failures(username, now) == 1:  # the first of a burst
            log.warning("refused CONNECT from %s (account %r): %s", peer, username, Refusal.BAD_PASSWORD)
        return False

    def _count(self, reason: str) -> None:
        metrics = getattr(self.directory(), "metrics", None)
        if isinstance(metrics, LoginMetrics):
            metrics.login_refused(reason)

    def _check_password(self, password_hash: str, password: Any) -> bool:
        if password is None:
            return False
        try:
            return bool(self._hasher.verify(password_hash, password))
        except (VerificationError, InvalidHashError):
            return False

    async def _check_device(self, session: Session) -> None:
        creds = DeviceCredentials.parse(session.client_id, session.username, session.password)
        directory = self.directory()
        found = None if directory is None else await directory.device_login(creds.device)
        if found is None:
            raise CredentialsError(Refusal.UNKNOWN_DEVICE, str(creds.device))
        secret, enabled = found
        if not verify(creds, secret):
            raise CredentialsError(Refusal.BAD_SIGNATURE, str(creds.device))
        if not enabled:
            raise CredentialsError(Refusal.DISABLED, str(creds.device))
        skew = self.config.max_timestamp_skew_s
        if skew > 0 and (creds.timestamp is None or not _fresh(creds.timestamp, time.time(), skew)):
            raise CredentialsError(Refusal.STALE_TIMESTAMP, str(creds.device))

    # ---------------------------------------------------------------------------- topic isolation

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if self._open():
            return True
        if session is None or topic is None:
            return False
        account = self.config.accounts.get(session.username or "")
        if account is not None:
            if action == Action.PUBLISH:
                return acl.any_matches(account.publish, topic)
            if action == Action.SUBSCRIBE:
                return acl.any_covers(account.subscribe, topic)
            return acl.any_matches(account.subscribe, topic)
        device = DeviceRef.from_username(session.username)
        if device is None:
            return False
        if action == Action.PUBLISH:
            allowed = acl.device_may_publish(device, topic)
        elif action == Action.SUBSCRIBE:
            allowed = acl.device_may_subscribe(device, topic)
        else:
            return acl.device_may_receive(device, topic)
        if not allowed:
            log.warning(
                "refused %s by %s on %r: outside the device's own topics",
                action,
                device,
                topic[:128],
                extra={"device": str(device)},
            )
        return allowed


def config_problem(config: DeviceAuthConfig) -> str | None:
    """What is wrong with the plugin's configuration (key path and reason), or None."""
    for name, account in config.accounts.items():
        key = f"accounts.{name}"
        if not name or "&" in name:
            return f"{key}: account names may not be empty or contain '&' (that form names a device)"
        if not account.password_hash.startswith("$argon2"):
            return f"{key}.password_hash: expected an argon2 hash (make one with `ota-broker hash-password`)"
        for action in ("publish", "subscribe"):
            for i, pattern in enumerate(getattr(account, action)):
                if not is_valid_filter(pattern):
                    return f"{key}.{action}[{i}]: {pattern!r} is not an MQTT topic filter"
    if config.max_timestamp_skew_s < 0:
        return "max_timestamp_skew_s: must be 0 (off) or a positive number of seconds"
    return None


def _fresh(timestamp: str, now: float, skew: float) -> bool:
    if not timestamp.isdigit() or len(timestamp) > 16:
        return False
    value = int(timestamp)
    seconds = value / 1000 if value > 10**11 else value  # Aliyun SDKs send ms or s
    return abs(now - seconds) <= skew

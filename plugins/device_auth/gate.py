"""`Gate`: who may connect, and which topics each client may use; the decisions of `DeviceAuthPlugin`
(the embedded broker) and of the HTTP hooks an external broker calls (`plugins.device_auth.hooks`), so
both follow the same device registry, accounts and topic rules.

A device logs in with Aliyun's one-device-one-secret signature (`signing`); an application account with a
password kept only as an argon2 hash, checked off the event loop, at most `PASSWORD_CHECKS` at once, with
repeated wrong passwords per username and per client address refused without a check for a growing time
(`throttle`). Every refused login is logged once with the peer, the client id and the reason, never the
secret or the password, and counted by reason when the directory offers a `LoginMetrics`. In `open` mode
(labs) everyone may connect and use any topic.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from plugins.device_auth import acl
from plugins.device_auth.signing import CredentialsError, DeviceCredentials, Refusal, verify
from plugins.device_auth.throttle import WINDOW_S, LoginThrottle
from plugins.mqtt_topics import is_valid_filter
from plugins.ota.core.topics import DeviceRef

log = logging.getLogger("ota.auth")

OPEN = "open"
PASSWORD_CHECKS = 2  # argon2 checks running at once, at most (each holds its memory cost while it runs)
THROTTLED = "throttled"  # the refusal reason of an attempt refused without a password check


class Access(StrEnum):
    """What a client wants to do with a topic: publish to it, subscribe to a filter, or receive a message."""

    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"
    RECEIVE = "receive"


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


@dataclass(frozen=True, slots=True)
class Login:
    """A CONNECT's credentials, as the embedded broker or an external one hands them over."""

    client_id: str
    username: str | None
    password: str | bytes | None
    address: str  # the client's address ("" when the caller does not say)
    port: int | None = None


class Gate:
    def __init__(self, config: DeviceAuthConfig, directory: Callable[[], DeviceDirectory | None]) -> None:
        problem = config_problem(config)
        if problem:
            raise ValueError(problem)
        self.config = config
        self._directory = directory
        self._hasher = PasswordHasher()
        self._password_checks = asyncio.Semaphore(PASSWORD_CHECKS)
        self.throttle = LoginThrottle()

    def is_open(self) -> bool:
        found = self._directory()
        return found is not None and found.auth_mode == OPEN

    # ------------------------------------------------------------------------------ authentication

    async def login(self, login: Login) -> bool:
        """Whether these credentials may connect: a device's valid signature (registered, enabled, fresh
        when timestamps are enforced) or an account's password."""
        if self.is_open():
            return True
        peer = login.address if login.port is None else f"{login.address}:{login.port}"
        account = self.config.accounts.get(login.username or "")
        if account is not None:
            return await self._account_login(login, account, peer)
        try:
            await self._check_device(login)
        except CredentialsError as e:
            self._count(e.refusal.name.lower())
            claimed = DeviceRef.from_username(login.username)  # the device it claimed to be, if any
            log.warning(
                "refused CONNECT from %s (%sclientId %r, username %r): %s",
                peer,
                "" if claimed is None else f"device {claimed}, ",
                login.client_id[:96],
                str(login.username or "")[:80],
                e,
                extra={} if claimed is None else {"device": str(claimed)},
            )
            return False
        return True

    async def _account_login(self, login: Login, account: AccountConfig, peer: str) -> bool:
        username, address = str(login.username), login.address
        if self.throttle.refused(address, username, time.monotonic()):
            self._count(THROTTLED)
            return False
        async with self._password_checks:
            # Waiting here, the attempt may have become one of a burst that is blocked meanwhile.
            if self.throttle.refused(address, username, time.monotonic()):
                self._count(THROTTLED)
                return False
            ok = await asyncio.to_thread(self._check_password, account.password_hash, login.password)
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
        metrics = getattr(self._directory(), "metrics", None)
        if isinstance(metrics, LoginMetrics):
            metrics.login_refused(reason)

    def _check_password(self, password_hash: str, password: Any) -> bool:
        if password is None:
            return False
        try:
            return bool(self._hasher.verify(password_hash, password))
        except (VerificationError, InvalidHashError):
            return False

    async def _check_device(self, login: Login) -> None:
        creds = DeviceCredentials.parse(login.client_id, login.username, login.password)
        directory = self._directory()
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

    def may(self, username: str | None, topic: str, access: Access) -> bool:
        """Whether the client that logged in as `username` may publish to `topic`, subscribe to the filter
        `topic`, or receive a message on `topic`: an account by its patterns, a device inside its own
        topics only (a refusal of a device is logged)."""
        if self.is_open():
            return True
        account = self.config.accounts.get(username or "")
        if account is not None:
            if access is Access.PUBLISH:
                return acl.any_matches(account.publish, topic)
            if access is Access.SUBSCRIBE:
                return acl.any_covers(account.subscribe, topic)
            return acl.any_matches(account.subscribe, topic)
        device = DeviceRef.from_username(username)
        if device is None:
            return False
        if access is Access.PUBLISH:
            allowed = acl.device_may_publish(device, topic)
        elif access is Access.SUBSCRIBE:
            allowed = acl.device_may_subscribe(device, topic)
        else:
            return acl.device_may_receive(device, topic)
        if not allowed:
            log.warning(
                "refused %s by %s on %r: outside the device's own topics",
                access,
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

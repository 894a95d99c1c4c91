"""What admins do with operator accounts (add, change, disable, delete; issue and revoke API tokens), how a
request's credentials become a `Principal`, and the audit log of changes."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from plugins.ota.core.accounts import TOKEN_PREFIX, Account, ApiToken, AuditEntry, Principal, Role
from plugins.ota.core.errors import InvalidInput
from plugins.ota.store.repository import Repository

log = logging.getLogger("ota.service")

MIN_PASSWORD = 10
PRUNE_EVERY_S = 3600.0


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AccountAdmin:
    def __init__(self, repo: Repository, clock: Callable[[], float], audit_retention_s: float = 0.0) -> None:
        self.repo = repo
        self.clock = clock
        self.audit_retention_s = audit_retention_s  # 0: the audit log keeps everything
        self._hasher = PasswordHasher()
        self._pruned_at = float("-inf")

    async def add(self, name: str, role: Role, password: str | None) -> Account:
        account = await self.repo.add_account(name, role, await self._hash(password), self.clock())
        log.info("account %s added (%s)", name, role)
        return account

    async def update(
        self,
        name: str,
        *,
        role: Role | None = None,
        password: str | None = None,
        disabled: bool | None = None,
    ) -> Account:
        account = await self.repo.update_account(
            name, role=role, password_hash=await self._hash(password), disabled=disabled
        )
        log.info("account %s changed", name)
        return account

    async def delete(self, name: str) -> None:
        await self.repo.delete_account(name)
        log.info("account %s deleted", name)

    async def get(self, name: str) -> Account:
        return await self.repo.get_account(name)

    async def all(self) -> list[Account]:
        return await self.repo.list_accounts()

    async def issue_token(self, account: str, label: str) -> tuple[ApiToken, str]:
        """A new API token for `account`: its record, and the token itself (shown this once, kept as sha256)."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = await self.repo.add_token(account, token_digest(token), label, self.clock())
        log.info("API token %d issued to %s (%s)", record.id, account, label)
        return record, token

    async def tokens(self, account: str) -> list[ApiToken]:
        return await self.repo.list_tokens(account)

    async def revoke(self, account: str, token_id: int) -> ApiToken:
        record = await self.repo.revoke_token(account, token_id, self.clock())
        log.info("API token %d of %s revoked", token_id, account)
        return record

    async def by_token(self, token: str) -> Principal | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        return await self.repo.principal_of_token(token_digest(token))

    async def by_session(self, name: str, epoch: int) -> Principal | None:
        return await self.repo.principal_of_account(name, epoch)

    async def session_epoch(self, name: str) -> int | None:
        return await self.repo.session_epoch(name)

    async def end_sessions(self, name: str) -> None:
        await self.repo.end_sessions(name)
        log.info("account %s signed out: its browser sessions end", name)

    async def sign_in(self, name: str, password: str) -> Principal | None:
        """The account, if `password` is its password and it is enabled."""
        stored = await self.repo.password_hash(name)
        if stored is None:
            await asyncio.to_thread(self._hasher.hash, password)  # as long as a wrong password takes
            return None
        try:
            await asyncio.to_thread(self._hasher.verify, stored, password)
        except (VerificationError, InvalidHashError):
            return None
        return await self.repo.principal_of_account(name)

    async def audit(self, entry: AuditEntry) -> None:
        await self.repo.record_audit(entry)

    async def audit_page(self, limit: int, offset: int) -> tuple[list[AuditEntry], int]:
        return await self.repo.audit_page(limit, offset)

    async def prune(self) -> int:
        """Forget audit entries past their retention, at most once an hour (in the process that leads)."""
        now = self.clock()
        if self.audit_retention_s <= 0 or now - self._pruned_at < PRUNE_EVERY_S:
            return 0
        self._pruned_at = now
        gone = await self.repo.prune_audit(now - self.audit_retention_s)
        if gone:
            log.info(
                "audit log: %d entr%s older than its retention forgotten", gone, "y" if gone == 1 else "ies"
            )
        return gone

    async def _hash(self, password: str | None) -> str | None:
        if password is None:
            return None
        if len(password) < MIN_PASSWORD:
            raise InvalidInput("password", f"must be at least {MIN_PASSWORD} characters")
        return await asyncio.to_thread(self._hasher.hash, password)

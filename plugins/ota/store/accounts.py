"""`AccountStore`: operator accounts, their API tokens and the audit log, in one SQL text for both databases
(and `JobReports`, the job timeline, the same way).

A mixin of the two repositories: its statements are written once, with `?` marks, and each repository runs
them through its two primitives (`_sql_rows`, `_sql_change`; PostgreSQL's turns the marks into `$n`). A
token is kept as its sha256 only: the database never holds one that could be used.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from plugins.ota.core.accounts import Account, ApiToken, AuditEntry, Principal, Role
from plugins.ota.core.errors import NotFound
from plugins.ota.core.topics import DeviceRef


class SharedSql(ABC):
    """What a mixin whose statements both databases run needs of its repository."""

    @abstractmethod
    async def _sql_rows(self, sql: str, args: Sequence[Any] = ()) -> list[Mapping[str, Any]]:
        """Run one statement (`?` marks) and return its rows."""

    @abstractmethod
    async def _sql_change(self, sql: str, args: Sequence[Any] = (), conflict: str = "") -> int:
        """Run one write statement (`?` marks), atomic on its own; the rows changed. A unique key broken
        raises `Conflict(conflict)`."""


class JobReports(SharedSql):
    async def job_outcomes(self, job_id: int) -> list[tuple[float, str]]:
        """When each of the job's tasks ended an attempt, and how (succeeded, failed, timed_out), in order."""
        rows = await self._sql_rows(
            "SELECT h.at AS at, h.state AS state FROM task_history h JOIN tasks t ON t.id = h.task_id"
            " WHERE t.job_id = ? AND h.state IN ('succeeded', 'failed', 'timed_out') ORDER BY h.at, h.id",
            (job_id,),
        )
        return [(float(r["at"]), str(r["state"])) for r in rows]


class DeviceGroups(SharedSql):
    """Devices' groups: labels an operator gives devices, and a job may target."""

    async def set_device_groups(self, ref: DeviceRef, groups: Sequence[str]) -> list[str]:
        """`ref`'s groups become `groups` (NotFound when there is no such device)."""
        if not await self._sql_rows(
            "SELECT 1 AS found FROM devices WHERE product_key = ? AND device_name = ?",
            (ref.product_key, ref.device_name),
        ):
            raise NotFound(f"device {ref} does not exist")
        await self._sql_change(
            "DELETE FROM device_groups WHERE product_key = ? AND device_name = ?",
            (ref.product_key, ref.device_name),
        )
        for group in dict.fromkeys(groups):
            await self._sql_change(
                "INSERT INTO device_groups (product_key, device_name, grp) VALUES (?, ?, ?)",
                (ref.product_key, ref.device_name, group),
            )
        return sorted(dict.fromkeys(groups))

    async def groups_of(self, refs: Sequence[DeviceRef]) -> dict[DeviceRef, list[str]]:
        """The groups of each of `refs` (one query for a page of devices; none: an empty list)."""
        found: dict[DeviceRef, list[str]] = {r: [] for r in refs}
        for start in range(0, len(refs), 500):
            chunk = refs[start : start + 500]
            pairs = " OR ".join(["(product_key = ? AND device_name = ?)"] * len(chunk))
            rows = await self._sql_rows(
                f"SELECT product_key, device_name, grp FROM device_groups WHERE {pairs} ORDER BY grp",  # noqa: S608 - marks only
                [value for r in chunk for value in (r.product_key, r.device_name)],
            )
            for row in rows:
                found[DeviceRef(str(row["product_key"]), str(row["device_name"]))].append(str(row["grp"]))
        return found


class FleetReports(SharedSql):
    async def version_counts(self) -> list[tuple[str, str, str, int]]:
        """How many devices run each version of each product's module now: (product, module, version, n)."""
        rows = await self._sql_rows(
            "SELECT product_key, module, version, COUNT(*) AS n FROM device_modules"
            " GROUP BY product_key, module, version ORDER BY product_key, module, version"
        )
        return [(str(r["product_key"]), str(r["module"]), str(r["version"]), int(r["n"])) for r in rows]

    async def upgrades_since(self, since: float) -> list[tuple[float, str, str, str]]:
        """Every upgrade that succeeded since `since`: when, product, module, version, in order."""
        rows = await self._sql_rows(
            "SELECT h.at AS at, t.product_key AS product_key, t.module AS module, t.target_version AS version"
            " FROM task_history h JOIN tasks t ON t.id = h.task_id"
            " WHERE h.state = 'succeeded' AND h.at >= ? ORDER BY h.at, h.id",
            (since,),
        )
        return [(float(r["at"]), str(r["product_key"]), str(r["module"]), str(r["version"])) for r in rows]


class AccountStore(SharedSql):
    # ------------------------------------------------------------------------------------- accounts

    async def add_account(self, name: str, role: Role, password_hash: str | None, now: float) -> Account:
        await self._sql_change(
            "INSERT INTO accounts (name, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
            (name, role.value, password_hash, now),
            conflict=f"account {name} already exists",
        )
        return await self.get_account(name)

    async def find_account(self, name: str) -> Account | None:
        rows = await self._sql_rows("SELECT * FROM accounts WHERE name = ?", (name,))
        return _account(rows[0]) if rows else None

    async def get_account(self, name: str) -> Account:
        found = await self.find_account(name)
        if found is None:
            raise NotFound(f"account {name} does not exist")
        return found

    async def password_hash(self, name: str) -> str | None:
        """The account's password hash, if it is enabled and has a password."""
        rows = await self._sql_rows(
            "SELECT password_hash FROM accounts WHERE name = ? AND disabled = 0", (name,)
        )
        return str(rows[0]["password_hash"]) if rows and rows[0]["password_hash"] else None

    async def list_accounts(self) -> list[Account]:
        return [_account(r) for r in await self._sql_rows("SELECT * FROM accounts ORDER BY name")]

    async def update_account(
        self,
        name: str,
        *,
        role: Role | None = None,
        password_hash: str | None = None,
        disabled: bool | None = None,
    ) -> Account:
        changes: list[tuple[str, Any]] = []
        if role is not None:
            changes.append(("role", role.value))
        if password_hash is not None:
            changes.append(("password_hash", password_hash))
        if disabled is not None:
            changes.append(("disabled", int(disabled)))
        if changes:
            sets = ", ".join(f"{column} = ?" for column, _ in changes)
            if password_hash is not None or disabled:
                sets += ", session_epoch = session_epoch + 1"  # its browser sessions end
            changed = await self._sql_change(
                f"UPDATE accounts SET {sets} WHERE name = ?",  # noqa: S608 - fixed column names
                (*(value for _, value in changes), name),
            )
            if not changed:
                raise NotFound(f"account {name} does not exist")
        return await self.get_account(name)

    async def delete_account(self, name: str) -> None:
        await self._sql_change("DELETE FROM api_tokens WHERE account = ?", (name,))
        if not await self._sql_change("DELETE FROM accounts WHERE name = ?", (name,)):
            raise NotFound(f"account {name} does not exist")

    # ------------------------------------------------------------------------------------------ tokens

    async def add_token(self, account: str, token_sha256: str, label: str, now: float) -> ApiToken:
        await self.get_account(account)
        await self._sql_change(
            "INSERT INTO api_tokens (account, token_sha256, label, created_at) VALUES (?, ?, ?, ?)",
            (account, token_sha256, label, now),
            conflict="that token exists already",
        )
        rows = await self._sql_rows("SELECT * FROM api_tokens WHERE token_sha256 = ?", (token_sha256,))
        return _token(rows[0])

    async def list_tokens(self, account: str) -> list[ApiToken]:
        await self.get_account(account)
        rows = await self._sql_rows("SELECT * FROM api_tokens WHERE account = ? ORDER BY id", (account,))
        return [_token(r) for r in rows]

    async def revoke_token(self, account: str, token_id: int, now: float) -> ApiToken:
        await self._sql_change(  # revoking twice is no error: it stays revoked as it was
            "UPDATE api_tokens SET revoked_at = ? WHERE account = ? AND id = ? AND revoked_at IS NULL",
            (now, account, token_id),
        )
        rows = await self._sql_rows(
            "SELECT * FROM api_tokens WHERE account = ? AND id = ?", (account, token_id)
        )
        if not rows:
            raise NotFound(f"account {account} has no token {token_id}")
        return _token(rows[0])

    async def principal_of_token(self, token_sha256: str) -> Principal | None:
        """Whose token this is, if it is not revoked and its account is enabled."""
        rows = await self._sql_rows(
            "SELECT a.name, a.role FROM api_tokens t JOIN accounts a ON a.name = t.account"
            " WHERE t.token_sha256 = ? AND t.revoked_at IS NULL AND a.disabled = 0",
            (token_sha256,),
        )
        return Principal(str(rows[0]["name"]), Role(rows[0]["role"])) if rows else None

    async def principal_of_account(self, name: str, epoch: int | None = None) -> Principal | None:
        """The account as a signed-in session acts, if it is still enabled (its role as it is now) and, given
        `epoch`, its sessions have not been ended since the session was made."""
        rows = await self._sql_rows(
            "SELECT name, role, session_epoch FROM accounts WHERE name = ? AND disabled = 0", (name,)
        )
        if not rows or (epoch is not None and int(rows[0]["session_epoch"]) != epoch):
            return None
        return Principal(str(rows[0]["name"]), Role(rows[0]["role"]))

    async def session_epoch(self, name: str) -> int | None:
        rows = await self._sql_rows("SELECT session_epoch FROM accounts WHERE name = ?", (name,))
        return int(rows[0]["session_epoch"]) if rows else None

    async def end_sessions(self, name: str) -> None:
        """Every browser session of the account ends (its session cookies stop working)."""
        await self._sql_change(
            "UPDATE accounts SET session_epoch = session_epoch + 1 WHERE name = ?", (name,)
        )

    # ------------------------------------------------------------------------------------------- audit

    async def record_audit(self, entry: AuditEntry) -> None:
        await self._sql_change(
            "INSERT INTO audit (at, actor, role, action, target, status, remote) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (entry.at, entry.actor, entry.role, entry.action, entry.target, entry.status, entry.remote),
        )

    async def prune_audit(self, before: float) -> int:
        """Forget the audit entries older than `before`; how many went."""
        return await self._sql_change("DELETE FROM audit WHERE at < ?", (before,))

    async def audit_page(self, limit: int, offset: int) -> tuple[list[AuditEntry], int]:
        """The newest first."""
        rows = await self._sql_rows("SELECT * FROM audit ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset))
        total = await self._sql_rows("SELECT COUNT(*) AS n FROM audit")
        return [_entry(r) for r in rows], int(total[0]["n"])


def _account(r: Mapping[str, Any]) -> Account:
    return Account(
        name=str(r["name"]),
        role=Role(r["role"]),
        created_at=float(r["created_at"]),
        disabled=bool(r["disabled"]),
        has_password=bool(r["password_hash"]),
    )


def _token(r: Mapping[str, Any]) -> ApiToken:
    revoked = r["revoked_at"]
    return ApiToken(
        id=int(r["id"]),
        account=str(r["account"]),
        label=str(r["label"]),
        created_at=float(r["created_at"]),
        revoked_at=None if revoked is None else float(revoked),
    )


def _entry(r: Mapping[str, Any]) -> AuditEntry:
    return AuditEntry(
        at=float(r["at"]),
        actor=str(r["actor"]),
        role=str(r["role"]),
        action=str(r["action"]),
        target=str(r["target"]),
        status=int(r["status"]),
        remote=str(r["remote"]),
        id=int(r["id"]),
    )

"""Operator accounts: who may do what through the management API, and the trail of what they did.

Three roles, each allowing what the one before it does: a `viewer` reads; an `operator` also uploads and
deletes firmware and runs jobs; an `admin` also manages devices and their secrets, and accounts. The admin
token of the settings is the bootstrap admin: it keeps working, under the name `admin-token`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from plugins.ota.core.errors import InvalidInput

BOOTSTRAP = "admin-token"  # the actor the settings' admin token acts as
TOKEN_PREFIX = "ota_"  # noqa: S105 - not a secret: what an account's API token starts with
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


def account_name(value: object, field: str = "name") -> str:
    """A valid account name: 1-64 of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value == BOOTSTRAP:
        raise InvalidInput(field, "must be 1-64 characters of a-z, 0-9, '.', '_', '-' (not 'admin-token')")
    return value


def role_of(value: object, field: str = "role") -> Role:
    try:
        return Role(str(value))
    except ValueError as e:
        raise InvalidInput(field, "must be 'viewer', 'operator' or 'admin'") from e


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    role: Role
    created_at: float
    disabled: bool
    has_password: bool


@dataclass(frozen=True, slots=True)
class ApiToken:
    id: int
    account: str
    label: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from: an account (by its password's session or one of its tokens), or the bootstrap
    admin token."""

    name: str
    role: Role


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One change made through the API (or refused for lack of a role): who, what, on what, when, from where."""

    at: float
    actor: str
    role: str
    action: str  # e.g. "POST /api/v1/jobs/{id}/cancel"
    target: str  # the path asked for, and the id of what a creation made
    status: int
    remote: str
    id: int = 0

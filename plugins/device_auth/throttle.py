"""Failed password logins, fail2ban-style: after a few wrong passwords within a window, further attempts
are refused at once, without the argon2 check, for a backoff that doubles with each block. Pure: the
caller passes the time; no I/O, no asyncio.

Two kinds of key, each blocked on its own:

- a username: `MAX_FAILURES` wrong passwords for it within `WINDOW_S` block that account (from
  anywhere: that is what stops a guesser spreading over addresses);
- a client address: wrong passwords for `MAX_FAILURES` *different* usernames from it within
  `WINDOW_S` block that address (a password spray). Hammering one username does not block its address,
  so another account logging in from the same address (a NAT, a gateway) is not held up by it.

A block lasts `FIRST_BLOCK_S`, doubled for each block of the same key that follows within
`FORGET_S` of the last failure, up to `MAX_BLOCK_S`. A right password clears its username's record.
At most `MAX_KEYS` keys are remembered (the oldest are forgotten first), so a flood of addresses or
names costs bounded memory.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["Block", "LoginThrottle"]

MAX_FAILURES = 5
WINDOW_S = 60.0
FIRST_BLOCK_S = 10.0
MAX_BLOCK_S = 900.0
FORGET_S = 3600.0
MAX_KEYS = 10_000


@dataclass(frozen=True, slots=True)
class Block:
    """A key just blocked: `kind` is "username" or "address"."""

    kind: str
    key: str
    failures: int
    seconds: float
    refused_before: int  # attempts refused without a check during this key's previous block


@dataclass(slots=True)
class _Record:
    failures: list[tuple[float, str]] = field(default_factory=list)  # (when, username) within the window
    blocked_until: float = 0.0
    blocks: int = 0
    refused: int = 0  # attempts refused during the current or last block
    last_failure: float = 0.0


class LoginThrottle:
    def __init__(self) -> None:
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()

    def refused(self, address: str, username: str, now: float) -> bool:
        """Whether an attempt for `username` from `address` is refused now, without a password check."""
        hit = False
        for key in (("username", username), ("address", address)):
            record = self._records.get(key)
            if record is not None and now < record.blocked_until:
                record.refused += 1
                hit = True
        return hit

    def failed(self, address: str, username: str, now: float) -> list[Block]:
        """Record a wrong password; the blocks this failure starts (for one log line each)."""
        started = []
        for kind, key in (("username", username), ("address", address)):
            record = self._record((kind, key), now)
            if now < record.blocked_until:  # a check that was already running when the block started
                record.refused += 1
                continue
            record.failures = [(t, u) for t, u in record.failures if now - t < WINDOW_S]
            record.failures.append((now, username))
            if now - record.last_failure > FORGET_S:
                record.blocks = 0
            record.last_failure = now
            count = len(record.failures) if kind == "username" else len({u for _, u in record.failures})
            if count >= MAX_FAILURES and now >= record.blocked_until:
                seconds = min(FIRST_BLOCK_S * 2**record.blocks, MAX_BLOCK_S)
                started.append(Block(kind, key, len(record.failures), seconds, record.refused))
                record.blocks += 1
                record.blocked_until = now + seconds
                record.failures.clear()
                record.refused = 0
        return started

    def recent_failures(self, username: str, now: float) -> int:
        """Wrong passwords for `username` within the window (since its last block)."""
        record = self._records.get(("username", username))
        return 0 if record is None else sum(1 for t, _ in record.failures if now - t < WINDOW_S)

    def succeeded(self, username: str) -> None:
        """A right password: the username's failures are forgotten (its address's are not)."""
        self._records.pop(("username", username), None)

    def _record(self, key: tuple[str, str], now: float) -> _Record:
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= MAX_KEYS:
                self._forget(now)
            record = self._records[key] = _Record()
        self._records.move_to_end(key)
        return record

    def _forget(self, now: float) -> None:
        """Make room: drop records with nothing left to remember, else the least recently failed."""
        stale = [
            key
            for key, r in self._records.items()
            if now >= r.blocked_until and now - r.last_failure > min(WINDOW_S, FORGET_S)
        ]
        for key in stale:
            del self._records[key]
        while len(self._records) >= MAX_KEYS:
            self._records.popitem(last=False)

    def __len__(self) -> int:
        return len(self._records)

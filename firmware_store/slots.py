"""The bound on firmware downloads at once, shared by the HTTPS endpoint and the MQTT block streams.

An HTTPS download holds a slot from its request to the end of its response (`acquire`/`release`). A
stream of MQTT blocks has no end the broker sees, so it holds a lease, renewed by each block it is
served and given back after `LEASE_S` without one. A download that finds no slot is refused at once
(HTTP 503 with `Retry-After`, an MQTT block reply with code 503), never left to stall.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

LEASE_S = 15.0  # an MQTT stream that asked for no block this long has ended
RETRY_AFTER_S = 5  # what a refused download is told to wait


@dataclass
class DownloadSlots:
    capacity: int
    active: int = 0  # HTTPS downloads holding a slot
    refused: int = 0  # downloads refused for want of a slot
    _leases: dict[Hashable, float] = field(default_factory=dict)  # stream key -> expiry

    def used(self, now: float | None = None) -> int:
        if now is not None:
            self._expire(now)
        return self.active + len(self._leases)

    def acquire(self, now: float) -> bool:
        """A slot for one HTTPS download, or False (counted) when all are taken."""
        if self.used(now) >= self.capacity:
            self.refused += 1
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active = max(0, self.active - 1)

    def lease(self, key: Hashable, now: float) -> bool:
        """Hold (or renew) the slot of the MQTT stream `key` for `LEASE_S`, or False (counted) when all are
        taken by others."""
        if key in self._leases:
            self._leases[key] = now + LEASE_S
            return True
        if self.used(now) >= self.capacity:
            self.refused += 1
            return False
        self._leases[key] = now + LEASE_S
        return True

    def end_lease(self, key: Hashable) -> None:
        self._leases.pop(key, None)

    def _expire(self, now: float) -> None:
        if self._leases and self.active + len(self._leases) >= self.capacity:  # only when it matters
            for key in [k for k, until in self._leases.items() if until <= now]:
                del self._leases[key]

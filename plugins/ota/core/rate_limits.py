"""Per-device rate limiters (pure: time is an argument): token buckets that drop or pace."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    dropped: int = 0
    last_warned: float = float("-inf")


@dataclass
class RateLimiter:
    """A token bucket per key: `rate` per second, bursts up to `burst`."""

    rate: float
    burst: float
    _buckets: dict[object, _Bucket] = field(default_factory=dict)

    def allow(self, key: object, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        bucket.dropped += 1
        return False

    def reserve(self, key: object, now: float, cost: float) -> float:
        """Take `cost` tokens, into debt if need be: the seconds to wait before acting so that the rate
        holds (0 when the bucket had them). For work that is paced, not dropped."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate) - cost
        bucket.stamp = now
        return 0.0 if bucket.tokens >= 0 else -bucket.tokens / self.rate

    def should_warn(self, key: object, now: float, every_s: float = 10.0) -> int:
        """How many were dropped since the last warning, when a warning is due now (else 0)."""
        bucket = self._buckets.get(key)
        if bucket is None or not bucket.dropped or now - bucket.last_warned < every_s:
            return 0
        dropped, bucket.dropped, bucket.last_warned = bucket.dropped, 0, now
        return dropped

    def forget_idle(self, now: float, idle_s: float = 300.0) -> None:
        for key in [k for k, b in self._buckets.items() if now - b.stamp > idle_s]:
            del self._buckets[key]
